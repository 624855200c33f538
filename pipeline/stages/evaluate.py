"""`evaluate`: models side by side on CRA, short- and long-caption retrieval and zero-shot
classification, with a report (Markdown + JSON tables, plots) logged to MLflow.

Driver: every image set goes through the ingest path (an adapter in `pipeline.eval_sets`
writes a listing, `run_ingest` checks the images into the manifest `eval.<name>` and its
captions into the caption store), or is a dataset already there (its `split`). Each model
then embeds what it needs (CRA texts, captions, zero-shot prompts, images) in a Ray Data
actor pool, and the driver computes every metric with `pipeline.metrics`, one function per
metric. An image that is missing or unreadable is reported with its reason, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline import metrics
from pipeline.config import EvalModel, EvalSet, PipelineConfig
from pipeline.cra_sets import dataset_pairs, named_pairs
from pipeline.eval_report import EvalReport, ModelRow, Problem, SetResult
from pipeline.hardware import resolve_precision
from pipeline.plans import StagePlan
from pipeline.stages.tracking import Tracker
from pipeline.store import Store
from pipeline.versioning import stable_hash

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATES = REPO / "configs" / "zeroshot_templates.txt"
ZERO_SHOT_KINDS = ("folder", "fashion_mnist")
MODEL_FILE = "llm2clip_model.json"


# ----------------------------------------------------------------- what is evaluated
@dataclass
class RetrievalView:
    name: str
    image_ids: list[str]
    texts: list[str]  # distinct caption strings
    positives: np.ndarray  # (images, texts): text j describes image i
    protocol: str


@dataclass
class ZeroShotView:
    name: str
    image_ids: list[str]
    labels: list[int]
    class_names: list[str]


@dataclass
class CraView:
    name: str
    pairs: list[tuple[str, str]]
    source: str


@dataclass
class Views:
    retrieval: list[RetrievalView] = field(default_factory=list)
    zero_shot: list[ZeroShotView] = field(default_factory=list)
    cra: list[CraView] = field(default_factory=list)
    images: dict[str, tuple[str, str]] = field(default_factory=dict)  # image_id -> (uri, sha256)
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class ModelSpec:
    """One model as the embedding actors load it."""

    name: str
    kind: Literal["text_encoder", "minilm", "llm2clip"]
    ref: str
    text_encoder: str | None = None  # llm2clip with the llm tower
    text_tower: str | None = None
    encoder_version: str | None = None


@dataclass
class EvaluateResult:
    report_dir: str
    files: list[str]
    models: list[str]
    sets: list[str]
    problems: int
    seconds: float = 0.0
    mlflow_url: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"stage": "evaluate", "report": f"{self.report_dir}/results.md", "results json": f"{self.report_dir}/results.json",
                "models": self.models, "sets": self.sets, "problems (images left out)": self.problems,
                "seconds": round(self.seconds, 1), "mlflow run": self.mlflow_url}


# ----------------------------------------------------------------- image sets -> views
def _retrieval_view(name: str, image_ids: list[str], captions: dict[str, list[str]], protocol: str) -> RetrievalView | None:
    """Texts deduplicated by exact string; a text's positives are all images it describes."""
    image_ids = [i for i in image_ids if captions.get(i)]
    texts = list(dict.fromkeys(t for i in image_ids for t in captions[i]))
    if len(image_ids) < 2 or not texts:
        return None
    col = {t: j for j, t in enumerate(texts)}
    positives = np.zeros((len(image_ids), len(texts)), dtype=bool)
    for r, i in enumerate(image_ids):
        positives[r, [col[t] for t in captions[i]]] = True
    total = sum(len(captions[i]) for i in image_ids)
    line = (f"{len(image_ids)} images, {len(texts)} distinct captions ({total} before deduplication); {protocol}; "
            "cosine similarity, ties broken by order")
    return RetrievalView(name, image_ids, texts, positives, line)


SHORT_PROTOCOL = ("image->text: a hit at K when any of the image's captions is among its top K texts; text->image: a hit "
                  "when an image it describes is among its top K images (CLIP_benchmark)")
LONG_PROTOCOL = "one long caption per image (its first), matched by index; R@K both ways"


