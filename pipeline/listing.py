"""What users bring, read into one normalised Arrow table (no Ray).

Sources, each a local path or a filesystem URI (`pipeline.uri`; no `Path()` is built from them):
* a folder or prefix of images (recursively); a sidecar `NAME.txt` next to `NAME.jpg` gives
  its captions, one per line;
* a listing file: `.jsonl`/`.json` (one object per line), `.parquet`, or `.csv`, with an
  image column (path relative to the listing, absolute path, or filesystem URI) and
  caption columns (a string or a list of strings). Optional `split` and `metadata`. A
  relative path resolves against the listing's folder or prefix (`s3://b/x/l.jsonl` +
  `img/a.png` is `s3://b/x/img/a.png`);
* a single image (its sidecar `.txt`, if any, gives its captions).

The result has the columns of `LISTING_SCHEMA`, computed with Arrow compute (no Python loop
per row). Images are checked later, in Ray Data; `stat_locations` gets their size and mtime
in bulk (one listing per folder or prefix) so that a refresh can tell unchanged rows apart
without opening them.
"""

from __future__ import annotations

import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline import uri
from pipeline.config import IngestConfig

LISTING_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("uri", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("dense_captions", pa.list_(pa.string())),
        ("split", pa.string()),
        ("metadata", pa.string()),
        ("sidecar", pa.string()),  # caption file of a folder's image, read when the image is checked (null: none)
        ("size", pa.int64()),  # bytes, when the source's listing told (folders); else null until `stat_locations`
        ("mtime_ns", pa.int64()),
    ]
)

#: The identity of a location: its size and mtime (ns since the epoch; S3 gives whole seconds).
STAT_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("found", pa.bool_())])

LISTING_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv"}
SIDECAR_SUFFIXES = {".txt", ".json", ".jsonl", ".csv", ".parquet", ".md"}
VALID_SPLITS = ["train", "val", "test"]
#: A folder or prefix holding more of the locations than this is listed once; fewer are looked up one by one.
LIST_FOLDER_ABOVE = 4
STAT_THREADS = 16


class ListingError(ValueError):
    """The listing cannot be read as a whole (a bad row is a reject, not this)."""


def read_listing(source: str | os.PathLike, cfg: IngestConfig, read_sidecars: bool = True) -> pa.Table:
    """The normalised listing of `source`. `read_sidecars=False` leaves a folder's captions to
    whoever checks its images (column `sidecar`), so rows a refresh skips cost no read."""
    location = uri.absolute(source)
    try:
        found = uri.require(location, "ingest source")
    except uri.LocationError as e:
        raise ListingError(f"{e} (expected a folder or prefix, a .jsonl/.parquet/.csv listing, or an image)") from None
    if found.type == pafs.FileType.Directory:
        table = _read_folder(location)
    else:
        suffix = uri.suffix(location)
        if suffix in LISTING_SUFFIXES:
            table = _normalise(_read_table(location, suffix), cfg, base=uri.parent(location), source=str(source))
        elif suffix in SIDECAR_SUFFIXES:
            raise ListingError(f"ingest source {source}: unknown listing type {suffix!r}; use .jsonl, .parquet or .csv")
        else:
            table = _single_image(location, found)
    return with_sidecar_captions(table) if read_sidecars else table


def _read_table(location: str, suffix: str) -> pa.Table:
    fs, path = uri.filesystem(location)
    try:
        if suffix == ".parquet":
            with fs.open_input_file(path) as f:
                return pq.read_table(f)
        with fs.open_input_stream(path) as f:
            return pajson.read_json(f) if suffix in (".jsonl", ".json") else pacsv.read_csv(f)
    except pa.ArrowInvalid as e:
        raise ListingError(f"listing {location}: not a valid {suffix} file: {' '.join(str(e).split())[:300]}") from None
    except OSError as e:
        raise uri.LocationError(f"listing {location}: {' '.join(str(e).split())[:300]}") from None


def _stem_txt(path: str) -> str:
    """`a/b.png` -> `a/b.txt` (the sidecar's name)."""
    folder, slash, name = path.rpartition("/")
    return f"{folder}{slash}{name[:name.rfind('.')] if '.' in name else name}.txt"


def _read_folder(location: str) -> pa.Table:
    infos = list(uri.list_files(location))
    names = {i.path for i in infos}
    images = [i for i in infos if uri.suffix(i.path) not in SIDECAR_SUFFIXES]
    sidecars = [uri.uri_of(location, s) if (s := _stem_txt(i.path)) in names else None for i in images]
    return _table(
        uris=pa.array([uri.uri_of(location, i.path) for i in images], pa.string()),
        sidecar=pa.array(sidecars, pa.string()),
        size=pa.array([i.size for i in images], pa.int64()),
        mtime_ns=pa.array([i.mtime_ns for i in images], pa.int64()),
    )


