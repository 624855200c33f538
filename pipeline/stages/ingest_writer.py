"""What an ingest commits, and how: the typed result and the writer that files checked rows
into the image manifest, the caption store (`original` and `provided`), the rejects store and
the `sources` store, and commits them.

Both ingest paths use it: a listing (`listing_ingest`, one commit at the end) and WebDataset
shards (`shard_ingest`, a commit every `ingest.commit_seconds` between whole shards, so a
killed ingest keeps its committed shards). A commit writes captions first (a manifest row is
never visible without its captions) and `sources` last (a row is only recorded as seen once
its image is in the manifest).
"""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.captions import ORIGINAL_VERSION, PROVIDED_VERSION, caption_rows
from pipeline.config import IngestConfig
from pipeline.images import Reject, image_id_for
from pipeline.lineage import Lineage
from pipeline.records import Tracked, label
from pipeline.splits import assign_split
from pipeline.store import Store, reject_row
from pipeline.versioning import stable_hash
from schemas import STORE_SCHEMAS

ACCEPTED, REJECTED = "accepted", "rejected"
#: Rejects decided by the bytes (under the image limits): recorded in `sources`, not re-opened while
#: the file and the limits stay the same. A missing or unreadable file is tried again each run.
SETTLED_REJECTS = {Reject.EMPTY_FILE, Reject.FILE_TOO_LARGE, Reject.NOT_AN_IMAGE, Reject.TRUNCATED,
                   Reject.DECOMPRESSION_BOMB, Reject.TOO_SMALL, Reject.TOO_LARGE, Reject.NO_IMAGE_MEMBER,
                   Reject.DOWNLOAD_FAILED, Reject.MISSING_FROM_SHARD}
FLUSH_ROWS = 8192  # rows buffered per store before a part file is staged
#: buffer name -> (store, version); captions first, `sources` last (the commit order)
_BUFFERS = {"original": ("captions", ORIGINAL_VERSION), "provided": ("captions", PROVIDED_VERSION), "rejects": ("rejects", None),
            "manifest": ("manifest", None), "sources": ("sources", None)}
_COMMIT_NAMES = {"original": "captions.original", "provided": "captions.provided"}


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
    unchanged: int = label("rows unchanged since they were checked (not opened)", default=0)
    opened: int = label("images opened (read and checked)", default=0)
    shards: int = label("shards (read + skipped)", default=0)
    shards_skipped: int = label("shards committed before (not opened)", default=0)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    commits: dict[str, str | None] = field(default_factory=dict)  # store (and caption version) -> its last commit, None: nothing new
    store_uri: str = label("store", default="")

    def reconcile(self) -> None:
        if self.input_rows != self.added + self.skipped + self.rejected:
            raise RuntimeError(f"ingest counts do not reconcile: {self}")


@dataclass(frozen=True)
class Prior:
    """What the stores hold for a manifest version before an ingest: its image ids, the `sources`
    records (None: none yet), and the key of the image limits that rejects are recorded under."""

    existing_ids: pa.Array
    recorded: pa.Table | None
    limits_key: str

    @classmethod
    def of(cls, store_uri: str, icfg: IngestConfig) -> Prior:
        manifest, sources = Store(store_uri, "manifest"), Store(store_uri, "sources")
        existing = (manifest.read(icfg.dataset, columns=["image_id"]).column("image_id").combine_chunks()
                    if manifest.commits(icfg.dataset) else pa.array([], pa.string()))
        return cls(existing, sources.read(icfg.dataset) if sources.commits(icfg.dataset) else None,
                   stable_hash(icfg.limits.model_dump(mode="json"), 12))


