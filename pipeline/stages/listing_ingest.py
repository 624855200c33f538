"""A listing ingested: every new image read and checked in Ray Data, then committed to the image
manifest, the caption store (its `original` and `provided` captions) and the rejects store.

Bytes never reach the driver: it streams the small per-image results, assigns stable
image_ids, skips images the manifest version already has, and commits each store atomically
(captions first: a manifest row is never visible without its captions). Every input row ends as
added, skipped or rejected. The ingest stage runs it on the user's listing; evaluate runs it on
the listings its set adapters write.

Refreshes at scale: a row is identified by (uri, size, mtime). The driver gets sizes and mtimes
in bulk (`listing.stat_locations`: one listing per folder or prefix), and the `sources` store
records, per manifest version, the identity of every row whose bytes were read and what they
were (an image in the manifest, or a reject that depends on the bytes alone). A row whose
identity is recorded is skipped (or rejected again) without opening it; only new or changed
rows go to Ray Data. A missing file or an oversized one is rejected from its listing entry
without opening it; an unreadable one is retried on every refresh.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline import uri
from pipeline.config import ImageLimits, IngestConfig
from pipeline.images import ImageCheck, Reject, inspect_image, read_image_bytes
from pipeline.lineage import Lineage, ListingInput
from pipeline.listing import read_listing, sidecar_captions, stat_locations
from pipeline.stages.ingest_writer import ACCEPTED, IngestResult, IngestWriter, Prior
from pipeline.store import reject_row, utc_now
from pipeline.versioning import code_version

_CHECK_FIELDS = [
    ("ok", pa.bool_()),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("mode", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
]
#: What the check tasks get of a listing row.
_CHECK_INPUT = ["row", "uri", "captions", "dense_captions", "split", "metadata", "sidecar", "size", "mtime_ns"]


def check_images(batch: pa.Table, limits: ImageLimits) -> pa.Table:
    """Ray Data UDF: read and check each row's image (and read its sidecar captions, if any);
    append the check's columns."""
    results = {name: [] for name, _ in _CHECK_FIELDS}
    sizes = batch.column("size").to_pylist() if "size" in batch.column_names else [None] * batch.num_rows
    for location, size in zip(batch.column("uri").to_pylist(), sizes):
        check = _check_one(location, size, limits)
        for name, _ in _CHECK_FIELDS:
            results[name].append(getattr(check, name))
    for name, type_ in _CHECK_FIELDS:
        batch = batch.append_column(name, pa.array(results[name], type=type_))
    if "sidecar" in batch.column_names and batch.column("sidecar").null_count < batch.num_rows:
        captions = [sidecar_captions(s) if s else c for s, c in zip(batch.column("sidecar").to_pylist(), batch.column("captions").to_pylist())]
        batch = batch.set_column(batch.schema.get_field_index("captions"), "captions", pa.array(captions, pa.list_(pa.string())))
    return batch


def _check_one(location: str, size: int | None, limits: ImageLimits) -> ImageCheck:
    if size is None:  # not stat'ed: one lookup before the read (a huge file is refused unread)
        data, reason, detail = read_image_bytes(location, limits.max_bytes)
    elif size > limits.max_bytes:
        data, reason, detail = None, Reject.FILE_TOO_LARGE, f"{size} bytes > limit {limits.max_bytes}"
    else:
        data, reason, detail = _read(location)
    if data is None:
        return ImageCheck(False, reason=reason, detail=detail)
    return inspect_image(data, limits)


def _read(location: str) -> tuple[bytes | None, str, str]:
    """A file whose size is known: read it at once (through this process's filesystem per bucket)."""
    try:
        return uri.read_bytes(location), "", ""
    except FileNotFoundError:
        return None, Reject.MISSING_FILE, f"no file at {location}"
    except OSError as e:
        return None, Reject.UNREADABLE, f"{type(e).__name__}: {e}"


def listing_sha256(location: str) -> str | None:
    """The sha256 of a listing file (or of a single image source); None for a folder or prefix
    (listed anew each time) or a location that cannot be read."""
    try:
        if not uri.is_file(uri.absolute(location)):
            return None
        fs, path = uri.filesystem(uri.absolute(location))
        digest = hashlib.sha256()
        with fs.open_input_stream(path) as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None


def ingest_listing(store_uri: str, icfg: IngestConfig, listing_path: str, run_id: str | None = None) -> IngestResult:
    """Ingest `listing_path` (a listing, a folder or prefix, or an image; a path or a URI) into
    manifest version `icfg.dataset` under `store_uri`."""
    listing = _with_stats(read_listing(listing_path, icfg, read_sidecars=False))
    result = IngestResult(dataset=icfg.dataset, source=icfg.source, listing=listing_path, input_rows=listing.num_rows, store_uri=store_uri)
    lineage = Lineage(stage="ingest", inputs=[ListingInput("listing", listing_path, listing_sha256(listing_path))],
                      config=icfg.model_dump(mode="json"), code=code_version(), mlflow_run_id=run_id)
    prior = Prior.of(store_uri, icfg)
    triage = _triage(listing, prior.recorded, prior.existing_ids, prior.limits_key, icfg.limits.max_bytes)
    result.skipped, result.unchanged = triage.known_accepted, triage.known_accepted + sum(triage.known_reasons.values())
    result.rejected = sum(triage.known_reasons.values())

    with IngestWriter(store_uri, icfg, lineage, result, prior.limits_key, set(prior.existing_ids.to_pylist())) as writer:
        writer.reasons.update(triage.known_reasons)
        for row in triage.driver_rejects(utc_now()):
            writer.reject(row)
        for batch in _checked(triage.to_check, icfg):
            now = utc_now()
            result.opened += batch.num_rows
            for row in batch.to_pylist():
                writer.add(row, now)
            writer.flush()
        writer.commit()
    result.reconcile()
    return result


