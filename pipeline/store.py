"""Versioned Parquet stores with atomic, idempotent commits and lineage.

Layout under `store_uri` (a local path or any pyarrow filesystem URI, e.g. s3://bucket/x):

    {store}/{version}/data/{commit_id}/part-*.parquet   data files of one commit
    {store}/{version}/_commits/{time}-{commit_id}.json  commit records (the only truth)

A version is a named, append-only dataset (an ingest's dataset name, a caption_version,
an encoder_version). Writers add *commits*: data files go to a commit-private folder first,
then one small JSON record is moved into `_commits/`. Readers only see files listed by
commit records, so a writer that dies half-way leaves nothing visible (its orphan files
are removed by `gc`). Rewriting rows whose key already exists in the version adds nothing,
so re-running a stage is idempotent. Every commit record carries its lineage.

Concurrency: one writer per version at a time (each stage owns its output version).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.faults import crash_point
from pipeline.lineage import Lineage
from pipeline.records import from_json, to_json
from pipeline.uri import filesystem
from schemas import STORE_KEYS, STORE_SCHEMAS, VECTOR_STORES

R = TypeVar("R")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(RuntimeError):
    """Base class for store errors."""


class SchemaMismatchError(StoreError):
    """Data on disk (or handed to a writer) does not match the store's Arrow schema."""


