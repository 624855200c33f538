"""`evaluate`: models side by side on CRA, short- and long-caption retrieval and zero-shot
classification, with a report (Markdown + JSON tables, plots) logged to MLflow.

Driver: every image set goes through the ingest path (an adapter in `pipeline.eval_sets`
writes a listing, `listing_ingest` checks the images into the manifest `eval.<name>` and its
captions into the caption store), or is a dataset already there (its `split`); the views of
the sets are read from the stores (`pipeline.eval_views`). Each model is probed where it can
be loaded, then embeds what it needs (CRA texts, captions, zero-shot prompts, images) in a
Ray Data actor pool (`eval_embedding`), and every metric comes from the embeddings
(`pipeline.eval_scoring`). An image that is missing or unreadable is reported with its reason,
never fatal; so is a model that cannot be evaluated. Beside the report go its figures as
CLIP_benchmark result files (`pipeline.clip_benchmark`), written before `results.json`.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import clip_benchmark
from pipeline.clip_model import LLM2CLIPConfig
from pipeline.config import EvalModel, EvalSet, PipelineConfig
from pipeline.eval_report import EvalReport, ModelRow, Problem
from pipeline.eval_scoring import score_model, set_results
from pipeline.eval_sets import write_listing
from pipeline.eval_views import DEFAULT_TEMPLATES, REPO, Views, cra_views, dataset_views, listed_views, read_templates
from pipeline.plans import StagePlan
from pipeline.records import Reported, label
from pipeline.stages.eval_embedding import ModelSpec, embed
from pipeline.stages.listing_ingest import ingest_listing
from pipeline.stages.tracking import Tracker
from pipeline.store import Store
from pipeline.uri import is_file, is_uri, join, upload_dir, write_bytes
from pipeline.versioning import stable_hash

log = logging.getLogger(__name__)

DONE_FILE = "results.json"  # written last, whole


@dataclass
class EvaluateResult(Reported):
    report_dir: str
    files: list[str]
    models: list[str]
    sets: list[str]
    problems: int = label("problems (images or models left out)")
    seconds: float = 0.0

    def notes(self) -> dict[str, str]:
        return {"report": f"{self.report_dir}/results.md", "results json": f"{self.report_dir}/{DONE_FILE}"}


@dataclass(frozen=True)
class EncodedTexts:
    """A text encoder's raw embeddings of the texts every model that reads it needs."""

    encoder_version: str
    rows: dict[str, np.ndarray]  # text -> raw (unnormalised) row


@dataclass(frozen=True)
class EncoderFailed:
    reason: str  # the root cause, reported for every model that needed the encoder


# ----------------------------------------------------------------- image sets -> views
def _ingested_views(cfg: PipelineConfig, spec: EvalSet, work_dir: Path, listings: str, views: Views) -> None:
    """Files in a standard format -> adapter listing -> ingested into manifest `eval.NAME` -> views.
    The adapter writes into local scratch (`work_dir`); what it wrote (the listing, and images it
    made, e.g. Fashion-MNIST's PNGs) is published to storage (`listings`) before any worker reads
    it: a worker on another node cannot see this node's disk."""
    options = dict(spec.options)
    if spec.kind == "karpathy":
        options.setdefault("splits", [spec.split])  # Karpathy names: train, restval, val, test
    elif spec.kind in ("coco", "folder", "fashion_mnist", "easy_vqa", "pairs", "long"):
        options["split"] = spec.split
    try:
        made = write_listing(spec.kind, spec.source, work_dir / f"{spec.name}.parquet", **options)
    except (ValueError, OSError) as e:
        views.problems.append(Problem(spec.name, str(spec.source), "unreadable_set", str(e)))
        log.warning("evaluation set %s skipped: %s", spec.name, e)
        return
    views.problems += [Problem(spec.name, image, reason) for image, reason in made.problems]
    listing = pq.read_table(made.path)
    if spec.limit and listing.num_rows > spec.limit:  # evenly spread: listings are often sorted by class
        listing = listing.take(np.unique(np.linspace(0, listing.num_rows - 1, spec.limit).round().astype(np.int64)))
        pq.write_table(listing, made.path)
    if listing.num_rows == 0:
        views.problems.append(Problem(spec.name, str(spec.source), "no_images", "the adapter found no usable image"))
        return
    listing, listing_uri = _publish(listing, made.path, work_dir, join(listings, spec.name))
    dataset = f"eval.{spec.name}"
    icfg = cfg.ingest.model_copy(update={"source": listing_uri, "dataset": dataset, "image_column": "image",
                                         "caption_columns": ["captions"], "dense_caption_columns": ["dense_captions"]})
    ingested = ingest_listing(cfg.store.uri, icfg, listing_uri)
    log.info("evaluation set %s: %d images added, %d already ingested, %d rejected", spec.name, ingested.added,
             ingested.skipped, ingested.rejected)
    listed_views(cfg.store.uri, spec, dataset, listing.column("image").to_pylist(), made.class_names, views)


