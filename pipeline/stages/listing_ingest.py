"""A listing ingested: every image read and checked in Ray Data, then committed to the image
manifest, the caption store (its `original` and `provided` captions) and the rejects store.

Bytes never reach the driver: it streams the small per-image results, assigns stable
image_ids, skips images the manifest version already has, and commits each store atomically
(captions first: a manifest row is never visible without its captions). Every input row ends as
added, skipped or rejected. The ingest stage runs it on the user's listing; evaluate runs it on
the listings its set adapters write.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import ray

from pipeline.captions import ORIGINAL_VERSION, PROVIDED_VERSION, caption_rows
from pipeline.config import ImageLimits, IngestConfig
from pipeline.images import ImageCheck, Reject, image_id_for, inspect_image, read_image_bytes
from pipeline.lineage import Lineage, ListingInput
from pipeline.listing import read_listing
from pipeline.records import Tracked, label
from pipeline.splits import assign_split
from pipeline.store import Store, reject_row, utc_now
from pipeline.versioning import code_version
from schemas import STORE_SCHEMAS

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
class IngestResult(Tracked):
    dataset: str = label("dataset (manifest version)")
    source: str
    listing: str
    input_rows: int = 0
    added: int = 0
    skipped: int = label("skipped (already in manifest)", default=0)
    rejected: int = 0
    captions_added: int = label("original/dense captions added", default=0)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    commits: dict[str, str | None] = field(default_factory=dict)  # store (and caption version) -> its commit, None: nothing new
    store_uri: str = label("store", default="")


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


def listing_sha256(path: str) -> str | None:
    """The listing file's sha256; None for a folder source (listed anew each time)."""
    p = Path(path)
    if not p.is_file():
        return None
    return hashlib.sha256(p.read_bytes()).hexdigest()


def ingest_listing(store_uri: str, icfg: IngestConfig, listing_path: str, run_id: str | None = None) -> IngestResult:
    """Ingest `listing_path` into manifest version `icfg.dataset` under `store_uri`."""
    listing = read_listing(listing_path, icfg)
    result = IngestResult(dataset=icfg.dataset, source=icfg.source, listing=listing_path, input_rows=listing.num_rows, store_uri=store_uri)
    manifest, captions, rejects = (Store(store_uri, n) for n in ("manifest", "captions", "rejects"))
    lineage = Lineage(stage="ingest", inputs=[ListingInput("listing", listing_path, listing_sha256(listing_path))],
                      config=icfg.model_dump(mode="json"), code=code_version(), mlflow_run_id=run_id)
    existing = {k[0] for k in manifest.keys(icfg.dataset)}
    seen: dict[str, str] = {}  # image_id -> first uri of this run
    reasons = Counter()

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
            reasons.update(r["reason"] for r in r_rows)
            result.added += m_txn.write(_table(m_rows, manifest)) if m_rows else 0
            result.captions_added += o_txn.write(_table(o_rows, captions)) if o_rows else 0
            result.captions_added += p_txn.write(_table(p_rows, captions)) if p_rows else 0
            if r_rows:
                r_txn.write(_table(r_rows, rejects))
        # Captions first: a manifest row is never visible without its captions.
        counts = {"input_rows": result.input_rows, "added": result.added, "skipped": result.skipped, "rejected": result.rejected}
        for name, txn in (("captions.original", o_txn), ("captions.provided", p_txn), ("rejects", r_txn), ("manifest", m_txn)):
            commit = txn.commit(counts)
            result.commits[name] = commit.commit_id if commit else None
    result.reject_reasons = dict(reasons)
    if result.input_rows != result.added + result.skipped + result.rejected:
        raise RuntimeError(f"ingest counts do not reconcile: {result}")
    return result


def _table(rows: list[dict], store: Store) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STORE_SCHEMAS[store.name])
