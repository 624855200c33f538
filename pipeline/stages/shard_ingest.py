"""WebDataset shards ingested: each new shard read and checked in one Ray Data task, its
samples filed by `IngestWriter`, committed a shard group at a time.

A shard is read in one sequential pass (`pipeline.shards.read_shard`); every image is checked
as it streams by (the bytes are dropped at once) and kept as a member reference, so later stages
read it from the shard by byte range. Captions come from the sample's `.txt` and from the
`.json` fields named in `ingest.caption_columns` (and `caption`, img2dataset's name);
`ingest.dense_caption_columns` gives dense captions. With img2dataset's `{shard}.parquet`
beside a shard, its rows are used too: a failed download is a reject (`download_failed`, with
img2dataset's error), a success the shard lacks is `missing_from_shard`, and its `caption`
fills in for a sample without one.

Refreshes and kills: every row of a shard is recorded in `sources` under the shard's size and
mtime, in the same commit as its images. A shard whose rows are recorded at its current size
and mtime is skipped unopened (its rows counted from the record); a killed ingest keeps the
shards it committed, and the re-run reads only the others. Commits happen between whole
shards, every `ingest.commit_seconds`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline import shards, uri
from pipeline.config import ImageLimits, IngestConfig
from pipeline.faults import crash_point
from pipeline.images import Reject, inspect_image
from pipeline.lineage import Lineage, ListingInput
from pipeline.listing import VALID_SPLITS, stat_locations
from pipeline.stages.ingest_writer import ACCEPTED, IngestResult, IngestWriter, Prior
from pipeline.store import utc_now
from pipeline.versioning import code_version

#: One checked sample, as a shard task returns it (the writer's row, plus its shard).
CHECKED_SCHEMA = pa.schema([
    ("row", pa.int64()), ("uri", pa.string()), ("captions", pa.list_(pa.string())), ("dense_captions", pa.list_(pa.string())),
    ("split", pa.string()), ("metadata", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
    ("ok", pa.bool_()), ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("mode", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("shard", pa.string()), ("shard_rows", pa.int64()),
])
IMG2DATASET_CAPTION = "caption"  # img2dataset's caption field (.json) and column (.parquet)


def check_shards(batch: pa.Table, limits: ImageLimits, caption_fields: list[str], dense_fields: list[str]) -> pa.Table:
    """Ray Data UDF: read and check every sample of each shard in the batch."""
    rows = [row for shard, size, mtime in zip(*(batch.column(c).to_pylist() for c in ("shard", "size", "mtime_ns")))
            for row in check_shard(shard, size, mtime, limits, caption_fields, dense_fields)]
    return pa.Table.from_pylist(rows, schema=CHECKED_SCHEMA)


def check_shard(shard: str, size: int, mtime_ns: int, limits: ImageLimits, caption_fields: list[str],
                dense_fields: list[str]) -> list[dict]:
    """One row per sample of the shard (and per img2dataset row it lacks, per damaged region)."""
    read = shards.read_shard(shard, lambda data: inspect_image(data, limits))
    listed = _img2dataset_rows(shard)
    rows: list[dict] = []

    def row(location: str, ok: bool, reason: str = "", detail: str = "", check=None, captions=(), dense=(), split=None, meta=None):
        rows.append({"row": len(rows), "uri": location, "captions": list(captions), "dense_captions": list(dense), "split": split,
                     "metadata": meta, "size": size, "mtime_ns": mtime_ns, "ok": ok, "sha256": check.sha256 if check else "",
                     "width": check.width if check else 0, "height": check.height if check else 0, "mode": check.mode if check else "",
                     "reason": reason, "detail": detail, "shard": shard})

    for key, sample in read.samples.items():
        meta = sample.meta if isinstance(sample.meta, dict) else {}
        extra = listed.get(key, {})
        captions = _texts([t.strip() for t in sample.texts], *(meta.get(f) for f in [*caption_fields, IMG2DATASET_CAPTION]))
        captions = captions or _texts(extra.get(IMG2DATASET_CAPTION))
        dense = _texts(*(meta.get(f) for f in dense_fields))
        split = meta.get("split") if meta.get("split") in VALID_SPLITS else None
        source = json.dumps({"shard": shard, "key": key, **({"json": meta} if meta else {})}, sort_keys=True, default=str)
        if sample.image_ref is None:
            reason = Reject.TRUNCATED if sample.damage else Reject.NO_IMAGE_MEMBER
            row(shards.sample_uri(shard, key), False, reason, sample.damage or f"sample {key} of {shard} has no image member")
            continue
        check = sample.image
        if check.ok:
            row(str(sample.image_ref), True, check=check, captions=captions, dense=dense, split=split, meta=source)
        else:
            row(str(sample.image_ref), False, check.reason, f"{sample.image_ref.member}: {check.detail}", check=check)
    for start, end in read.damaged:
        row(shards.region_uri(shard, start), False, Reject.TRUNCATED, f"bytes {start}..{end} of {shard} are no tar member (a damaged header)")
    if read.truncated and not any(s.damage for s in read.samples.values()):
        row(shards.region_uri(shard, -1), False, Reject.TRUNCATED, f"{shard}: {read.truncated}")
    for key, extra in listed.items():
        if key in read.samples:
            continue
        if extra.get("status") == "success":
            row(shards.sample_uri(shard, key), False, Reject.MISSING_FROM_SHARD, f"img2dataset downloaded {key}, {shard} lacks it")
        else:
            row(shards.sample_uri(shard, key), False, Reject.DOWNLOAD_FAILED, str(extra.get("error_message") or extra.get("status")))
    for r in rows:
        r["shard_rows"] = len(rows)
    return rows


def _texts(*values) -> list[str]:
    """Non-empty stripped texts of strings and lists of strings, in order, without repeats."""
    out: list[str] = []
    for value in values:
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str) and text.strip() and text.strip() not in out:
                out.append(text.strip())
    return out


def _img2dataset_rows(shard: str) -> dict[str, dict]:
    """img2dataset's parquet beside a shard, by key ({} when there is none)."""
    location = shards.companion(shard, ".parquet")
    if not uri.is_file(location):
        return {}
    fs, path = uri.filesystem(location)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    wanted = [c for c in ("key", "status", "error_message", IMG2DATASET_CAPTION) if c in table.column_names]
    if "key" not in wanted:
        return {}
    return {r["key"]: r for r in table.select(wanted).to_pylist()}