def _publish(listing: pa.Table, listing_path: Path, work_dir: Path, dest: str) -> tuple[pa.Table, str]:
    """Copy the adapter's files from local scratch to `dest` on storage; images it wrote under
    `work_dir` are named by their storage location in the listing (others keep theirs)."""
    local = f"{work_dir}/"
    images = [f"{dest}/{image[len(local):]}" if image and image.startswith(local) else image
              for image in listing.column("image").to_pylist()]
    listing = listing.set_column(listing.schema.get_field_index("image"), "image", pa.array(images, pa.string()))
    pq.write_table(listing, listing_path)
    upload_dir(work_dir, dest)
    return listing, f"{dest}/{listing_path.relative_to(work_dir)}"


def build_views(cfg: PipelineConfig, listings: str) -> Views:
    """The views of every configured set; adapter listings go to `listings` on storage."""
    views = Views()
    cra_views(cfg.evaluate.cra_sets, views)
    for spec in cfg.evaluate.sets:
        if spec.kind == "dataset":
            dataset_views(cfg.store.uri, spec, spec.source or cfg.ingest.dataset, views)
        else:
            with tempfile.TemporaryDirectory(prefix=f"eval-{spec.name}-") as work_dir:
                _ingested_views(cfg, spec, Path(work_dir), listings, views)
    return views


# ----------------------------------------------------------------- models
def _name_of(entry: EvalModel) -> str:
    if entry.name:
        return entry.name
    if entry.ref == "minilm":
        return "all-MiniLM-L6-v2"
    if entry.ref.startswith("models:/"):  # models:/NAME/3, models:/NAME@alias
        return entry.ref.removeprefix("models:/")
    return entry.ref.rstrip("/").rsplit("/", 1)[-1]


@ray.remote
def _probe(ref: str) -> LLM2CLIPConfig | None:
    """The LLM2CLIP config of `ref` when it is an LLM2CLIP model, else None (a text encoder),
    read where it can be loaded."""
    return LLM2CLIPConfig.of_model(ref)


def _encoder_for(cfg: PipelineConfig, entry: EvalModel, config: LLM2CLIPConfig) -> str | None:
    """The encoder turning raw strings into the embeddings an llm-tower adapter was trained on."""
    if entry.text_encoder:
        return entry.text_encoder
    version = config.encoder_version
    embeddings = Store(cfg.store.uri, "embeddings")
    if version and embeddings.commits(version):
        for lineage in reversed(embeddings.lineage(version)):
            path = lineage.encoder_path
            if path and (is_uri(path) or Path(path).exists()):
                return path
    return config.text_encoder


def resolve_models(cfg: PipelineConfig) -> list[ModelSpec]:
    entries = list(cfg.evaluate.models)
    if cfg.evaluate.minilm_baseline and not any(m.ref == "minilm" for m in entries):
        entries.append(EvalModel(ref="minilm"))
    if not entries:
        raise ValueError("evaluate.models: name at least one model (or keep evaluate.minilm_baseline)")
    probes = {i: _probe.options(num_cpus=0.5).remote(m.ref) for i, m in enumerate(entries) if m.ref != "minilm"}
    configs = dict(zip(probes, ray.get(list(probes.values()))))
    specs, names = [], set()
    for i, entry in enumerate(entries):
        config = configs.get(i)
        name = _name_of(entry)
        if name in names:
            raise ValueError(f"evaluate.models: two models are named {name!r}; give them distinct `name`s")
        names.add(name)
        if entry.ref == "minilm":
            specs.append(ModelSpec(name, "minilm", "minilm"))
        elif config is None:
            specs.append(ModelSpec(name, "text_encoder", entry.ref))
        else:
            encoder = _encoder_for(cfg, entry, config) if config.text_tower == "llm" else None
            specs.append(ModelSpec(name, "llm2clip", entry.ref, encoder, config.text_tower, config.encoder_version))
    return specs