def _single_image(location: str, info: pafs.FileInfo) -> pa.Table:
    sidecar = _stem_txt(location)
    return _table(uris=pa.array([location], pa.string()), sidecar=pa.array([sidecar if uri.is_file(sidecar) else None], pa.string()),
                  size=pa.array([info.size], pa.int64()), mtime_ns=pa.array([info.mtime_ns], pa.int64()))


def _table(uris: pa.Array, captions: pa.Array | None = None, dense: pa.Array | None = None, split: pa.Array | None = None,
           metadata: pa.Array | None = None, sidecar: pa.Array | None = None, size: pa.Array | None = None,
           mtime_ns: pa.Array | None = None) -> pa.Table:
    n = len(uris)
    empty_lists = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))
    columns = {
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "uri": uris,
        "captions": empty_lists if captions is None else captions,
        "dense_captions": empty_lists if dense is None else dense,
        "split": pa.nulls(n, pa.string()) if split is None else split,
        "metadata": pa.nulls(n, pa.string()) if metadata is None else metadata,
        "sidecar": pa.nulls(n, pa.string()) if sidecar is None else sidecar,
        "size": pa.nulls(n, pa.int64()) if size is None else size,
        "mtime_ns": pa.nulls(n, pa.int64()) if mtime_ns is None else mtime_ns,
    }
    return pa.table(columns, schema=LISTING_SCHEMA)


def _normalise(table: pa.Table, cfg: IngestConfig, base: str, source: str) -> pa.Table:
    names = table.column_names
    if cfg.image_column not in names:
        raise ListingError(
            f"listing {source}: no image column {cfg.image_column!r} (columns: {names}); "
            f"set ingest.image_column to the column holding image paths or URIs"
        )
    caption_cols = [c for c in cfg.caption_columns if c in names]
    dense_cols = [c for c in cfg.dense_caption_columns if c in names]
    if not caption_cols and not dense_cols:
        raise ListingError(
            f"listing {source}: none of the caption columns {cfg.caption_columns + cfg.dense_caption_columns} "
            f"exists (columns: {names}); set ingest.caption_columns"
        )
    n = table.num_rows
    split = _strings(table.column("split")) if "split" in names else None
    if split is not None:
        split = pc.if_else(pc.fill_null(pc.is_in(split, value_set=pa.array(VALID_SPLITS)), False), split, pa.nulls(n, pa.string()))
    return _table(
        uris=_resolve(table.column(cfg.image_column), base),
        captions=_merge_texts([table.column(c) for c in caption_cols], n),
        dense=_merge_texts([table.column(c) for c in dense_cols], n),
        split=split,
        metadata=_metadata(table.column("metadata")) if "metadata" in names else None,
    )


def _array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.dictionary_decode() if pa.types.is_dictionary(array.type) else array


def _is_text(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)


def _strings(column: pa.ChunkedArray) -> pa.Array:
    """A text column as strings; any other type as nulls (not text: nothing usable)."""
    array = _array(column)
    return array.cast(pa.string()) if _is_text(array.type) else pa.nulls(len(array), pa.string())


def _resolve(column: pa.ChunkedArray, base: str) -> pa.Array:
    """Image locations: URIs and absolute paths as given, relative paths against `base` (the
    listing's folder or prefix), `.`/`..` segments and `~` resolved; '' for none (a reject later)."""
    text = pc.utf8_trim_whitespace(pc.fill_null(_strings(column), ""))
    keep = pc.or_(pc.or_(pc.match_substring(text, "://"), pc.starts_with(text, "/")),
                  pc.or_(pc.equal(text, ""), pc.starts_with(text, "~")))
    out = pc.if_else(keep, text, pc.binary_join_element_wise(base, text, "/"))
    odd = pc.or_(pc.match_substring_regex(out, r"/\.\.?(/|$)"), pc.starts_with(out, "~"))
    if pc.any(odd).as_py():  # rare: the few rows that need it, in Python
        fixed = pa.array([_normpath(v) for v in out.filter(odd).to_pylist()], pa.string())
        out = pc.replace_with_mask(out, odd, fixed)
    return out


def _normpath(location: str) -> str:
    if "://" in location:
        scheme, _, rest = location.partition("://")
        bucket, _, key = rest.partition("/")
        return f"{scheme}://{bucket}/{posixpath.normpath(key)}"
    return os.path.normpath(os.path.expanduser(location))


def _merge_texts(columns: list[pa.ChunkedArray], n: int) -> pa.Array:
    """Per row, the non-empty stripped texts of `columns` (strings or lists of strings), in
    column order: one list<string> array, built without a Python loop over rows."""
    parents, values = [], []
    for column in columns:
        array = _array(column)
        if _is_text(array.type):
            parents.append(np.arange(n, dtype=np.int64))
            values.append(array.cast(pa.string()))
        elif (pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type)) and (
                _is_text(array.type.value_type) or pa.types.is_null(array.type.value_type)):
            parents.append(pc.list_parent_indices(array).to_numpy(zero_copy_only=False).astype(np.int64))
            values.append(pc.list_flatten(array).cast(pa.string()))
        # any other type holds no text: as before, it adds no caption
    if not values:
        return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))
    parent = np.concatenate(parents) if parents else np.zeros(0, np.int64)
    texts = pc.utf8_trim_whitespace(pa.concat_arrays(values))
    keep = pc.fill_null(pc.not_equal(texts, ""), False)
    parent, texts = parent[keep.to_numpy(zero_copy_only=False)], texts.filter(keep)
    order = np.argsort(parent, kind="stable")  # row by row; within a row, column order then list order
    offsets = np.concatenate([[0], np.cumsum(np.bincount(parent, minlength=n))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), texts.take(pa.array(order)))