def ingest_shards(store_uri: str, icfg: IngestConfig, source: str, run_id: str | None = None) -> IngestResult:
    """Ingest the WebDataset shards of `source` into manifest version `icfg.dataset`."""
    located = shards.shard_locations(source)
    if not located:
        raise uri.LocationError(f"ingest source {source}: no .tar shards there")
    stats = stat_locations(located).sort_by("uri")
    result = IngestResult(dataset=icfg.dataset, source=icfg.source, listing=source, store_uri=store_uri, shards=stats.num_rows)
    lineage = Lineage(stage="ingest", inputs=[ListingInput("shards", source, None)], config=icfg.model_dump(mode="json"),
                      code=code_version(), mlflow_run_id=run_id)
    prior = Prior.of(store_uri, icfg)
    known, todo = _known_shards(stats, prior.recorded, prior.existing_ids, prior.limits_key)
    result.shards_skipped = len(known)

    with IngestWriter(store_uri, icfg, lineage, result, prior.limits_key, set(prior.existing_ids.to_pylist())) as writer:
        for count in known.values():
            result.input_rows += count.rows
            result.unchanged += count.rows
            result.skipped += count.accepted
            result.rejected += count.rows - count.accepted
            writer.reasons.update(count.reasons)
        pending: dict[str, int] = {}  # shard -> rows still to come
        last_commit = time.monotonic()
        for batch in _checked(todo, icfg):
            now = utc_now()
            for row in batch.to_pylist():
                shard, rows_in_shard = row.pop("shard"), row.pop("shard_rows")
                left = pending.get(shard, rows_in_shard) - 1
                pending[shard] = left
                if not left:
                    del pending[shard]
                result.input_rows += 1
                result.opened += row["sha256"] != ""
                writer.add(row, now)
            writer.flush()
            if not pending and time.monotonic() - last_commit >= icfg.commit_seconds:  # between whole shards only
                writer.commit(reopen=True)
                crash_point("ingest.shards_committed")
                last_commit = time.monotonic()
        writer.commit()
    result.reconcile()
    return result