# ----------------------------------------------------------------- driver
def report_dir(cfg: PipelineConfig) -> str:
    """Where the report of these models on these sets goes (on storage): named by them."""
    ecfg = cfg.evaluate
    key = stable_hash({"models": [m.model_dump() for m in ecfg.models], "sets": [s.model_dump() for s in ecfg.sets],
                       "cra": ecfg.cra_sets}, 10)
    return join(ecfg.output_dir or join(cfg.storage, "evaluate"), f"eval-{key}")


def plan_evaluate(cfg: PipelineConfig) -> StagePlan:
    """Skipped when the report of these models on these sets exists (results.json is written last)."""
    out = report_dir(cfg)
    if is_file(join(out, DONE_FILE)):
        return StagePlan("evaluate", out, True, "report of these models on these sets exists")
    return StagePlan("evaluate", out, False, f"{len(cfg.evaluate.models)} models on {len(cfg.evaluate.sets)} sets "
                     f"+ {len(cfg.evaluate.cra_sets)} CRA sets")


def run_evaluate(cfg: PipelineConfig, tracker: Tracker) -> EvaluateResult:
    ecfg = cfg.evaluate
    start = time.perf_counter()
    templates = read_templates(ecfg.templates)
    out_dir = report_dir(cfg)
    views = build_views(cfg, join(out_dir, "listings"))
    specs = resolve_models(cfg)
    results = set_results(views, ecfg.ks, templates, str(ecfg.templates or DEFAULT_TEMPLATES.relative_to(REPO)))
    report = EvalReport([], list(results.values()), list(views.problems))
    cra_texts = list(dict.fromkeys(t for v in views.cra for p in v.pairs for t in p))
    image_texts = list(dict.fromkeys([t for v in views.retrieval for t in v.texts]
                                     + [t.format(c) for v in views.zero_shot for c in v.class_names for t in templates]))
    image_ids = list(dict.fromkeys([i for v in views.retrieval for i in v.image_ids] + [i for v in views.zero_shot for i in v.image_ids]))
    encoded = _encode_llm_texts(cfg, specs, cra_texts, image_texts)
    bad_images: dict[str, str] = {}
    for spec in specs:
        log.info("evaluating %s (%s)", spec.name, spec.kind)
        try:
            text_rows, image_rows = _embed_model(cfg, spec, encoded, cra_texts, image_texts, image_ids, views.images, bad_images)
        except Exception as e:  # noqa: BLE001 - one model that cannot load (bad path, wrong encoder) does not sink the others
            reason = _root_cause(e)
            log.error("model %s failed, left out of the report: %s", spec.name, reason)
            report.problems.append(Problem("(models)", f"{spec.name}: {spec.ref}", "model_failed", reason))
            continue
        score_model(spec.name, spec.kind == "llm2clip", views, results, report, text_rows, image_rows, templates, ecfg.ks,
                    ecfg.heatmap_size)
        note = {"minilm": "CRA baseline", "text_encoder": "text encoder (CRA only)"}.get(spec.kind, "")
        if spec.kind == "llm2clip":
            note = "CLIP text-tower baseline" if spec.text_tower == "clip" else f"LLM2CLIP on {spec.encoder_version}"
        report.models.append(ModelRow(spec.name, spec.kind, spec.ref, note))
    report.problems += [Problem("(images)", views.images[i][0], "unreadable_at_evaluation", r) for i, r in bad_images.items()]

    with tempfile.TemporaryDirectory(prefix="eval-report-") as local:
        files = report.write(local)
        files |= clip_benchmark.write(clip_benchmark.from_report(report), local)
        _log_report(tracker, report, files)
        markdown = files["results.md"].read_text()
        # results.json last: its presence on storage means the report is complete
        done = files.pop(DONE_FILE)
        complete = done.read_bytes()
        done.unlink()
        upload_dir(local, out_dir)
        write_bytes(join(out_dir, DONE_FILE), complete)
    stored = sorted(join(out_dir, name) for name in [*files, DONE_FILE])
    result = EvaluateResult(out_dir, stored, [m.name for m in report.models],
                            [s.name for s in report.sets], len(report.problems), round(time.perf_counter() - start, 1),
                            report_markdown=markdown)
    result.tracked_by(tracker)
    return result


