"""One caption pass: the items of a dataset (or of a text source) that lack a caption
version get it, from a pool of vLLM engines in Ray Data. The recaption stage runs one pass;
the corpus stage runs three, one per role.

Ray Data streams the images that lack this caption version through a pool of actors,
each holding one vLLM engine (`pipeline.stages.captioner.Captioner`); the same code runs on CPU
here and on GPU clusters. In image mode a task reads each image's encoded bytes and the
actor decodes them; in text mode the actor expands the image's original captions. The
driver commits the captions every `commit_every` rows, so a stopped job keeps what it
made and a re-run (same caption_version) only captions what is missing.
Counts reconcile per image: input = captioned + skipped + rejected.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from PIL import Image

from pipeline.captioning import (
    Rejected,
    caption_version,
    clean_caption,
    fill_instruction,
    fit_context,
    model_fingerprint,
    prompt_id,
    recaption_model,
)
from pipeline.config import ImageLimits, PipelineConfig, RecaptionConfig, pool_bounds
from pipeline.stages.captioner import CaptionRequest, Captioner
from pipeline.stages.runtime import actor_pool
from pipeline.hardware import resolve_precision
from pipeline.images import inspect_image, read_ingested_bytes, to_rgb
from pipeline.captions import caption_rows
from pipeline.lineage import Lineage, StoreInput
from pipeline.records import Tracked, hidden, label, to_json
from pipeline.stages.tracking import Tracker
from pipeline.timing import Laps
from pipeline.store import Store, reject_row, utc_now
from pipeline.versioning import code_version
from schemas import STORE_SCHEMAS

log = logging.getLogger(__name__)


_OUTPUT = pa.schema(
    [
        ("image_id", pa.string()),
        ("index", pa.int32()),
        ("text", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("num_tokens", pa.int64()),
        ("seconds", pa.float64()),
    ]
)


@dataclass
class RecaptionResult(Tracked):
    mode: str
    model: str
    caption_version: str = label("caption_version (caption store version)")
    dataset: str = label("manifest version")
    input_images: int = 0
    captioned: int = 0
    skipped: int = label("skipped (already captioned, or rejected before)", default=0)
    skipped_rejected_before: int = label("of which rejected before (recaption.retry_rejected re-tries)", default=0)
    rejected: int = 0
    captions_written: int = 0
    captions_rejected: int = 0
    generated_tokens: int = 0
    seconds: float = hidden(default=0.0)
    engine_seconds: float = hidden(default=0.0)
    phases: dict[str, float] = hidden(default_factory=dict)  # driver wall seconds per phase (pipeline.timing)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    commits: list[str] = hidden(default_factory=list)
    samples: list[dict[str, str]] = hidden(default_factory=list)  # the first captions written, for a look

    @property
    def already_captioned(self) -> int:
        return self.skipped - self.skipped_rejected_before

    def notes(self) -> dict[str, float | int | None]:
        return {"tokens/s (wall, incl. engine start)": round(self.generated_tokens / self.seconds, 1) if self.seconds else None,
                "captions/s (wall)": round(self.captions_written / self.seconds, 2) if self.seconds else None,
                "commits": len(self.commits)}


# ----------------------------------------------------------------- Ray Data UDFs
def read_images(batch: pa.Table, limits: ImageLimits) -> pa.Table:
    """Task UDF: each row's encoded bytes (never decoded here), or why they could not be read
    (including bytes that changed since ingest)."""
    data, reasons, details = [], [], []
    for uri, sha in zip(batch.column("uri").to_pylist(), batch.column("sha256").to_pylist()):
        raw, reason, detail = read_ingested_bytes(uri, sha, limits.max_bytes)
        data.append(raw)
        reasons.append(reason)
        details.append(detail)
    return (
        batch.append_column("image_bytes", pa.array(data, type=pa.binary()))
        .append_column("read_reason", pa.array(reasons, type=pa.string()))
        .append_column("read_detail", pa.array(details, type=pa.string()))
    )


class CaptionBatch:
    """Actor UDF: one vLLM engine per actor; manifest rows in, one row per caption out
    (or one reject row per image that could not be captioned)."""

    def __init__(self, model: str, cfg: RecaptionConfig, precision: str, use_gpu: bool, limits: ImageLimits, trust_remote_code: bool):
        self.cfg = cfg
        self.limits = limits
        self.captioner = Captioner(model, cfg, precision, use_gpu, trust_remote_code)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict[str, Any]] = []
        requests, owners = [], []
        for row in rows:
            request, reason, detail = self._request(row)
            if request is None:
                out.append(_row(row["image_id"], 0, "", reason, detail))
            else:
                requests.append(request)
                owners.append(row["image_id"])
        start = time.perf_counter()
        generations = self.captioner.generate(requests) if requests else []
        seconds = time.perf_counter() - start
        for image_id, gen in zip(owners, generations):
            if gen.reason:
                out.append(_row(image_id, 0, "", gen.reason, gen.detail))
                continue
            for k, (text, finish) in enumerate(zip(gen.texts, gen.finish_reasons)):
                clean, reason, detail = clean_caption(text, finish, self.cfg.postprocess)
                out.append(_row(image_id, k, clean, reason, detail or (text[:300] if reason else "")))
            out[-1]["num_tokens"] = gen.num_tokens
        if out:
            out[-1]["seconds"] = seconds  # per batch, summed by the driver
        return pa.Table.from_pylist(out, schema=_OUTPUT)

    def _request(self, row: dict[str, Any]) -> tuple[CaptionRequest | None, str, str]:
        captions = [c for c in (row.get("source_captions") or []) if c and c.strip()]
        if self.cfg.mode == "text":
            if not captions:
                return None, Rejected.NO_SOURCE_CAPTION, f"no '{self.cfg.text_source}' caption to expand"
            return CaptionRequest(fill_instruction(self.cfg.prompt, captions)), "", ""
        if row.get("read_reason"):
            return None, row["read_reason"], row["read_detail"]
        check = inspect_image(row["image_bytes"], self.limits)  # decodes fully: corrupt files end here
        if not check.ok:
            return None, check.reason, check.detail
        image = to_rgb(Image.open(io.BytesIO(row["image_bytes"])))
        image.thumbnail((self.cfg.image_max_side, self.cfg.image_max_side))
        return CaptionRequest(fill_instruction(self.cfg.prompt, captions), image), "", ""


def _row(image_id: str, index: int, text: str, reason: str, detail: str) -> dict[str, Any]:
    return {"image_id": image_id, "index": index, "text": text, "reason": reason, "detail": detail, "num_tokens": 0, "seconds": 0.0}


# ----------------------------------------------------------------- the job
def select_images(cfg: PipelineConfig, version: str) -> tuple[pa.Table, int, int, int]:
    """The items that lack `version` (image_id, uri, sha256, source_captions), the number
    of items, and how many were skipped as captioned / as rejected before.

    Image mode captions the manifest version's images. Text mode expands the captions of
    caption version `text_source`, for the manifest's images when the manifest version
    exists, else for every item of that caption version (a text-only corpus)."""
    rc = cfg.recaption
    dataset = rc.dataset or cfg.ingest.dataset
    manifest = Store(cfg.store.uri, "manifest")
    captions = Store(cfg.store.uri, "captions")
    has_manifest = bool(manifest.commits(dataset))
    if rc.mode == "image" or has_manifest:
        items = manifest.read(dataset, columns=["image_id", "uri", "sha256", "captions"]).rename_columns(
            ["image_id", "uri", "sha256", "source_captions"]
        )
    if rc.mode == "text":
        if not captions.commits(rc.text_source):
            raise ValueError(f"recaption.text_source: caption version {rc.text_source!r} does not exist; have {captions.versions()}")
        # Row order is write order, so an image's first caption stays first.
        source = captions.read(rc.text_source, columns=["image_id", "text"])
        grouped = source.group_by("image_id", use_threads=False).aggregate([("text", "list")])
        lookup = dict(zip(grouped.column("image_id").to_pylist(), grouped.column("text_list").to_pylist()))
        ids = items.column("image_id").to_pylist() if has_manifest else list(lookup)
        items = pa.table({
            "image_id": pa.array(ids, type=pa.string()),
            "uri": pa.array([""] * len(ids), type=pa.string()),
            "sha256": pa.array([""] * len(ids), type=pa.string()),
            "source_captions": pa.array([lookup.get(i, []) for i in ids], type=pa.list_(pa.string())),
        })
    if rc.limit_images is not None:  # the dataset's first N items: a re-run finds them done and skips
        items = items.slice(0, rc.limit_images)
    done = set(captions.read(version, columns=["image_id"]).column("image_id").to_pylist()) if captions.commits(version) else set()
    rejected_before: set[str] = set()
    rejects = Store(cfg.store.uri, "rejects")
    if not rc.retry_rejected and rejects.commits(f"recaption.{version}"):
        previous = rejects.read(f"recaption.{version}", columns=["record_id", "reason"]).to_pylist()
        # A generation error may be the engine's fault, not the input's: always retried.
        rejected_before = {r["record_id"].split("#")[0] for r in previous if r["reason"] != Rejected.GENERATION_ERROR} - done
    ids = items.column("image_id").to_pylist()
    keep = [i not in done and i not in rejected_before for i in ids]
    todo = items.filter(pa.array(keep, type=pa.bool_()))
    skipped = sum(i in done for i in ids)
    skipped_rejected = sum(i in rejected_before for i in ids)
    return todo, items.num_rows, skipped, skipped_rejected


def caption_pass(cfg: PipelineConfig, tracker: Tracker) -> RecaptionResult:
    """Caption what lacks this config's caption version, commit as it goes, and track it in `tracker`'s run."""
    model = recaption_model(cfg)
    cfg = cfg.model_copy(update={"recaption": fit_context(cfg.recaption, model)})
    rc = cfg.recaption
    version = caption_version(rc, model)
    dataset = rc.dataset or cfg.ingest.dataset
    result = RecaptionResult(mode=rc.mode, model=model, caption_version=version, dataset=dataset)
    result.tracked_by(tracker)
    start = time.perf_counter()
    laps = Laps()
    todo, result.input_images, result.skipped, result.skipped_rejected_before = select_images(cfg, version)
    result.skipped += result.skipped_rejected_before

    manifest = Store(cfg.store.uri, "manifest")
    captions = Store(cfg.store.uri, "captions")
    rejects = Store(cfg.store.uri, "rejects")
    inputs = [StoreInput("manifest", dataset, [c.commit_id for c in manifest.commits(dataset)])] if manifest.commits(dataset) else []
    if rc.mode == "text":
        inputs.append(StoreInput("captions", rc.text_source, [c.commit_id for c in captions.commits(rc.text_source)]))
    lineage = Lineage(stage="recaption", inputs=inputs, caption_version=version, mode=rc.mode, model=model,
                      model_fingerprint=model_fingerprint(model), prompt_id=prompt_id(rc), config=rc.model_dump(mode="json"),
                      code=code_version(), mlflow_run_id=tracker.run_id)
    tracker.set_tags({"llm2clip.output.captions": version, "llm2clip.model": model, "llm2clip.store_uri": cfg.store.uri})
    log.info("recaption %s: %d images to caption, %d skipped, version %s", dataset, todo.num_rows, result.skipped, version)
    laps("select")
    if todo.num_rows:
        _caption(cfg, model, version, todo, lineage, result, captions, rejects, laps)
    result.seconds = time.perf_counter() - start
    result.phases = laps.seconds
    if result.input_images != result.captioned + result.skipped + result.rejected:
        raise RuntimeError(f"recaption counts do not reconcile: {result}")

    tracker.log_metrics(
        {"input_images": result.input_images, "captioned": result.captioned, "skipped": result.skipped, "rejected": result.rejected,
         "captions_written": result.captions_written, "generated_tokens": result.generated_tokens,
         "tokens_per_s": result.generated_tokens / result.seconds if result.seconds else 0.0}
        | {f"rejected.{k}": v for k, v in result.reject_reasons.items()}
    )
    tracker.log_dict({"summary": to_json(result), "lineage": lineage.to_json()}, "recaption/summary.json")
    return result


def _caption(cfg: PipelineConfig, model: str, version: str, todo: pa.Table, lineage: Lineage, result: RecaptionResult,
             captions: Store, rejects: Store, laps: Laps) -> None:
    rc = cfg.recaption
    use_gpu = rc.gpus_per_actor > 0
    precision = resolve_precision(rc.dtype, use_gpu)
    # Small blocks so every actor gets work; the table holds ids, uris and short captions only.
    blocks = [todo.slice(i, rc.batch_size) for i in range(0, todo.num_rows, rc.batch_size)]
    ds = ray.data.from_arrow(blocks)
    if rc.mode == "image":
        # Reads are I/O: they reserve no CPU, so they run even when the engines hold every
        # CPU of the cluster, and a small fixed pool bounds how many bytes are in flight.
        ds = ds.map_batches(read_images, fn_kwargs={"limits": cfg.ingest.limits}, batch_format="pyarrow", batch_size=rc.batch_size,
                            num_cpus=0, compute=ray.data.TaskPoolStrategy(size=2 * pool_bounds(rc.actors)[1]))
    out = ds.map_batches(
        CaptionBatch,
        fn_constructor_kwargs=dict(model=model, cfg=rc, precision=precision, use_gpu=use_gpu, limits=cfg.ingest.limits,
                                   trust_remote_code=cfg.models.trust_remote_code),
        batch_size=rc.batch_size,
        batch_format="pyarrow",
        compute=actor_pool(rc.actors),
        num_cpus=rc.cpus_per_actor,
        num_gpus=rc.gpus_per_actor,
        resources=rc.resources_per_actor or None,
    )
    existing = captions.keys(version)
    rejected_images: dict[str, list[str]] = {}
    captioned_images: set[str] = set()
    pending_captions: list[dict] = []
    pending_rejects: list[dict] = []
    stage = f"recaption.{version}"
    pid = prompt_id(rc)

    def flush() -> None:
        if pending_captions:
            with captions.begin(version, lineage, existing_keys=existing) as txn:
                txn.write(pa.Table.from_pylist(pending_captions, schema=STORE_SCHEMAS["captions"]))
                commit = txn.commit({"captions": len(pending_captions)})
            if commit:
                result.commits.append(commit.commit_id)
                result.captions_written += commit.num_rows
            existing.update((r["caption_id"],) for r in pending_captions)
            pending_captions.clear()
        if pending_rejects:
            rejects.append(stage, pa.Table.from_pylist(pending_rejects, schema=STORE_SCHEMAS["rejects"]), lineage)
            pending_rejects.clear()

    multi = rc.sampling.captions_per_image > 1
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        laps("stream" if "first_batch" in laps.seconds else "first_batch")  # the first: actors and engines start
        now = utc_now()
        result.generated_tokens += int(pc.sum(batch.column("num_tokens")).as_py() or 0)
        result.engine_seconds += float(pc.sum(batch.column("seconds")).as_py() or 0.0)
        for row in batch.to_pylist():
            image_id = row["image_id"]
            if row["reason"]:
                record = f"{image_id}#{row['index']}" if multi and row["text"] else image_id
                pending_rejects.append(reject_row("recaption", record, row["reason"], row["detail"], now))
                rejected_images.setdefault(image_id, []).append(row["reason"])
                result.captions_rejected += 1
                continue
            captioned_images.add(image_id)
            pending_captions += caption_rows(image_id, [row["text"]], version, rc.source, now, model=model, prompt_id=pid, first_index=row["index"])
            if len(result.samples) < 20:
                result.samples.append({"image_id": image_id, "text": row["text"]})
        laps("rows")
        if len(pending_captions) >= rc.commit_every:
            flush()
            laps("commits")
            log.info("recaption: %d captions committed (%d/%d images done)", result.captions_written,
                     len(captioned_images | set(rejected_images)), todo.num_rows)
    laps("stream")
    flush()
    laps("commits")
    rejected_only = set(rejected_images) - captioned_images
    result.captioned = len(captioned_images)
    result.rejected = len(rejected_only)
    result.reject_reasons = dict(Counter(reason for i in rejected_only for reason in rejected_images[i]))