def _checked(rows: pa.Table, icfg: IngestConfig):
    """The rows' check results, in batches, from Ray Data tasks (nothing to do: no Ray at all)."""
    if rows.num_rows == 0:
        return
    blocks = [rows.slice(i, icfg.batch_size) for i in range(0, rows.num_rows, icfg.batch_size)]
    checked = ray.data.from_arrow(blocks).map_batches(
        check_images,
        fn_kwargs={"limits": icfg.limits},
        batch_format="pyarrow",
        batch_size=icfg.batch_size,
        compute=ray.data.TaskPoolStrategy(size=icfg.concurrency) if icfg.concurrency else None,
    )
    yield from checked.iter_batches(batch_format="pyarrow", batch_size=icfg.batch_size)


def _with_stats(listing: pa.Table) -> pa.Table:
    """The listing with every row's size and mtime (`found`: False when the file is not there,
    null when nobody could tell), one listing per folder or prefix for the rows that lack them."""
    if listing.column("size").null_count == 0:
        return listing.append_column("found", pa.array(np.ones(listing.num_rows, dtype=bool)))
    stats = stat_locations(listing.column("uri"))
    narrow = pa.table({"row": listing.column("row"), "uri": listing.column("uri")})
    joined = narrow.join(stats, keys="uri", join_type="left outer").sort_by("row")  # one stat per uri: n rows, in order
    listing = listing.set_column(listing.schema.get_field_index("size"), "size", joined.column("size"))
    listing = listing.set_column(listing.schema.get_field_index("mtime_ns"), "mtime_ns", joined.column("mtime_ns"))
    return listing.append_column("found", joined.column("found"))


@dataclass
class _Triage:
    """Where each listing row goes before any image is opened."""

    listing: pa.Table
    driver: np.ndarray  # rejected from its listing entry alone: no path, no file, over max_bytes
    to_check: pa.Table  # new or changed: opened in Ray Data
    known_accepted: int = 0  # its identity is recorded and its image is in the manifest: skipped unopened
    known_reasons: dict[str, int] = field(default_factory=dict)  # recorded rejects: rejected again unopened
    max_bytes: int = 0

    def driver_rejects(self, now) -> list[dict]:
        rows = self.listing.filter(pa.array(self.driver)).select(["row", "uri", "size", "found"]).to_pylist()
        out = []
        for r in rows:
            if not r["uri"]:
                out.append(reject_row("ingest", f"row {r['row']}", Reject.MISSING_FILE, "no image path", now))
            elif r["found"] is False:
                out.append(reject_row("ingest", r["uri"], Reject.MISSING_FILE, f"no file at {r['uri']}", now))
            else:
                out.append(reject_row("ingest", r["uri"], Reject.FILE_TOO_LARGE, f"{r['size']} bytes > limit {self.max_bytes}", now))
        return out


def _triage(listing: pa.Table, recorded: pa.Table | None, existing_ids: pa.Array, limits_key: str, max_bytes: int) -> _Triage:
    n = listing.num_rows
    empty = pc.equal(listing.column("uri"), "").to_numpy(zero_copy_only=False)
    missing = pc.fill_null(pc.equal(listing.column("found"), False), False).to_numpy(zero_copy_only=False)
    too_big = pc.fill_null(pc.greater(listing.column("size"), max_bytes), False).to_numpy(zero_copy_only=False)
    driver = empty | missing | too_big
    known = np.zeros(n, dtype=bool)
    accepted = 0
    reasons: dict[str, int] = {}
    if recorded is not None and recorded.num_rows and n:
        keys = ["uri", "size", "mtime_ns"]
        narrow = listing.select(["row", *keys])
        # accepted images (and duplicates of them) are recorded under '' (limits do not matter once an
        # image is in the manifest); other rejects under the limits they failed
        for checked_with in ("", limits_key):
            entries = recorded.filter(pc.equal(recorded.column("checked_with"), checked_with)).select([*keys, "outcome", "image_id", "reason"])
            if entries.num_rows == 0:
                continue
            match = narrow.join(entries, keys=keys, join_type="left outer").sort_by("row")  # keys are unique: n rows
            hit = pc.is_valid(match.column("outcome"))
            if checked_with == "":  # only while its image is still in the manifest version
                hit = pc.and_(hit, pc.fill_null(pc.is_in(match.column("image_id"), value_set=existing_ids), False))
            hit = hit.to_numpy(zero_copy_only=False) & ~known & ~driver
            known |= hit
            outcome = match.column("outcome").filter(pa.array(hit))
            accepted += int(pc.sum(pc.equal(outcome, ACCEPTED)).as_py() or 0)
            for item in pc.value_counts(match.column("reason").filter(pa.array(hit)).drop_null()).to_pylist():
                reasons[item["values"]] = reasons.get(item["values"], 0) + item["counts"]
    to_check = listing.filter(pa.array(~(driver | known))).select(_CHECK_INPUT)
    return _Triage(listing, driver, to_check, accepted, reasons, max_bytes)