def _encode_llm_texts(cfg: PipelineConfig, specs: list[ModelSpec], cra_texts: list[str],
                      image_texts: list[str]) -> dict[str, EncodedTexts | EncoderFailed]:
    """Each LLM text encoder runs once, on the texts of every model that reads it: the text
    encoder rows (CRA) and the LLM2CLIP adapters trained on its embeddings (every text)."""
    wanted: dict[str, list[str]] = {}
    for spec in specs:
        if spec.kind == "text_encoder":
            wanted[spec.ref] = list(dict.fromkeys(wanted.get(spec.ref, []) + cra_texts))
        elif spec.kind == "llm2clip" and spec.text_tower == "llm" and spec.text_encoder:
            wanted[spec.text_encoder] = list(dict.fromkeys(wanted.get(spec.text_encoder, []) + cra_texts + image_texts))
    encoded: dict[str, EncodedTexts | EncoderFailed] = {}
    for ref, texts in wanted.items():
        log.info("LLM text encoder %s: %d texts", ref, len(texts))
        try:
            done = embed(cfg, ModelSpec(ref, "text_encoder", ref), texts, raw=True)
            encoded[ref] = EncodedTexts(done.encoder_version, dict(zip(texts, done.texts)))
        except Exception as e:  # noqa: BLE001 - reported per model that needs it
            encoded[ref] = EncoderFailed(_root_cause(e))
    return encoded


def _log_report(tracker: Tracker, report: EvalReport, files: dict[str, Path]) -> None:
    if not tracker.enabled:
        return
    flat = {}
    for s in report.sets:
        for model, scores in s.scores.items():
            flat |= {_metric_key(f"{model}/{s.name}/{k}"): v for k, v in scores.items()}
    tracker.log_metrics(flat)
    tracker.log_table(report.wide_table(), "evaluate/results_table.json")
    for name, fig in report.figures().items():
        tracker.log_figure(fig, f"evaluate/plots/{name}.png")
    for name in ("results.md", "results.json"):
        tracker.log_artifact(files[name], "evaluate")
    if any(name.startswith(f"{clip_benchmark.DIR}/") for name in files):  # the folder in one call
        tracker.log_artifact(files["results.md"].parent / clip_benchmark.DIR, f"evaluate/{clip_benchmark.DIR}")


def _encoded(encoded: dict[str, EncodedTexts | EncoderFailed], ref: str, what: str) -> EncodedTexts:
    found = encoded[ref]
    if isinstance(found, EncoderFailed):
        raise RuntimeError(f"{what}{found.reason}")
    return found


def _embed_model(cfg: PipelineConfig, spec: ModelSpec, encoded: dict[str, EncodedTexts | EncoderFailed], cra_texts: list[str],
                 image_texts: list[str], image_ids: list[str], images: dict[str, tuple[str, str]], bad_images: dict[str, str]):
    """({text: unit row}, {image_id: unit row}) of one model; raises when it cannot be evaluated."""
    if spec.kind == "minilm":
        return dict(zip(cra_texts, embed(cfg, spec, cra_texts).texts)), {}
    if spec.kind == "text_encoder":
        rows = _encoded(encoded, spec.ref, "").rows
        return {t: v / max(float(np.linalg.norm(v)), 1e-12) for t, v in rows.items()}, {}
    texts = list(dict.fromkeys(cra_texts + image_texts))
    wanted = [images[i] for i in image_ids]
    if spec.text_tower == "llm":
        if not spec.text_encoder:
            raise ValueError(f"model {spec.name} records no text encoder for raw strings: set its `text_encoder`")
        llm = _encoded(encoded, spec.text_encoder, f"text encoder {spec.text_encoder}: ")
        if spec.encoder_version and llm.encoder_version != spec.encoder_version:
            raise ValueError(f"text encoder {spec.text_encoder} has encoder_version {llm.encoder_version}, but this model's adapter "
                             f"was trained on embeddings of {spec.encoder_version}")
        done = embed(cfg, spec, [], wanted, llm=np.stack([llm.rows[t] for t in texts]))
    else:
        done = embed(cfg, spec, texts, wanted)
    image_rows = {}
    for image_id, vec, reason in zip(image_ids, done.images, done.image_reasons):
        if reason:
            bad_images.setdefault(image_id, reason)
        else:
            image_rows[image_id] = vec
    return dict(zip(texts, done.texts)), image_rows


def _root_cause(error: BaseException) -> str:
    """The user-code error inside a Ray Data failure: its last `SomethingError: message` line."""
    lines = [line.strip() for line in str(error).splitlines()]
    found = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line) and not line.startswith("ray.")]
    return (found[-1] if found else (lines[0] if lines and lines[0] else type(error).__name__))[:500]


def _metric_key(text: str) -> str:
    """An MLflow metric name: 'clip/coco/i2t_r@1' -> 'clip/coco/i2t_r1' (MLflow refuses '@')."""
    return "".join(c if c.isalnum() or c in "-_./ " else "_" for c in text.replace("@", ""))