def _captions_of(store_uri: str, version: str, image_ids: set[str]) -> dict[str, list[str]]:
    captions = Store(store_uri, "captions")
    if not captions.commits(version):
        return {}
    rows = captions.read(version, columns=["image_id", "text"])
    out: dict[str, list[str]] = {}
    for image_id, text in zip(rows.column("image_id").to_pylist(), rows.column("text").to_pylist()):
        if image_id in image_ids and text and text.strip() and text not in out.setdefault(image_id, []):
            out[image_id].append(text)
    return out


def _dataset_views(cfg: PipelineConfig, spec: EvalSet, views: Views) -> None:
    """A manifest already in the stores: short and long retrieval and CRA pairs of its split."""
    dataset = spec.source or cfg.ingest.dataset
    manifest_store = Store(cfg.store.uri, "manifest")
    if not manifest_store.commits(dataset):
        views.problems.append(Problem(spec.name, dataset, "no_dataset", f"manifest {dataset!r} not in {cfg.store.uri}"))
        return
    manifest = manifest_store.read(dataset)
    rows = [r for r in manifest.select(["image_id", "uri", "sha256", "split"]).to_pylist() if r["split"] == spec.split]
    rows = rows[: spec.limit] if spec.limit else rows
    ids = [r["image_id"] for r in rows]
    views.images.update({r["image_id"]: (r["uri"], r["sha256"]) for r in rows})
    short = _captions_of(cfg.store.uri, "original", set(ids))
    long = {i: c[:1] for i, c in _captions_of(cfg.store.uri, "provided", set(ids)).items()}
    for suffix, captions, protocol in (("short", short, SHORT_PROTOCOL), ("long", long, LONG_PROTOCOL)):
        view = _retrieval_view(f"{spec.name}.{suffix}", ids, captions, f"{dataset} split {spec.split}; {protocol}")
        if view:
            views.retrieval.append(view)
    caption_store = Store(cfg.store.uri, "captions")
    rows_ = pa.concat_tables([caption_store.read(v) for v in ("original", "provided") if caption_store.commits(v)])
    kept = manifest.filter(pc.is_in(manifest.column("image_id"), pa.array(ids)))
    for protocol, pairs in dataset_pairs(kept, rows_, spec.split).items():
        views.cra.append(CraView(f"{spec.name}.{protocol}", pairs, f"{dataset} split {spec.split}, {protocol} caption pairs"))


def _ingested_views(cfg: PipelineConfig, spec: EvalSet, work_dir: Path, views: Views) -> None:
    """Files in a standard format -> adapter listing -> the ingest path -> views."""
    from pipeline.eval_sets import write_listing
    from pipeline.stages.ingest import run_ingest

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
    dataset = f"eval.{spec.name}"
    icfg = cfg.ingest.model_copy(update={"source": str(made.path), "dataset": dataset, "image_column": "image",
                                         "caption_columns": ["captions"], "dense_caption_columns": ["dense_captions"]})
    ingested = run_ingest(cfg.model_copy(update={"ingest": icfg}), Tracker(None, None))
    log.info("evaluation set %s: %d images added, %d already ingested, %d rejected", spec.name, ingested.added,
             ingested.skipped, ingested.rejected)
    wanted = set(listing.column("image").to_pylist())
    rejects = Store(cfg.store.uri, "rejects")
    if rejects.commits(f"ingest.{dataset}"):
        for r in rejects.read(f"ingest.{dataset}").to_pylist():
            if r["record_id"] in wanted:
                views.problems.append(Problem(spec.name, r["record_id"], r["reason"], r["detail"]))
    manifest_store = Store(cfg.store.uri, "manifest")
    if not manifest_store.commits(dataset):  # every image was rejected
        return
    rows = _listed_rows(manifest_store.read(dataset), listing.column("image").to_pylist(),
                        {p.item for p in views.problems if p.set == spec.name})
    ids = [r["image_id"] for r in rows]
    views.images.update({r["image_id"]: (r["uri"], r["sha256"]) for r in rows})
    if spec.kind in ZERO_SHOT_KINDS:
        labels = [int(json.loads(r["metadata"] or "{}").get("label", -1)) for r in rows]
        keep = [i for i, label in enumerate(labels) if label >= 0]
        views.zero_shot.append(ZeroShotView(spec.name, [ids[i] for i in keep], [labels[i] for i in keep], list(made.class_names or [])))
        return
    if spec.kind == "long":
        long = {i: c[:1] for i, c in _captions_of(cfg.store.uri, "provided", set(ids)).items()}
        view = _retrieval_view(spec.name, ids, long, f"{spec.kind} file; {LONG_PROTOCOL}")
    else:
        view = _retrieval_view(spec.name, ids, _captions_of(cfg.store.uri, "original", set(ids)), f"{spec.kind} file; {SHORT_PROTOCOL}")
    if view:
        views.retrieval.append(view)


