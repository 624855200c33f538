"""What users bring, read into one normalised Arrow table (no Ray).

Sources:
* a folder of images (recursively); a sidecar `NAME.txt` next to `NAME.jpg` gives its
  captions, one per line;
* a listing file: `.jsonl`/`.json` (one object per line), `.parquet`, or `.csv`, with an
  image column (path relative to the listing, absolute path, or filesystem URI) and
  caption columns (a string or a list of strings). Optional `split` and `metadata`.

The result has the columns of `LISTING_SCHEMA`; images are checked later, in Ray Data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.config import IngestConfig

LISTING_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("uri", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("dense_captions", pa.list_(pa.string())),
        ("split", pa.string()),
        ("metadata", pa.string()),
    ]
)

SIDECAR_SUFFIXES = {".txt", ".json", ".jsonl", ".csv", ".parquet", ".md"}
VALID_SPLITS = {"train", "val", "test"}


class ListingError(ValueError):
    """The listing cannot be read as a whole (a bad row is a reject, not this)."""


def read_listing(source: str | Path, cfg: IngestConfig) -> pa.Table:
    path = Path(source).expanduser()
    if "://" not in str(source) and not path.exists():
        raise ListingError(f"ingest source {source} does not exist (expected a folder or a .jsonl/.parquet/.csv listing)")
    if path.is_dir():
        return _read_folder(path.resolve())
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        table = pajson.read_json(path)
    elif suffix == ".parquet":
        table = pq.read_table(path)
    elif suffix == ".csv":
        table = pacsv.read_csv(path)
    else:
        raise ListingError(f"ingest source {source}: unknown listing type {suffix!r}; use .jsonl, .parquet or .csv")
    return _normalise(table, cfg, base_dir=path.resolve().parent, source=str(source))


def _read_folder(root: Path) -> pa.Table:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    rows = []
    for p in files:
        if p.suffix.lower() in SIDECAR_SUFFIXES:
            continue
        sidecar = p.with_suffix(".txt")
        captions = []
        if sidecar.is_file():
            captions = [line.strip() for line in sidecar.read_text(errors="replace").splitlines() if line.strip()]
        rows.append({"row": len(rows), "uri": str(p), "captions": captions, "dense_captions": [], "split": None, "metadata": None})
    return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)


def _normalise(table: pa.Table, cfg: IngestConfig, base_dir: Path, source: str) -> pa.Table:
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
    images = table.column(cfg.image_column).to_pylist()
    splits = table.column("split").to_pylist() if "split" in names else [None] * len(images)
    metas = table.column("metadata").to_pylist() if "metadata" in names else [None] * len(images)
    captions = [_collect(table, caption_cols, i) for i in range(table.num_rows)]
    dense = [_collect(table, dense_cols, i) for i in range(table.num_rows)]
    rows = []
    for i, image in enumerate(images):
        split = splits[i] if splits[i] in VALID_SPLITS else None
        meta = metas[i] if metas[i] is None or isinstance(metas[i], str) else json.dumps(metas[i], sort_keys=True)
        rows.append(
            {
                "row": i,
                "uri": _resolve(image, base_dir),
                "captions": captions[i],
                "dense_captions": dense[i],
                "split": split,
                "metadata": meta,
            }
        )
    return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)


def _collect(table: pa.Table, columns: list[str], i: int) -> list[str]:
    out: list[str] = []
    for col in columns:
        value = table.column(col)[i].as_py()
        if value is None:
            continue
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and text.strip():
                out.append(text.strip())
    return out


def _resolve(image: object, base_dir: Path) -> str:
    if not isinstance(image, str) or not image.strip():
        return ""  # rejected later as missing_file
    image = image.strip()
    if "://" in image:
        return image
    p = Path(image).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve())