@dataclass
class _ShardCount:
    """What `sources` recorded of a shard: its rows, the accepted ones, the rejects by reason."""

    rows: int = 0
    accepted: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _known_shards(stats: pa.Table, recorded: pa.Table | None, existing_ids: pa.Array, limits_key: str) -> tuple[dict, pa.Table]:
    """Shards whose rows `sources` recorded at their current size and mtime (and whose accepted
    images are in the manifest version): their counts; and the table of the shards to read.
    Counted in Arrow: a row per shard and reason reaches Python, not a row per sample."""
    found = stats.filter(pc.fill_null(stats.column("found"), False))
    known: dict[str, _ShardCount] = {}
    if recorded is not None and recorded.num_rows:
        shard = pc.replace_substring_regex(recorded.column("uri"), shards.FRAGMENT_REGEX, "")
        rows = recorded.append_column("shard", shard).join(found.select(["uri", "size", "mtime_ns"]).rename_columns(
            ["shard", "shard_size", "shard_mtime"]), keys="shard", join_type="inner")
        current = pc.and_(pc.equal(rows.column("size"), rows.column("shard_size")), pc.equal(rows.column("mtime_ns"), rows.column("shard_mtime")))
        rows = rows.filter(current).select(["shard", "uri", "checked_with", "outcome", "image_id", "reason"])
        # Under other image limits a reject may be decided differently: a shard is known when
        # every one of its samples has a row that holds under these limits (an accepted image's
        # row holds under any), and each sample counts once, accepted before rejected.
        allowed = rows.filter(pc.is_in(rows.column("checked_with"), value_set=pa.array(["", limits_key])))
        accepted = allowed.filter(pc.equal(allowed.column("outcome"), ACCEPTED))
        stale = accepted.filter(pc.invert(pc.fill_null(pc.is_in(accepted.column("image_id"), value_set=existing_ids), False)))
        rejected = allowed.filter(pc.invert(pc.is_in(allowed.column("uri"), value_set=accepted.column("uri").combine_chunks())))

        def per_shard(table: pa.Table) -> dict[str, int]:
            counted = table.group_by("shard").aggregate([("uri", "count_distinct")])
            return dict(zip(counted.column("shard").to_pylist(), counted.column("uri_count_distinct").to_pylist()))

        samples, covered, accepted_n = per_shard(rows), per_shard(allowed), per_shard(accepted)
        unusable = set(stale.column("shard").to_pylist())  # an accepted image the manifest lacks: read again
        for shard, n in samples.items():
            if covered.get(shard) == n and shard not in unusable:
                known[shard] = _ShardCount(n, accepted_n.get(shard, 0))
        by_reason = rejected.group_by(["shard", "reason"]).aggregate([("uri", "count_distinct")])
        for shard, reason, n in zip(*(by_reason.column(c).to_pylist() for c in ("shard", "reason", "uri_count_distinct"))):
            if shard in known:
                known[shard].reasons[reason] = n
    todo = found.filter(pc.invert(pc.is_in(found.column("uri"), value_set=pa.array(list(known), pa.string()))))
    return known, todo.select(["uri", "size", "mtime_ns"]).rename_columns(["shard", "size", "mtime_ns"])


def _checked(todo: pa.Table, icfg: IngestConfig):
    """Each shard's checked rows, from one Ray Data task per shard (nothing to read: no Ray at all)."""
    if todo.num_rows == 0:
        return
    checked = ray.data.from_arrow([todo.slice(i, 1) for i in range(todo.num_rows)]).map_batches(
        check_shards,
        fn_kwargs={"limits": icfg.limits, "caption_fields": icfg.caption_columns, "dense_fields": icfg.dense_caption_columns},
        batch_format="pyarrow", batch_size=1,
        compute=ray.data.TaskPoolStrategy(size=icfg.concurrency) if icfg.concurrency else None,
    )
    yield from checked.iter_batches(batch_format="pyarrow", batch_size=None)