class VersionNotFoundError(StoreError):
    """The requested version has no committed data."""


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a pyarrow filesystem URI (`pipeline.uri.filesystem`:
    one filesystem per bucket and process)."""
    return filesystem(uri)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Commit:
    """One atomic addition of rows to a store version."""

    commit_id: str
    store: str
    version: str
    files: tuple[str, ...]
    num_rows: int
    created_at: str
    lineage: Lineage = field(default_factory=Lineage)

    def to_json(self) -> str:
        return json.dumps(
            {
                "commit_id": self.commit_id,
                "store": self.store,
                "version": self.version,
                "files": list(self.files),
                "num_rows": self.num_rows,
                "created_at": self.created_at,
                "lineage": self.lineage.to_json(),
            },
            indent=2,
            sort_keys=True,
            default=str,
        )

    @classmethod
    def from_json(cls, text: str) -> Commit:
        d = json.loads(text)
        return cls(
            commit_id=d["commit_id"],
            store=d["store"],
            version=d["version"],
            files=tuple(d["files"]),
            num_rows=int(d["num_rows"]),
            created_at=d["created_at"],
            lineage=Lineage.from_json(d.get("lineage") or {}),
        )


class Store:
    """One named store (manifest, captions, embeddings, rejects) under a `store_uri`."""

    def __init__(self, store_uri: str, name: str):
        if name not in STORE_SCHEMAS:
            raise StoreError(f"unknown store {name!r}; known: {sorted(STORE_SCHEMAS)}")
        self.store_uri = store_uri
        self.name = name
        self.key = STORE_KEYS[name]
        self.fs, root = resolve_filesystem(store_uri)
        self.root = f"{root.rstrip('/')}/{name}"

    def __repr__(self) -> str:
        return f"Store({self.store_uri!r}, {self.name!r})"

    # ----------------------------------------------------------------- reading
    def versions(self) -> list[str]:
        """Versions with at least one commit, sorted by name."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.Directory and self.commits(info.base_name):
                out.append(info.base_name)
        return sorted(out)

    def commits(self, version: str) -> list[Commit]:
        """Committed commits of a version, oldest first."""
        _check_version(version)
        selector = pafs.FileSelector(f"{self.root}/{version}/_commits", allow_not_found=True)
        infos = [
            i
            for i in self.fs.get_file_info(selector)
            if i.type == pafs.FileType.File and i.base_name.endswith(".json") and not i.base_name.startswith(".")
        ]
        commits = []
        for info in sorted(infos, key=lambda i: i.base_name):
            with self.fs.open_input_stream(info.path) as f:
                commits.append(Commit.from_json(f.read().decode()))
        return commits

    def files(self, version: str, commits: Iterable[Commit] | None = None) -> list[str]:
        """Absolute paths (on `self.fs`) of the data files of a version's commits."""
        selected = self.commits(version) if commits is None else list(commits)
        return [f"{self.root}/{version}/{rel}" for c in selected for rel in c.files]

    def num_rows(self, version: str) -> int:
        return sum(c.num_rows for c in self.commits(version))

    def read(
        self,
        version: str,
        columns: list[str] | None = None,
        commits: Iterable[Commit] | None = None,
    ) -> pa.Table:
        """All committed rows of a version (optionally of some commits), schema-checked."""
        selected = self.commits(version) if commits is None else list(commits)
        if commits is None and not selected:
            raise VersionNotFoundError(
                f"store {self.name!r} has no version {version!r} under {self.store_uri}; "
                f"versions: {self.versions() or 'none'}"
            )
        schema = self.schema_for(version, selected)
        tables = []
        for path in self.files(version, selected):
            self._check_file_schema(path, schema)
            tables.append(pq.read_table(path, filesystem=self.fs, columns=columns, schema=schema))
        if not tables:
            empty = schema if columns is None else pa.schema([schema.field(c) for c in columns])
            return empty.empty_table()
        return pa.concat_tables(tables)

    def iter_batches(self, version: str, batch_size: int = 4096, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream a version's rows without loading it whole."""
        commits = self.commits(version)
        schema = self.schema_for(version, commits)
        for path in self.files(version, commits):
            self._check_file_schema(path, schema)
            with self.fs.open_input_file(path) as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)

    def keys(self, version: str) -> set[tuple]:
        """The key tuples already present in a version (reads only the key columns)."""
        if not self.commits(version):
            return set()
        table = self.read(version, columns=list(self.key))
        return set(zip(*(table.column(k).to_pylist() for k in self.key)))

    def lineage(self, version: str) -> list[Lineage]:
        """Lineage of every commit of a version, oldest first."""
        return [c.lineage for c in self.commits(version)]

    def schema_for(self, version: str, commits: list[Commit] | None = None, value_type: pa.DataType | None = None) -> pa.Schema:
        """The expected schema; for vector stores (embeddings, features) the list size comes from the
        stored `dim`, the element type from `value_type`, else from the version's files (`vector_type`)."""
        if self.name not in VECTOR_STORES:
            return STORE_SCHEMAS[self.name]
        selected = self.commits(version) if commits is None else commits
        dim = next((c.lineage.dim for c in selected if c.lineage.dim is not None), None)
        return VECTOR_STORES[self.name].schema_of(dim, value_type or self.vector_type(version, selected))

    def vector_type(self, version: str, commits: list[Commit] | None = None) -> pa.DataType | None:
        """The element type of a vector store version (float16 or float32 embeddings), read from its
        first data file: one version holds one type, the others are checked against it. None for
        other stores, a version without files, or a type the store does not hold (a check names it)."""
        vectors = VECTOR_STORES.get(self.name)
        paths = self.files(version, commits) if vectors else []
        if not paths:
            return None
        with self.fs.open_input_file(paths[0]) as f:
            schema = pq.read_schema(f)
        if schema.get_field_index(vectors.column) < 0:
            return None
        value_type = getattr(schema.field(vectors.column).type, "value_type", None)
        return value_type if value_type in vectors.value_types else None

    def _check_file_schema(self, path: str, expected: pa.Schema) -> None:
        with self.fs.open_input_file(path) as f:
            actual = pq.read_schema(f)
        problems = schema_problems(actual, expected)
        if problems:
            raise SchemaMismatchError(
                f"store {self.name!r} file {path} does not match schemas.{self.name}: " + "; ".join(problems)
            )

    # ----------------------------------------------------------------- writing
    def append(self, version: str, table: pa.Table, lineage: Lineage | None = None) -> Commit | None:
        """Atomically add the rows of `table` whose key is not yet in `version`.

        Returns the commit, or None when every row already existed (nothing written).
        """
        with self.begin(version, lineage) as txn:
            txn.write(table)
            return txn.commit()

    def begin(self, version: str, lineage: Lineage | None = None, existing_keys: set[tuple] | None = None,
              value_type: pa.DataType | None = None) -> Transaction:
        """Start an atomic commit: write one or more tables (or let Ray Data write files
        into `txn.staging_dir`), then `commit()`. Leaving the `with` block without
        committing removes the staged files. A writer that commits many times may pass
        the version's keys it keeps up to date (`existing_keys`), so they are not re-read.
        Vector stores: the commit's element type is the version's (`vector_type`); a new
        version's is `value_type`, by default the store's first (`schemas.VECTOR_STORES`)."""
        _check_version(version)
        vectors = VECTOR_STORES.get(self.name)
        if vectors:
            held = self.vector_type(version)
            if held is not None and value_type is not None and held != value_type:
                raise SchemaMismatchError(f"store {self.name!r}: version {version!r} holds {held} vectors; one version holds one "
                                          f"type, so {value_type} rows cannot be added to it")
            value_type = held or value_type or vectors.value_types[0]
            if value_type not in vectors.value_types:
                raise SchemaMismatchError(f"store {self.name!r} holds vectors of {[str(t) for t in vectors.value_types]}, not {value_type}")
        return Transaction(self, version, lineage or Lineage(), existing_keys, value_type)

    def prepare(self, table: pa.Table, value_type: pa.DataType | None = None) -> pa.Table:
        """Cast a table to the store's schema, with an error naming the bad column. Vector stores:
        vectors become `value_type` (default: the store's first), and a value that does not fit
        it (beyond float16's +-65504) fails instead of being stored as inf."""
        if self.name in VECTOR_STORES:
            dims = pc.unique(table.column("dim")).to_pylist() if "dim" in table.column_names else []
            if len(dims) > 1:
                raise SchemaMismatchError(f"store {self.name!r}: one version holds one dim, got {dims}")
            schema = VECTOR_STORES[self.name].schema_of(int(dims[0]) if dims else None, value_type)
        else:
            schema = STORE_SCHEMAS[self.name]
        missing = [f.name for f in schema if f.name not in table.column_names]
        extra = [n for n in table.column_names if n not in schema.names]
        if missing or extra:
            raise SchemaMismatchError(
                f"store {self.name!r}: rows do not match schemas.{self.name}: "
                + ", ".join([f"missing column {m!r}" for m in missing] + [f"unexpected column {e!r}" for e in extra])
            )
        columns = []
        for f in schema:
            col = table.column(f.name)
            try:
                columns.append(col.cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise SchemaMismatchError(
                    f"store {self.name!r}: column {f.name!r} has type {col.type}, expected {f.type}: {e}"
                ) from e
            if pa.types.is_fixed_size_list(f.type) and _overflowed(col, columns[-1]):
                raise SchemaMismatchError(
                    f"store {self.name!r}: column {f.name!r} has values beyond the range of {f.type.value_type} (they would be "
                    f"stored as inf); write this version as float32 (embed.store_dtype: float32)"
                )
            if not f.nullable and col.null_count:
                raise SchemaMismatchError(f"store {self.name!r}: column {f.name!r} has {col.null_count} nulls")
        return pa.Table.from_arrays(columns, schema=schema)

    def gc(self, version: str) -> list[str]:
        """Delete what dead writers left: data folders no commit record references, and
        temporary commit records that were never moved into place."""
        committed = {c.commit_id for c in self.commits(version)}
        selector = pafs.FileSelector(f"{self.root}/{version}/data", allow_not_found=True)
        removed = []
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.Directory and info.base_name not in committed:
                self.fs.delete_dir(info.path)
                removed.append(info.path)
        records = pafs.FileSelector(f"{self.root}/{version}/_commits", allow_not_found=True)
        for info in self.fs.get_file_info(records):
            if info.type == pafs.FileType.File and info.base_name.startswith(".tmp-"):
                self.fs.delete_file(info.path)
                removed.append(info.path)
        return removed


class Transaction:
    """A commit in progress. Only `commit()` makes its rows visible."""

    def __init__(self, store: Store, version: str, lineage: Lineage, existing_keys: set[tuple] | None = None,
                 value_type: pa.DataType | None = None):
        self.store = store
        self.version = version
        self.lineage = lineage
        self.value_type = value_type  # vector stores: the element type this commit writes (`Store.begin`)
        # Time-prefixed ids keep commit records in write order when listed by name.
        self.commit_id = f"{utc_now().strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}"
        self.staging_dir = f"{store.root}/{version}/data/{self.commit_id}"
        self._existing: set[tuple] | None = existing_keys
        self._seen: set[tuple] = set()
        self._parts = 0
        self._committed = False
        store.fs.create_dir(self.staging_dir, recursive=True)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    def write(self, table: pa.Table) -> int:
        """Stage rows whose key is new to the version (and to this commit). Returns rows kept."""
        table = self.store.prepare(table, self.value_type)
        if self._existing is None:
            self._existing = self.store.keys(self.version)
        keys = list(zip(*(table.column(k).to_pylist() for k in self.store.key)))
        keep = []
        for k in keys:
            new = k not in self._existing and k not in self._seen
            keep.append(new)
            if new:
                self._seen.add(k)
        table = table.filter(pa.array(keep, type=pa.bool_())) if keys else table
        if table.num_rows == 0:
            return 0
        path = f"{self.staging_dir}/part-{self._parts:05d}.parquet"
        pq.write_table(table, path, filesystem=self.store.fs, compression="zstd")
        self._parts += 1
        crash_point("store.write.part_staged")
        return table.num_rows

    def commit(self, counts: dict[str, int] | None = None) -> Commit | None:
        """Publish the staged files atomically. Files written into `staging_dir` by other
        writers (Ray Data's `write_parquet`) are included and schema-checked, but not
        deduplicated by key: such writers must leave out rows the version already has, and write
        vectors of `value_type`."""
        fs, store = self.store.fs, self.store
        infos = fs.get_file_info(pafs.FileSelector(self.staging_dir, recursive=True, allow_not_found=True))
        data_files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        num_rows = 0
        expected = None
        for path in data_files:
            with fs.open_input_file(path) as f:
                meta = pq.read_metadata(f)
                num_rows += meta.num_rows
                if expected is None:
                    actual = meta.schema.to_arrow_schema()
                    vectors = VECTOR_STORES.get(store.name)
                    if vectors and actual.get_field_index(vectors.column) >= 0 and self.lineage.dim is None:
                        vector = actual.field(vectors.column).type
                        if pa.types.is_fixed_size_list(vector):
                            self.lineage = replace(self.lineage, dim=vector.list_size)
                    expected = store.schema_for(self.version, [_fake_commit(self.lineage)], self.value_type)
                problems = schema_problems(meta.schema.to_arrow_schema(), expected)
                if problems:
                    raise SchemaMismatchError(f"store {store.name!r}: staged file {path}: " + "; ".join(problems))
        if num_rows == 0:
            self.abort()
            self._committed = True
            return None
        version_dir = f"{store.root}/{self.version}"
        commit = Commit(
            commit_id=self.commit_id,
            store=store.name,
            version=self.version,
            files=tuple(p[len(version_dir) + 1 :] for p in data_files),
            num_rows=num_rows,
            created_at=utc_now().isoformat(),
            lineage=replace(self.lineage, counts=counts) if counts is not None else self.lineage,
        )
        crash_point("store.commit.before_record")
        # Writing the record is the commit point.
        put_atomically(fs, f"{version_dir}/_commits/{self.commit_id}.json", commit.to_json())
        crash_point("store.commit.after_record")
        self._committed = True
        return commit

    def abort(self) -> None:
        try:
            self.store.fs.delete_dir(self.staging_dir)
        except FileNotFoundError:
            pass


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A vector column (float16 or float32 fixed-size lists) as one float32 (n, dim) matrix."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(column), column.type.list_size)


def put_atomically(fs: pafs.FileSystem, path: str, text: str) -> None:
    """Write a small file so readers see all of it or nothing: write a hidden temporary
    beside it, then move it into place (atomic rename locally, atomic PUT on object stores)."""
    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.tmp-{name}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    crash_point("store.put.before_move")  # a temporary record is left: invisible to readers, removed by gc
    fs.move(tmp, path)


def read_record(fs: pafs.FileSystem, path: str, kind: type[R]) -> R | None:
    """A typed record that `write_record` wrote (`pipeline.records`), or None when there is none."""
    try:
        with fs.open_input_stream(path) as f:
            return from_json(kind, json.loads(f.read().decode()))
    except (FileNotFoundError, OSError):  # object stores answer a missing key with an OSError
        return None


def write_record(fs: pafs.FileSystem, path: str, record: Any) -> None:
    """A typed record as JSON, keyed by field name, written atomically."""
    put_atomically(fs, path, json.dumps(to_json(record), indent=2))


def reject_row(stage: str, record_id: str, reason: str, detail: str, time: datetime) -> dict[str, Any]:
    """One row of the rejects store."""
    return {"stage": stage, "record_id": record_id, "reason": reason, "detail": detail, "time": time}


def append_image_rejects(store_uri: str, stage: str, version: str, bad: pa.Table, lineage: Lineage) -> None:
    """Images a stage could not read (`bad`: image_id, reason, detail) into the rejects store's
    version `version` (nothing when there are none)."""
    if not bad.num_rows:
        return
    now = utc_now()
    rows = [reject_row(stage, i, r, d, now) for i, r, d in zip(*(bad.column(c).to_pylist() for c in ("image_id", "reason", "detail")))]
    Store(store_uri, "rejects").append(version, pa.Table.from_pylist(rows, schema=STORE_SCHEMAS["rejects"]), lineage)


def _overflowed(before: pa.ChunkedArray, after: pa.ChunkedArray) -> bool:
    """Whether a cast of fixed-size lists made finite values infinite (float32 -> float16 overflows to inf)."""
    def infinite(column: pa.ChunkedArray) -> int:
        values = [chunk.flatten() for chunk in column.chunks]
        if not values or not pa.types.is_floating(values[0].type):
            return 0  # integers are finite
        values = pa.concat_arrays(values)
        return len(values) - values.null_count - int(pc.sum(pc.is_finite(values)).as_py() or 0)

    return infinite(after) > infinite(before)


def _fake_commit(lineage: Lineage) -> Commit:
    return Commit("", "", "", (), 0, "", lineage)


def schema_problems(actual: pa.Schema, expected: pa.Schema) -> list[str]:
    """Human-readable differences between a file's schema and the store's schema."""
    problems = []
    for f in expected:
        idx = actual.get_field_index(f.name)
        if idx < 0:
            problems.append(f"missing column {f.name!r}")
            continue
        got = actual.field(idx).type
        if not got.equals(f.type):
            problems.append(f"column {f.name!r} has type {got}, expected {f.type}")
    for name in actual.names:
        if expected.get_field_index(name) < 0:
            problems.append(f"unexpected column {name!r}")
    return problems


def _check_version(version: str) -> None:
    if not _VERSION_RE.match(version or ""):
        raise StoreError(
            f"invalid version name {version!r}: use 1-128 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