def _listed_rows(manifest: pa.Table, uris: list[str], rejected: set[str]) -> list[dict]:
    """The manifest rows of the listed images, in listing order, each with its listed uri. An image
    ingested before under another path (same bytes, so same image_id) is found by its hash."""
    from pipeline.images import image_id_for, read_uri

    by_uri = {r["uri"]: r for r in manifest.to_pylist()}
    by_id = {r["image_id"]: r for r in by_uri.values()}
    rows = []
    for uri in uris:
        row = by_uri.get(uri)
        if row is None and uri not in rejected:
            row = by_id.get(image_id_for(hashlib.sha256(read_uri(uri)).hexdigest()))
        if row is not None:
            rows.append(row | {"uri": uri})
    return rows


def build_views(cfg: PipelineConfig, work_dir: Path) -> Views:
    views = Views()
    for entry in cfg.evaluate.cra_sets:
        try:
            name, pairs = named_pairs(entry)
        except ValueError as e:
            views.problems.append(Problem(entry, entry, "unreadable_set", str(e)))
            continue
        views.cra.append(CraView(name, pairs, "built-in set (pipeline.cra_sets)" if name == entry else f"pairs file {entry}"))
    for spec in cfg.evaluate.sets:
        if spec.kind == "dataset":
            _dataset_views(cfg, spec, views)
        else:
            _ingested_views(cfg, spec, work_dir, views)
    return views


def read_templates(path: str | Path | None) -> list[str]:
    path = Path(path) if path else DEFAULT_TEMPLATES
    if not path.is_file():
        raise ValueError(f"evaluate.templates: {path} does not exist")
    lines = [line.strip() for line in path.read_text().splitlines()]
    templates = [t for t in lines if t and not t.startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"evaluate.templates: {path}: need lines with exactly one {{}} (the class name); bad: {bad[:3]}")
    return templates


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
def _probe(ref: str) -> dict | None:
    """The LLM2CLIP config of `ref` when it is an LLM2CLIP model, else None (a text encoder)."""
    from pipeline.clip_model import _local_dir

    try:
        directory = _local_dir(ref)
    except Exception:  # a hub id or an encoder URI the loader resolves itself
        return None
    path = Path(directory) / MODEL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _encoder_for(cfg: PipelineConfig, entry: EvalModel, info: dict) -> str | None:
    """The encoder turning raw strings into the embeddings an llm-tower adapter was trained on."""
    if entry.text_encoder:
        return entry.text_encoder
    version = info.get("encoder_version")
    embeddings = Store(cfg.store.uri, "embeddings")
    if version and embeddings.commits(version):
        for lineage in reversed(embeddings.lineage(version)):
            path = lineage.get("encoder_path")
            if path and Path(path).exists():
                return path
    return info.get("text_encoder")


def resolve_models(cfg: PipelineConfig) -> list[ModelSpec]:
    entries = list(cfg.evaluate.models)
    if cfg.evaluate.minilm_baseline and not any(m.ref == "minilm" for m in entries):
        entries.append(EvalModel(ref="minilm"))
    if not entries:
        raise ValueError("evaluate.models: name at least one model (or keep evaluate.minilm_baseline)")
    infos = ray.get([_probe.options(num_cpus=0.5).remote(m.ref) if m.ref != "minilm" else _none.remote() for m in entries])
    specs, names = [], set()
    for entry, info in zip(entries, infos):
        name = _name_of(entry)
        if name in names:
            raise ValueError(f"evaluate.models: two models are named {name!r}; give them distinct `name`s")
        names.add(name)
        if entry.ref == "minilm":
            specs.append(ModelSpec(name, "minilm", "minilm"))
        elif info is None:
            specs.append(ModelSpec(name, "text_encoder", entry.ref))
        else:
            tower = info.get("text_tower", "llm")
            encoder = _encoder_for(cfg, entry, info) if tower == "llm" else None
            specs.append(ModelSpec(name, "llm2clip", entry.ref, encoder, tower, info.get("encoder_version")))
    return specs