class IngestWriter:
    """Files checked rows (the check's columns, `listing_ingest._CHECK_FIELDS`) into the stores'
    buffers, stages them, and commits every store in order. Use as a context manager: what is
    not committed when it exits is dropped."""

    def __init__(self, store_uri: str, icfg: IngestConfig, lineage: Lineage, result: IngestResult, limits_key: str,
                 existing_ids: set[str]):
        self.icfg, self.lineage, self.result, self.limits_key = icfg, lineage, result, limits_key
        self.stores = {name: Store(store_uri, store) for name, (store, _) in _BUFFERS.items()}
        self.existing = existing_ids  # image ids in the manifest version (grows as rows are committed)
        self.seen: dict[str, str] = {}  # image_id -> first uri of this run
        self.reasons: Counter = Counter()
        self.rows: dict[str, list[dict]] = {name: [] for name in _BUFFERS}
        self._stack = ExitStack()
        self._txns = {}
        self._open()

    def __enter__(self) -> IngestWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()  # aborts what was not committed

    def _open(self) -> None:
        versions = {"original": ORIGINAL_VERSION, "provided": PROVIDED_VERSION, "rejects": f"ingest.{self.icfg.dataset}",
                    "manifest": self.icfg.dataset, "sources": self.icfg.dataset}
        for name, store in self.stores.items():
            keys = {(i,) for i in self.existing} if name == "manifest" else None
            self._txns[name] = self._stack.enter_context(store.begin(versions[name], self.lineage, existing_keys=keys))

    def reject(self, row: dict) -> None:
        """A reject decided without opening anything (a listing entry alone)."""
        self.rows["rejects"].append(row)
        self.result.rejected += 1
        self.reasons[row["reason"]] += 1

    def add(self, row: dict, now) -> None:
        """File one checked row: added, skipped (its image is in the manifest) or rejected."""
        outcome = self._file(row, now)
        if outcome == "skipped":
            self.result.skipped += 1
        elif outcome != "added":  # added rows are counted when the manifest rows are written
            self.result.rejected += 1
            self.reasons[outcome] += 1

    def _file(self, row: dict, now) -> str:
        out = self.rows

        def source(outcome: str, image_id: str | None, reason: str | None, checked_with: str) -> None:
            if row["size"] is not None and row["mtime_ns"] is not None:
                out["sources"].append({"uri": row["uri"], "size": row["size"], "mtime_ns": row["mtime_ns"], "checked_with": checked_with,
                                       "outcome": outcome, "image_id": image_id, "reason": reason, "checked_at": now})

        if not row["ok"]:
            out["rejects"].append(reject_row("ingest", row["uri"] or f"row {row['row']}", row["reason"], row["detail"], now))
            if row["reason"] in SETTLED_REJECTS:
                source(REJECTED, None, row["reason"], self.limits_key)
            return row["reason"]
        image_id = image_id_for(row["sha256"])
        if image_id in self.seen:
            detail = f"same bytes as {self.seen[image_id]} (image_id {image_id})"
            out["rejects"].append(reject_row("ingest", row["uri"], Reject.DUPLICATE, detail, now))
            source(REJECTED, image_id, Reject.DUPLICATE, "")
            return Reject.DUPLICATE
        self.seen[image_id] = row["uri"]
        source(ACCEPTED, image_id, None, "")
        if image_id in self.existing:
            return "skipped"
        out["manifest"].append({"image_id": image_id, "uri": row["uri"], "sha256": row["sha256"], "width": row["width"],
                                "height": row["height"], "mode": row["mode"],
                                "split": row["split"] or assign_split(image_id, self.icfg.split_fractions),
                                "captions": row["captions"], "metadata": row["metadata"], "ingested_at": now})
        out["original"] += caption_rows(image_id, row["captions"], ORIGINAL_VERSION, "original", now)
        out["provided"] += caption_rows(image_id, row["dense_captions"], PROVIDED_VERSION, "dense", now)
        return "added"

    def flush(self, force: bool = False) -> None:
        for name, rows in self.rows.items():
            if rows and (force or len(rows) >= FLUSH_ROWS):
                kept = self._txns[name].write(pa.Table.from_pylist(rows, schema=STORE_SCHEMAS[self.stores[name].name]))
                if name == "manifest":
                    self.result.added += kept
                    self.existing.update(r["image_id"] for r in rows)
                elif name in ("original", "provided"):
                    self.result.captions_added += kept
                rows.clear()

    def commit(self, reopen: bool = False) -> None:
        """Commit every store, captions first and `sources` last; `reopen`: go on writing after it."""
        self.flush(force=True)
        r = self.result
        counts = {"input_rows": r.input_rows, "added": r.added, "skipped": r.skipped, "rejected": r.rejected,
                  "unchanged": r.unchanged, "opened": r.opened}
        for name, txn in self._txns.items():
            commit = txn.commit(counts)
            if commit or _COMMIT_NAMES.get(name, name) not in r.commits:
                r.commits[_COMMIT_NAMES.get(name, name)] = commit.commit_id if commit else None
        r.reject_reasons = dict(self.reasons)
        self._stack.close()
        if reopen:
            self._stack = ExitStack()
            self._open()