def _metadata(column: pa.ChunkedArray) -> pa.Array:
    array = _array(column)
    if _is_text(array.type):
        return array.cast(pa.string())
    if pa.types.is_null(array.type):
        return pa.nulls(len(array), pa.string())
    # structured metadata (a JSON listing's objects): canonical JSON text, row by row (only this case)
    return pa.array([None if v is None else json.dumps(v, sort_keys=True) for v in array.to_pylist()], pa.string())


# ---------------------------------------------------------------- sidecars
def sidecar_captions(location: str) -> list[str]:
    """A sidecar's captions, one per non-empty line ([] when it is gone)."""
    try:
        text = uri.read_bytes(location).decode(errors="replace")
    except (FileNotFoundError, uri.LocationError):
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def with_sidecar_captions(table: pa.Table) -> pa.Table:
    """The table with each row's sidecar captions read into `captions` (I/O in threads)."""
    sidecars = table.column("sidecar")
    if sidecars.null_count == len(sidecars):
        return table
    wanted = sidecars.to_pylist()
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        read = dict(zip(wanted, pool.map(lambda s: sidecar_captions(s) if s else [], wanted)))
    captions = [read[s] if s else c for s, c in zip(wanted, table.column("captions").to_pylist())]
    return table.set_column(table.schema.get_field_index("captions"), "captions", pa.array(captions, pa.list_(pa.string())))


# ---------------------------------------------------------------- size and mtime in bulk
def stat_locations(locations: pa.Array | pa.ChunkedArray | list[str]) -> pa.Table:
    """(uri, size, mtime_ns, found) of each distinct non-empty location (`STAT_SCHEMA`). A folder
    or prefix holding more than `LIST_FOLDER_ABOVE` of them is listed once (one ListObjects page
    per 1,000 keys on S3), the others are looked up one by one; folders in parallel threads.
    found: False when the location is certainly not there, null when it could not be asked (a
    refused listing): such rows are checked by opening them, which names the error."""
    array = pa.array(locations, pa.string()) if isinstance(locations, list) else _array(locations)
    unique = pc.unique(array.filter(pc.fill_null(pc.not_equal(array, ""), False)))
    if len(unique) == 0:
        return STAT_SCHEMA.empty_table()
    groups = pa.table({"parent": pc.replace_substring_regex(unique, r"/[^/]*$", ""),
                       "name": pc.replace_substring_regex(unique, r"^.*/", ""), "uri": unique}).sort_by("parent")
    runs = pc.run_end_encode(groups.column("parent").combine_chunks())
    ends = runs.run_ends.to_numpy()
    starts = np.concatenate([[0], ends[:-1]])
    parents = runs.values.to_pylist()
    jobs = [(parents[i], groups.slice(int(s), int(e - s))) for i, (s, e) in enumerate(zip(starts, ends))]
    with ThreadPoolExecutor(min(STAT_THREADS, len(jobs))) as pool:
        parts = list(pool.map(lambda job: _stat_folder(*job), jobs))
    return pa.concat_tables(parts)


def _stat_folder(parent: str, group: pa.Table) -> pa.Table:
    uris, names = group.column("uri").combine_chunks(), group.column("name").combine_chunks()
    n = len(uris)
    try:
        fs, folder = uri.filesystem(parent or "/")
        if n > LIST_FOLDER_ABOVE:
            listed = fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
        else:
            listed = fs.get_file_info([f"{folder.rstrip('/')}/{name}" for name in names.to_pylist()])
        listed = [i for i in listed if i.type != pafs.FileType.NotFound]
        at = pc.index_in(names, value_set=pa.array([i.base_name for i in listed], pa.string()))
        is_file = pa.array([i.type == pafs.FileType.File for i in listed], pa.bool_()).take(at)
        size = pc.if_else(is_file, pa.array([i.size for i in listed], pa.int64()).take(at), None)
        mtime = pc.if_else(is_file, pa.array([i.mtime_ns for i in listed], pa.int64()).take(at), None)
        # a file: found; nothing there: not found; a folder where an image should be: unknown (opening it says why)
        found = pc.if_else(pc.is_null(at), False, pc.if_else(is_file, True, None))
    except (OSError, ValueError):  # a refused listing, a file where a folder was expected: unknown, checked by opening
        size, mtime, found = pa.nulls(n, pa.int64()), pa.nulls(n, pa.int64()), pa.nulls(n, pa.bool_())
    return pa.table([uris, size, mtime, found], schema=STAT_SCHEMA)