@ray.remote(num_cpus=0)
def _none() -> None:
    return None


class EvalEncoder:
    """Ray Data actor holding one model. Rows by `kind`: `text` (a string) and `llm` (a cached
    LLM embedding, for an LLM2CLIP adapter) become text embeddings, `image` (uri + sha256) an
    image embedding; an unreadable image gets a reason instead. Unit rows, except a text
    encoder's with `raw` (the LLM embeddings an adapter takes)."""

    def __init__(self, spec: ModelSpec, precision: str, use_gpu: bool, max_bytes: int, raw: bool = False):
        import torch

        self.spec, self.max_bytes, self.raw = spec, max_bytes, raw
        device = "cuda" if use_gpu else "cpu"
        if spec.kind == "minilm":
            from pipeline.baselines import MiniLMEncoder

            self.text_model = MiniLMEncoder(device=device)
            self.dim = self.text_model.dim
        elif spec.kind == "text_encoder":
            from pipeline.text_encoder import TextEncoder

            self.text_model = TextEncoder.from_pretrained(spec.ref, dtype=precision, device=device)
            self.dim = self.text_model.dim
            self.version = self.text_model.encoder_version
        else:
            from pipeline.clip_model import LLM2CLIP

            dtype = torch.bfloat16 if use_gpu and precision == "bf16" else torch.float32
            self.model = LLM2CLIP.from_pretrained(spec.ref, device=device, dtype=dtype)
            self.dim = self.model.config.embed_dim

    def _texts(self, texts: list[str]) -> np.ndarray:
        if self.spec.kind == "minilm":
            return self.text_model.encode(texts)
        if self.spec.kind == "text_encoder":
            return self.text_model.encode(texts, normalize=not self.raw)
        return self.model.embed_texts(texts).numpy()  # clip tower

    def _images(self, uris: list[str], shas: list[str]) -> tuple[np.ndarray | None, list[str]]:
        from pipeline.clip_data import load_image

        images, reasons = [], []
        for uri, sha in zip(uris, shas):
            image, reason, detail = load_image(uri, sha, self.max_bytes)
            reasons.append(f"{reason}: {detail}" if image is None else "")
            if image is not None:
                images.append(image)
        emb = self.model.encode_image(images).numpy() if images else None
        return emb, reasons

    def __call__(self, batch: pa.Table) -> pa.Table:
        kinds = batch.column("kind").to_pylist()
        n = len(kinds)
        out = np.zeros((n, self.dim), dtype=np.float32)
        reasons = [""] * n
        rows = {k: [i for i in range(n) if kinds[i] == k] for k in ("text", "llm", "image")}
        if rows["text"]:
            texts = batch.column("text").to_pylist()
            out[rows["text"]] = self._texts([texts[i] for i in rows["text"]])
        if rows["llm"]:
            cached = batch.column("llm").take(pa.array(rows["llm"])).combine_chunks()
            vectors = np.asarray(cached.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(rows["llm"]), -1)
            out[rows["llm"]] = self.model.encode_text(vectors).numpy()
        if rows["image"]:
            uris, shas = batch.column("uri").to_pylist(), batch.column("sha256").to_pylist()
            emb, why = self._images([uris[i] for i in rows["image"]], [shas[i] for i in rows["image"]])
            ok = [i for i, reason in zip(rows["image"], why) if not reason]
            if ok:
                out[ok] = emb
            for i, reason in zip(rows["image"], why):
                reasons[i] = reason
        version = getattr(self, "version", "")
        return pa.table({"id": batch.column("id"), "reason": pa.array(reasons, pa.string()),
                         "encoder_version": pa.array([version] * n, pa.string()),
                         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1), pa.float32()), self.dim)})


@dataclass
class Embedded:
    """One pass of a model over texts, cached LLM embeddings and images."""

    texts: np.ndarray  # rows of `texts` then of `llm` inputs
    images: np.ndarray
    image_reasons: list[str]
    encoder_version: str


