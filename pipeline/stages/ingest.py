"""`ingest`: images + original captions -> image manifest, caption store, rejects.

Ray Data reads and checks every image in parallel (bytes never reach the driver); the
driver streams the small per-image results, assigns stable image_ids, skips images the
manifest version already has, and commits each store atomically. Re-ingesting the same
listing adds nothing; every input row ends as added, skipped or rejected.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from pipeline.config import ImageLimits, PipelineConfig
from pipeline.embedded import write_embedded_dataset
from pipeline.images import (
    ImageCheck,
    Reject,
    image_id_for,
    inspect_image,
    read_image_bytes,
)
from pipeline.listing import read_listing
from pipeline.plans import StagePlan
from pipeline.stages.tracking import Tracker
from pipeline.store import Store, reject_row, utc_now
from pipeline.versioning import code_version, stable_hash
from schemas import STORE_SCHEMAS

ORIGINAL_VERSION = "original"  # caption_version of the listing's short captions
PROVIDED_VERSION = "provided"  # caption_version of dense captions given in the listing

_CHECK_FIELDS = [
    ("ok", pa.bool_()),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("mode", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
]


@dataclass
class IngestResult:
    dataset: str
    source: str
    listing: str
    input_rows: int = 0
    added: int = 0
    skipped: int = 0
    rejected: int = 0
    captions_added: int = 0
    reject_reasons: Counter = field(default_factory=Counter)
    commits: dict[str, str | None] = field(default_factory=dict)
    store_uri: str = ""
    mlflow_url: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "stage": "ingest",
            "dataset (manifest version)": self.dataset,
            "listing": self.listing,
            "input rows": self.input_rows,
            "added": self.added,
            "skipped (already in manifest)": self.skipped,
            "rejected": self.rejected,
            "reject reasons": dict(self.reject_reasons),
            "original/dense captions added": self.captions_added,
            "store": self.store_uri,
            "commits": self.commits,
            "mlflow run": self.mlflow_url,
        }


def check_images(batch: pa.Table, limits: ImageLimits) -> pa.Table:
    """Ray Data UDF: read and check each row's image; append the check's columns."""
    results = {name: [] for name, _ in _CHECK_FIELDS}
    for uri in batch.column("uri").to_pylist():
        check = _check_one(uri, limits)
        for name, _ in _CHECK_FIELDS:
            results[name].append(getattr(check, name))
    for name, type_ in _CHECK_FIELDS:
        batch = batch.append_column(name, pa.array(results[name], type=type_))
    return batch


def _check_one(uri: str, limits: ImageLimits) -> ImageCheck:
    data, reason, detail = read_image_bytes(uri, limits.max_bytes)
    if data is None:
        return ImageCheck(False, reason=reason, detail=detail)
    return inspect_image(data, limits)


def assign_split(image_id: str, fractions: tuple[float, float, float]) -> str:
    """Deterministic split from the image id, so an image keeps its split on every run."""
    u = int(image_id[:8], 16) / 0x100000000
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def caption_rows(
    image_id: str, texts: list[str], caption_version: str, source: str, now, model: str = "", prompt_id: str = "", first_index: int = 0
) -> list[dict]:
    """Caption-store rows; the caption_id hashes (image, version, source, position, text)."""
    return [
        {
            "caption_id": stable_hash([image_id, caption_version, source, i, text], 16),
            "image_id": image_id,
            "text": text,
            "source": source,
            "caption_version": caption_version,
            "model": model,
            "prompt_id": prompt_id,
            "created_at": now,
        }
        for i, text in enumerate(texts, start=first_index)
    ]


def resolve_source(cfg: PipelineConfig) -> str:
    """The listing to ingest: the rendered embedded dataset, or what the user gave."""
    if cfg.ingest.source == "embedded":
        return str(write_embedded_dataset(Path(cfg.run_dir) / "datasets", cfg.embedded))
    return cfg.ingest.source


def plan_ingest(cfg: PipelineConfig) -> StagePlan:
    """Skipped when the manifest version already holds a commit of this very listing (same
    bytes); a folder source is listed anew each time (its new images are the point)."""
    dataset = cfg.ingest.dataset
    listing = resolve_source(cfg)
    sha = _file_sha256(listing)
    commits = Store(cfg.store.uri, "manifest").commits(dataset)
    if sha and any(i.get("sha256") == sha for c in commits for i in c.lineage.get("inputs", [])):
        return StagePlan("ingest", dataset, True, f"manifest {dataset} already holds listing {Path(listing).name} (sha256 {sha[:12]})")
    why = "a folder source is listed each run" if sha is None else f"listing {Path(listing).name} not ingested yet"
    return StagePlan("ingest", dataset, False, why)


def run_ingest(cfg: PipelineConfig, tracker: Tracker) -> IngestResult:
    icfg = cfg.ingest
    listing_path = resolve_source(cfg)
    listing = read_listing(listing_path, icfg)
    result = IngestResult(dataset=icfg.dataset, source=icfg.source, listing=listing_path, input_rows=listing.num_rows)
    result.store_uri = cfg.store.uri

    manifest = Store(cfg.store.uri, "manifest")
    captions = Store(cfg.store.uri, "captions")
    rejects = Store(cfg.store.uri, "rejects")
    lineage = {
        "stage": "ingest",
        "inputs": [{"kind": "listing", "uri": listing_path, "sha256": _file_sha256(listing_path)}],
        "config": icfg.model_dump(mode="json"),
        "code": code_version(),
        "mlflow_run_id": tracker.run_id,
    }
    existing = {k[0] for k in manifest.keys(icfg.dataset)}
    seen: dict[str, str] = {}  # image_id -> first uri of this run

    blocks = [listing.slice(i, icfg.batch_size) for i in range(0, listing.num_rows, icfg.batch_size)] or [listing]
    checked = ray.data.from_arrow(blocks).map_batches(
        check_images,
        fn_kwargs={"limits": icfg.limits},
        batch_format="pyarrow",
        batch_size=icfg.batch_size,
        compute=ray.data.TaskPoolStrategy(size=icfg.concurrency) if icfg.concurrency else None,
    )
    with (
        manifest.begin(icfg.dataset, lineage) as m_txn,
        captions.begin(ORIGINAL_VERSION, lineage) as o_txn,
        captions.begin(PROVIDED_VERSION, lineage) as p_txn,
        rejects.begin(f"ingest.{icfg.dataset}", lineage) as r_txn,
    ):
        for batch in checked.iter_batches(batch_format="pyarrow", batch_size=icfg.batch_size):
            now = utc_now()
            m_rows, o_rows, p_rows, r_rows = [], [], [], []
            for row in batch.to_pylist():
                if not row["ok"]:
                    r_rows.append(reject_row("ingest", row["uri"] or f"row {row['row']}", row["reason"], row["detail"], now))
                    continue
                image_id = image_id_for(row["sha256"])
                if image_id in seen:
                    detail = f"same bytes as {seen[image_id]} (image_id {image_id})"
                    r_rows.append(reject_row("ingest", row["uri"], Reject.DUPLICATE, detail, now))
                    continue
                seen[image_id] = row["uri"]
                if image_id in existing:
                    result.skipped += 1
                    continue
                m_rows.append(
                    {
                        "image_id": image_id,
                        "uri": row["uri"],
                        "sha256": row["sha256"],
                        "width": row["width"],
                        "height": row["height"],
                        "mode": row["mode"],
                        "split": row["split"] or assign_split(image_id, icfg.split_fractions),
                        "captions": row["captions"],
                        "metadata": row["metadata"],
                        "ingested_at": now,
                    }
                )
                o_rows += caption_rows(image_id, row["captions"], ORIGINAL_VERSION, "original", now)
                p_rows += caption_rows(image_id, row["dense_captions"], PROVIDED_VERSION, "dense", now)
            result.rejected += len(r_rows)
            result.reject_reasons.update(r["reason"] for r in r_rows)
            result.added += m_txn.write(_table(m_rows, manifest)) if m_rows else 0
            result.captions_added += o_txn.write(_table(o_rows, captions)) if o_rows else 0
            result.captions_added += p_txn.write(_table(p_rows, captions)) if p_rows else 0
            if r_rows:
                r_txn.write(_table(r_rows, rejects))
        # Captions first: a manifest row is never visible without its captions.
        counts = {"input_rows": result.input_rows, "added": result.added, "skipped": result.skipped, "rejected": result.rejected}
        for name, txn in (("captions.original", o_txn), ("captions.provided", p_txn), ("rejects", r_txn), ("manifest", m_txn)):
            commit = txn.commit({"counts": counts})
            result.commits[name] = commit.commit_id if commit else None

    if result.input_rows != result.added + result.skipped + result.rejected:
        raise RuntimeError(f"ingest counts do not reconcile: {result.summary()}")
    tracker.log_metrics({k: v for k, v in counts.items()} | {"captions_added": result.captions_added})
    tracker.log_metrics({f"rejected.{k}": v for k, v in result.reject_reasons.items()})
    tracker.set_tags(
        {
            "llm2clip.output.manifest": icfg.dataset,
            "llm2clip.store_uri": cfg.store.uri,
            **{f"llm2clip.commit.{k}": v for k, v in result.commits.items() if v},
        }
    )
    tracker.log_dict(result.summary(), "ingest/summary.json")
    result.mlflow_url = tracker.url
    return result


def _table(rows: list[dict], store: Store) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STORE_SCHEMAS[store.name])


def _file_sha256(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    return hashlib.sha256(p.read_bytes()).hexdigest()