def embed(cfg: PipelineConfig, spec: ModelSpec, texts: list[str], images: list[tuple[str, str]] = (),
          llm: np.ndarray | None = None, raw: bool = False) -> Embedded:
    """Embed with one model in an actor pool (Ray Data); results in input order."""
    ecfg = cfg.evaluate
    use_gpu = ecfg.gpus_per_actor > 0
    n_llm = 0 if llm is None else len(llm)
    kinds = ["text"] * len(texts) + ["llm"] * n_llm + ["image"] * len(images)
    if not kinds:
        return Embedded(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), [], "")
    # cached LLM embeddings as one flat float32 buffer (rows of other kinds are empty lists)
    dim = llm.shape[1] if n_llm else 0
    lengths = np.array([0] * len(texts) + [dim] * n_llm + [0] * len(images), dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(np.asarray(llm, dtype=np.float32).reshape(-1) if n_llm else np.zeros(0, np.float32))
    table = pa.table({
        "id": pa.array(range(len(kinds)), pa.int64()),
        "kind": kinds,
        "text": pa.array(list(texts) + [None] * (n_llm + len(images)), pa.string()),
        "llm": pa.ListArray.from_arrays(offsets, values),
        "uri": pa.array([None] * (len(texts) + n_llm) + [u for u, _ in images], pa.string()),
        "sha256": pa.array([None] * (len(texts) + n_llm) + [h for _, h in images], pa.string()),
    })
    per_block = -(-table.num_rows // max(ecfg.actors, -(-table.num_rows // ecfg.batch_size)))
    ds = ray.data.from_arrow([table.slice(i, per_block) for i in range(0, table.num_rows, per_block)])
    out = ds.map_batches(
        EvalEncoder,
        fn_constructor_kwargs=dict(spec=spec, precision=resolve_precision(ecfg.precision, use_gpu), use_gpu=use_gpu,
                                   max_bytes=cfg.ingest.limits.max_bytes, raw=raw),
        batch_size=ecfg.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=ecfg.actors),
        num_cpus=ecfg.cpus_per_actor, num_gpus=ecfg.gpus_per_actor,
    )
    result = pa.concat_tables([t for t in ray.get(out.to_arrow_refs()) if t.num_rows]).sort_by("id")
    if result.num_rows != table.num_rows:
        raise RuntimeError(f"model {spec.name}: {result.num_rows} embeddings for {table.num_rows} inputs")
    column = result.column("embedding").combine_chunks()
    flat = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(result.num_rows, column.type.list_size)
    n_text = len(texts) + n_llm
    return Embedded(flat[:n_text], flat[n_text:], result.column("reason").to_pylist()[n_text:], result.column("encoder_version")[0].as_py())


# ----------------------------------------------------------------- metrics per model
def _cra_result(view: CraView) -> SetResult:
    n = len(view.pairs)
    return SetResult(view.name, "cra", f"{metrics.cra_protocol(n)}; {view.source}", {"cra": 1 / (2 * n - 1)})


def _retrieval_result(view: RetrievalView, ks: list[int]) -> SetResult:
    return SetResult(view.name, "retrieval", view.protocol, metrics.retrieval_chance(view.positives, ks))


def _zero_shot_result(view: ZeroShotView, templates: list[str], source: str) -> SetResult:
    c = len(view.class_names)
    ks = [k for k in (1, 5) if k <= c]
    line = (f"{len(view.image_ids)} images, {c} classes; a class embedding is the mean of the normalised embeddings of its "
            f"name in {len(templates)} templates ({source}), renormalised; top-k of cosine")
    return SetResult(view.name, "zero_shot", line, {f"top{k}": k / c for k in ks})


def score_model(spec: ModelSpec, views: Views, results: dict[str, SetResult], report: EvalReport, text_emb: dict[str, np.ndarray],
                image_emb: dict[str, np.ndarray], templates: list[str], ks: list[int], heatmap_size: int) -> None:
    """Every metric of one model from its embeddings (text -> row, image_id -> row)."""
    for view in views.cra:
        first = np.stack([text_emb[a] for a, _ in view.pairs])
        second = np.stack([text_emb[b] for _, b in view.pairs])
        results[view.name].scores[spec.name] = {"cra": metrics.caption_retrieval_accuracy(first, second)}
    if spec.kind != "llm2clip":
        return
    for view in views.retrieval:
        keep = [r for r, i in enumerate(view.image_ids) if i in image_emb]
        if len(keep) < 2:
            continue
        sims = metrics.cosine_similarity(np.stack([image_emb[view.image_ids[r]] for r in keep]), np.stack([text_emb[t] for t in view.texts]))
        positives = view.positives[keep]
        results[view.name].scores[spec.name] = metrics.retrieval_scores(sims, positives, ks)
        report.plots.curves.setdefault(view.name, {})[spec.name] = metrics.recall_curve(sims, positives, min(50, sims.shape[1]))
        if view is views.retrieval[0]:
            m = min(heatmap_size, len(keep))
            cols = [int(np.argmax(positives[r])) for r in range(m)]
            report.plots.heatmaps[f"{spec.name} @ {view.name}"] = (
                sims[:m][:, cols], [f"image {r}" for r in range(m)], [view.texts[c] for c in cols])
    for view in views.zero_shot:
        keep = [r for r, i in enumerate(view.image_ids) if i in image_emb]
        if not keep:
            continue
        prompts = np.stack([[text_emb[t.format(c)] for t in templates] for c in view.class_names])
        sims = metrics.cosine_similarity(np.stack([image_emb[view.image_ids[r]] for r in keep]), metrics.class_embeddings(prompts))
        labels = [view.labels[r] for r in keep]
        results[view.name].scores[spec.name] = metrics.zero_shot_scores(sims, labels)
        report.plots.confusions[f"{spec.name} @ {view.name}"] = (metrics.confusion_matrix(sims, labels), view.class_names)


# ----------------------------------------------------------------- driver
def report_dir(cfg: PipelineConfig) -> Path:
    """Where the report of these models on these sets goes: named by them."""
    ecfg = cfg.evaluate
    key = stable_hash({"models": [m.model_dump() for m in ecfg.models], "sets": [s.model_dump() for s in ecfg.sets],
                       "cra": ecfg.cra_sets}, 10)
    return Path(ecfg.output_dir or Path(cfg.run_dir) / "evaluate") / f"eval-{key}"


def plan_evaluate(cfg: PipelineConfig) -> StagePlan:
    """Skipped when the report of these models on these sets exists (results.json is written last)."""
    out = report_dir(cfg)
    if (out / DONE_FILE).is_file():
        return StagePlan("evaluate", str(out), True, "report of these models on these sets exists")
    return StagePlan("evaluate", str(out), False, f"{len(cfg.evaluate.models)} models on {len(cfg.evaluate.sets)} sets "
                     f"+ {len(cfg.evaluate.cra_sets)} CRA sets")


DONE_FILE = "results.json"


def run_evaluate(cfg: PipelineConfig, tracker: Tracker) -> EvaluateResult:
    ecfg = cfg.evaluate
    start = time.perf_counter()
    templates = read_templates(ecfg.templates)
    out_dir = report_dir(cfg)
    views = build_views(cfg, out_dir / "listings")
    specs = resolve_models(cfg)
    template_source = str(ecfg.templates or DEFAULT_TEMPLATES.relative_to(REPO))
    results: dict[str, SetResult] = {v.name: _cra_result(v) for v in views.cra}
    results |= {v.name: _retrieval_result(v, ecfg.ks) for v in views.retrieval}
    results |= {v.name: _zero_shot_result(v, templates, template_source) for v in views.zero_shot}
    report = EvalReport([], list(results.values()), list(views.problems))
    cra_texts = list(dict.fromkeys(t for v in views.cra for p in v.pairs for t in p))
    image_texts = list(dict.fromkeys([t for v in views.retrieval for t in v.texts]
                                     + [t.format(c) for v in views.zero_shot for c in v.class_names for t in templates]))
    image_ids = list(dict.fromkeys([i for v in views.retrieval for i in v.image_ids] + [i for v in views.zero_shot for i in v.image_ids]))
    # The LLM text encoders run once per encoder, for every model that reads them: the text
    # encoder rows and the LLM2CLIP adapters trained on their embeddings.
    llm_texts: dict[str, list[str]] = {}
    for spec in specs:
        if spec.kind == "text_encoder":
            llm_texts[spec.ref] = list(dict.fromkeys(llm_texts.get(spec.ref, []) + cra_texts))
        elif spec.kind == "llm2clip" and spec.text_tower == "llm" and spec.text_encoder:
            llm_texts[spec.text_encoder] = list(dict.fromkeys(llm_texts.get(spec.text_encoder, []) + cra_texts + image_texts))
    llm_cache: dict[str, tuple[str, dict[str, np.ndarray]] | str] = {}  # ref -> (encoder_version, text -> raw row) or failure
    for ref, texts in llm_texts.items():
        log.info("LLM text encoder %s: %d texts", ref, len(texts))
        try:
            done = embed(cfg, ModelSpec(ref, "text_encoder", ref), texts, raw=True)
            llm_cache[ref] = (done.encoder_version, dict(zip(texts, done.texts)))
        except Exception as e:  # noqa: BLE001 - reported per model below
            llm_cache[ref] = _root_cause(e)
    bad_images: dict[str, str] = {}
    for spec in specs:
        log.info("evaluating %s (%s)", spec.name, spec.kind)
        try:
            text_rows, image_rows = _embed_model(cfg, spec, llm_cache, cra_texts, image_texts,
                                                 image_ids, views.images, bad_images)
        except Exception as e:  # noqa: BLE001 - one model that cannot load (bad path, wrong encoder) does not sink the others
            reason = _root_cause(e)
            log.error("model %s failed, left out of the report: %s", spec.name, reason)
            report.problems.append(Problem("(models)", f"{spec.name}: {spec.ref}", "model_failed", reason))
            continue
        score_model(spec, views, results, report, text_rows, image_rows, templates, ecfg.ks, ecfg.heatmap_size)
        note = {"minilm": "CRA baseline", "text_encoder": "text encoder (CRA only)"}.get(spec.kind, "")
        if spec.kind == "llm2clip":
            note = "CLIP text-tower baseline" if spec.text_tower == "clip" else f"LLM2CLIP on {spec.encoder_version}"
        report.models.append(ModelRow(spec.name, spec.kind, spec.ref, note))
    report.problems += [Problem("(images)", views.images[i][0], "unreadable_at_evaluation", r) for i, r in bad_images.items()]

    files = report.write(out_dir)
    markdown = files["results.md"].read_text()
    _log_report(tracker, report, files)
    print("\n" + markdown)
    return EvaluateResult(str(out_dir), sorted(str(p) for p in files.values()), [m.name for m in report.models],
                          [s.name for s in report.sets], len(report.problems), time.perf_counter() - start, tracker.url)


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


def _embed_model(cfg: PipelineConfig, spec: ModelSpec, llm_cache: dict, cra_texts: list[str], image_texts: list[str],
                 image_ids: list[str], images: dict[str, tuple[str, str]], bad_images: dict[str, str]):
    """({text: unit row}, {image_id: unit row}) of one model; raises when it cannot be evaluated."""
    if spec.kind in ("text_encoder", "minilm"):
        if spec.kind == "minilm":
            return dict(zip(cra_texts, embed(cfg, spec, cra_texts).texts)), {}
        cached = llm_cache[spec.ref]
        if isinstance(cached, str):
            raise RuntimeError(cached)
        return {t: v / max(float(np.linalg.norm(v)), 1e-12) for t, v in cached[1].items()}, {}
    texts = list(dict.fromkeys(cra_texts + image_texts))
    wanted = [images[i] for i in image_ids]
    if spec.text_tower == "llm":
        if not spec.text_encoder:
            raise ValueError(f"model {spec.name} records no text encoder for raw strings: set its `text_encoder`")
        cached = llm_cache[spec.text_encoder]
        if isinstance(cached, str):
            raise RuntimeError(f"text encoder {spec.text_encoder}: {cached}")
        version, rows = cached
        if spec.encoder_version and version != spec.encoder_version:
            raise ValueError(f"text encoder {spec.text_encoder} has encoder_version {version}, but this model's adapter "
                             f"was trained on embeddings of {spec.encoder_version}")
        done = embed(cfg, spec, [], wanted, llm=np.stack([rows[t] for t in texts]))
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
