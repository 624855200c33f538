"""Evaluation-set adapters: a user's files -> an ingest listing (Parquet, no Ray).

Each adapter writes a listing that `pipeline.listing.read_listing` reads (`ingest.source=<it>`):
`image` (absolute path or URI), `captions` (short), `dense_captions` (long), `split`, and
`metadata` (a JSON string). An image that does not exist is never fatal: it is reported in
`EvalSetListing.problems` as `missing_file` and left out. A file that exists but is corrupt
stays in (ingest rejects it with its reason). A malformed input file raises `ValueError`
naming the file and what is missing.

Every input (source, image_root, class_names) is a local path or a filesystem URI (s3://, gs://,
file://) read through `pipeline.uri`; a missing one is a one-line `ValueError` or
`uri.LocationError` (an OSError) naming it. The listing (and Fashion-MNIST's PNGs) is written to a
LOCAL path: the caller publishes it to storage.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from pipeline import uri

OUT_SCHEMA = pa.schema([("image", pa.string()), ("captions", pa.list_(pa.string())),
                        ("dense_captions", pa.list_(pa.string())), ("split", pa.string()), ("metadata", pa.string())])
SPLITS = ("train", "val", "test")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
VQA_COLORS = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown")
VQA_SHAPES = ("circle", "rectangle", "triangle")


@dataclass(frozen=True)
class EvalSetListing:
    path: Path  # the listing written (.parquet)
    kind: str
    rows: int
    class_names: list[str] | None  # in label order, for classification sets
    problems: list[tuple[str, str]]  # (image reference, reason) of entries left out or suspect


# ---------------------------------------------------------------- helpers
def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return split


def _base(image_root: str | Path | None, source: str) -> str | Path:
    """Where relative image references live: image_root (a folder or a URI prefix) or the file's
    folder. A URI base is a string (references are joined to it), a local one a Path."""
    if image_root is None:
        return Path(uri.local_path(source)).parent if uri.is_local(source) else uri.parent(source)
    return str(image_root).rstrip("/") if uri.is_uri(image_root) else Path(image_root).expanduser()


def _resolve(ref: Any, base: str | Path) -> tuple[str, str | None]:
    """(absolute path or URI, problem reason or None) of an image reference."""
    if not isinstance(ref, str) or not ref.strip():
        return str(ref), "no_image"
    ref = ref.strip()
    if uri.is_uri(ref) or isinstance(base, str):
        return (ref if uri.is_uri(ref) else uri.join(base, ref)), None  # a URI: checked by ingest
    p = Path(ref).expanduser()
    p = (p if p.is_absolute() else base / p).resolve()
    if not p.exists():
        return str(p), "missing_file"
    return str(p), None if p.is_file() else "not_a_file"


def _texts(value: Any) -> list[str]:
    """A caption cell (string, list of strings or None) -> stripped non-empty strings."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [t.strip() for t in items if isinstance(t, str) and t.strip()]


def _load_json_object(path: str, keys: Iterable[str]) -> dict:
    try:
        text = uri.read_text(path)
    except OSError as e:  # one line naming the location: it does not exist, or the request was refused
        raise ValueError(str(e)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: cannot read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {list(keys)}, got {type(data).__name__}")
    for key in keys:
        if key not in data:
            raise ValueError(f"{path}: no {key!r} key (keys: {sorted(data)})")
    return data


def _need(entry: Any, key: str, path: str, where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise ValueError(f"{path}: {where} has no {key!r} key")
    return entry[key]


def _row(image: str, captions: list[str], dense: list[str], split: str, meta: dict) -> dict:
    return {"image": image, "captions": captions, "dense_captions": dense, "split": split, "metadata": meta}


def _write(out_path: str | Path, kind: str, rows: list[dict], problems: list[tuple[str, str]],
           class_names: list[str] | None = None) -> EvalSetListing:
    out = Path(out_path)
    if out.suffix.lower() != ".parquet":
        raise ValueError(f"listing {out}: must be a .parquet file")
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["metadata"] = json.dumps(r.get("metadata") or {}, sort_keys=True, default=str)
    pq.write_table(pa.Table.from_pylist(rows, schema=OUT_SCHEMA), out)
    return EvalSetListing(out, kind, len(rows), class_names, problems)


def _merge(entries: Iterable[tuple[Any, list[str], list[str], str, dict]], base: str | Path):
    """(image ref, captions, dense captions, split, metadata) entries -> rows merged by (image, split)
    in first-seen order, and problems (missing images; images left without any caption: `no_caption`)."""
    rows: dict[tuple[str, str], dict] = {}
    problems: list[tuple[str, str]] = []
    for ref, caps, dense, split, meta in entries:
        image, reason = _resolve(ref, base)
        if reason:
            problems.append((image, reason))
            continue
        row = rows.setdefault((image, split), _row(image, [], [], split, meta))
        row["captions"] += [c for c in caps if c not in row["captions"]]
        row["dense_captions"] += [c for c in dense if c not in row["dense_captions"]]
    problems += [(r["image"], "no_caption") for r in rows.values() if not (r["captions"] or r["dense_captions"])]
    return [r for r in rows.values() if r["captions"] or r["dense_captions"]], problems


# ---------------------------------------------------------------- adapters
def coco_listing(source: str | Path, out_path: str | Path, *, image_root: str | Path | None = None,
                 split: str = "test") -> EvalSetListing:
    """COCO captions JSON: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}.
    All captions of an image go into `captions`; images without a caption are reported as `no_caption`."""
    path = str(source)
    data = _load_json_object(path, ("images", "annotations"))
    base = _base(image_root, path)
    captions: dict[Any, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        image_id = _need(ann, "image_id", path, f"annotations[{i}]")
        captions.setdefault(image_id, []).extend(_texts(_need(ann, "caption", path, f"annotations[{i}]")))
    split = _check_split(split)
    entries = []
    for i, img in enumerate(data["images"]):
        image_id = _need(img, "id", path, f"images[{i}]")
        ref = _need(img, "file_name", path, f"images[{i}]")
        entries.append((ref, captions.get(image_id, []), [], split, {"coco_id": image_id}))
    rows, problems = _merge(entries, base)
    return _write(out_path, "coco", rows, problems)


def karpathy_listing(source: str | Path, out_path: str | Path, *, image_root: str | Path | None = None,
                     splits: Iterable[str] = ("test",)) -> EvalSetListing:
    """Karpathy split JSON (dataset_coco.json, dataset_flickr30k.json): {"images": [{"filename",
    "filepath" (optional), "sentences": [{"raw"}], "split"}]}. Keeps the Karpathy `splits` given;
    `restval` becomes `train`. The image is image_root/filepath/filename."""
    path = str(source)
    keep = set(splits)
    if not keep or keep - set(KARPATHY_SPLITS):
        raise ValueError(f"splits must be a non-empty subset of {sorted(KARPATHY_SPLITS)}, got {sorted(keep)}")
    data = _load_json_object(path, ("images",))
    base = _base(image_root, path)
    entries = []
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        ksplit = _need(img, "split", path, where)
        if ksplit not in keep:
            continue
        filename = _need(img, "filename", path, where)
        ref = uri.join(img["filepath"], filename) if img.get("filepath") else filename
        caps = [c for s in _need(img, "sentences", path, where) for c in _texts(s.get("raw") if isinstance(s, dict) else s)]
        meta = {k: img[k] for k in ("cocoid", "imgid") if k in img} | {"karpathy_split": ksplit}
        entries.append((ref, caps, [], KARPATHY_SPLITS[ksplit], meta))
    rows, problems = _merge(entries, base)
    return _write(out_path, "karpathy", rows, problems)


def read_records(path: str | Path) -> list[dict]:
    """Rows of a JSONL (or JSON array) / Parquet / CSV file (a local path or a URI) as dicts."""
    path = str(path)
    suffix = uri.suffix(path)
    if uri.require(path, "file").type != pafs.FileType.File:
        raise ValueError(f"{path}: not a file")
    if suffix not in (".parquet", ".csv", ".jsonl", ".json"):
        raise ValueError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .parquet or .csv")
    data = uri.read_bytes(path)
    if suffix == ".parquet":
        return pq.read_table(pa.BufferReader(data)).to_pylist()
    if suffix == ".csv":
        return pacsv.read_csv(pa.BufferReader(data)).to_pylist()
    text = data.decode()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON lines or a JSON array ({e})") from e
    for n, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {n} is not a JSON object")
    return records


def _records_listing(kind: str, source: str | Path, out_path: str | Path, image_column: str,
                     caption_column: str, image_root: str | Path | None, split: str, dense: bool) -> EvalSetListing:
    path = str(source)
    records = read_records(path)
    for column in (image_column, caption_column):
        if records and not any(column in r for r in records):
            raise ValueError(f"{path}: no {column!r} column (set the {kind} option for it)")
    base = _base(image_root, path)
    default = _check_split(split)
    entries = []
    for r in records:
        caps = _texts(r.get(caption_column))
        meta = {k: v for k, v in r.items() if k not in (image_column, caption_column, "split")}
        split = r["split"] if r.get("split") in SPLITS else default  # a valid per-row split wins
        entries.append((r.get(image_column), [] if dense else caps, caps if dense else [], split, meta))
    rows, problems = _merge(entries, base)
    return _write(out_path, kind, rows, problems)


def pairs_listing(source: str | Path, out_path: str | Path, *, image_column: str = "image",
                  caption_column: str = "caption", image_root: str | Path | None = None,
                  split: str = "test") -> EvalSetListing:
    """Generic JSONL / JSON / Parquet / CSV of (image, caption or list of captions) rows; rows of the
    same image are merged. Images are relative to the file's folder (or image_root)."""
    return _records_listing("pairs", source, out_path, image_column, caption_column, image_root, split, dense=False)


def long_listing(source: str | Path, out_path: str | Path, *, image_column: str = "image",
                 caption_column: str = "caption", image_root: str | Path | None = None,
                 split: str = "test") -> EvalSetListing:
    """Long-caption JSONL (DOCCI / Urban-1k shape: one image + one long caption a line): the caption
    goes into `dense_captions` (and `captions` stays empty), so long retrieval is reported apart."""
    return _records_listing("long", source, out_path, image_column, caption_column, image_root, split, dense=True)


def _read_class_names(path: str, dirs: list[str]) -> list[str]:
    if uri.suffix(path) == ".json":
        mapping = _load_json_object(path, dirs)
        return [str(mapping[d]) for d in dirs]
    names = [line.strip() for line in uri.read_text(path).splitlines() if line.strip()]
    if len(names) != len(dirs):
        raise ValueError(f"{path}: {len(names)} class names for {len(dirs)} class folders (one line per folder, sorted)")
    return names


def folder_listing(source: str | Path, out_path: str | Path, *, class_names: str | Path | None = None,
                   split: str = "test") -> EvalSetListing:
    """ImageNet-style tree root/<class_dir>/<images>. Labels follow sorted dir order; names come from
    `class_names` (text: one line per dir; JSON: {dir: name}) or are the dir names with '_' -> ' '.
    The tree may be a local folder or a URI prefix (its images are then listed as URIs)."""
    images = _class_images(str(source))
    dirs = sorted(images)
    if not dirs:
        raise ValueError(f"{source}: no class folders (expected root/<class_dir>/<image files>)")
    names = _read_class_names(str(class_names), dirs) if class_names else [d.replace("_", " ") for d in dirs]
    split = _check_split(split)
    rows = [_row(image, [name], [], split, {"label": label, "class_name": name})
            for label, (d, name) in enumerate(zip(dirs, names)) for image in images[d]]
    return _write(out_path, "folder", rows, [], class_names=names)


def _class_images(source: str) -> dict[str, list[str]]:
    """{class dir: its image files, sorted} of a tree root/<class_dir>/<images> (hidden names skipped).
    A local tree keeps class folders without images; a URI prefix has only the folders its objects name."""
    if uri.is_local(source):
        root = Path(uri.local_path(source))
        if not root.is_dir():
            raise ValueError(f"{root}: not a folder of class folders")
        return {d.name: [str(p) for p in sorted(d.rglob("*"))
                         if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
                for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if uri.require(source, "folder eval set").type != pafs.FileType.Directory:
        raise ValueError(f"{source}: not a folder of class folders")
    prefix = uri.filesystem(source)[1].rstrip("/") + "/"
    out: dict[str, list[str]] = {}
    for found in uri.list_files(source):
        d, sep, _ = found.path[len(prefix):].partition("/")
        if sep and uri.suffix(found.path) in IMAGE_SUFFIXES:  # files right under the root are no class
            out.setdefault(d, []).append(uri.uri_of(source, found.path))
    return out


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped; a local path or a URI): 2 zero bytes, type 0x08
    (ubyte), ndim, big-endian dims."""
    raw = uri.read_bytes(str(path))
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()}, expected 000008xx)")
    start = 4 + 4 * raw[3]
    dims = struct.unpack(f">{raw[3]}I", raw[4:start]) if len(raw) >= start else ()
    if len(raw) < start or len(raw) - start != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX dims {dims} do not match its {max(len(raw) - start, 0)} data bytes")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(dims)


def _find(folder: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        if uri.is_file(uri.join(folder, name)):
            return uri.join(folder, name)
    raise ValueError(f"{folder}: no {stem}[.gz] (install the Debian package dataset-fashion-mnist)")


def fashion_mnist_to_folder(out_dir: str | Path, source: str | Path | None = None, *, split: str = "test",
                            limit: int | None = None) -> Path:
    """Fashion-MNIST IDX files (t10k-* for test, train-*) -> out_dir/<NN_class>/<index>.png (RGB) and
    out_dir/class_names.json ({dir: official name}); earlier PNGs in those dirs are removed. Returns out_dir.
    `source` (the IDX folder) may be a URI prefix; out_dir is a local folder."""
    folder = str(source or FASHION_MNIST_DIR)
    prefix = {"test": "t10k", "train": "train"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST split must be 'test' or 'train', got {split!r}")
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    n = len(images) if limit is None else min(limit, len(images))
    if n and labels[:n].max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{folder}: label {labels[:n].max()} is not a Fashion-MNIST class (0-9)")
    out = Path(out_dir)
    dirs = [f"{i:02d}_" + re.sub(r"[^a-z0-9]+", "_", c.lower()) for i, c in enumerate(FASHION_MNIST_CLASSES)]
    for d in dirs:
        (out / d).mkdir(parents=True, exist_ok=True)
        for old in (out / d).glob("*.png"):
            old.unlink()
    (out / "class_names.json").write_text(json.dumps(dict(zip(dirs, FASHION_MNIST_CLASSES)), indent=1))
    for i in range(n):
        Image.fromarray(images[i], "L").convert("RGB").save(out / dirs[labels[i]] / f"{i:05d}.png")
    return out


def fashion_mnist_listing(source: str | Path | None, out_path: str | Path, *, image_dir: str | Path | None = None,
                          split: str = "test", limit: int | None = None) -> EvalSetListing:
    """Fashion-MNIST (source: folder or URI prefix of IDX files, default the Debian package's) -> PNG
    tree in the local image_dir (default: fashion_mnist_<split> beside the listing) -> `folder` listing."""
    image_dir = Path(image_dir) if image_dir else Path(out_path).parent / f"fashion_mnist_{split}"
    root = fashion_mnist_to_folder(image_dir, source, split=split, limit=limit)
    made = folder_listing(root, out_path, class_names=root / "class_names.json", split=split)
    return EvalSetListing(made.path, "fashion_mnist", made.rows, made.class_names, made.problems)


def vqa_facts(question: str, answer: str) -> dict[str, str]:
    """What one easy-VQA Q/A pair says about the image's one shape: {"color"?, "shape"?}.
    Rules: a "what ..." answer is a colour or a shape; colour/shape words in that question hold too
    ("what color is the circle?" / "blue" -> blue circle). A yes/no question is negated by "not" or
    "is no"; when (answer is yes) != negated, its colour/shape words hold; otherwise it says nothing."""
    words = re.findall(r"[a-z]+", question.lower())
    answer = answer.strip().lower()
    if answer in ("yes", "no"):
        negated = "not" in words or words[:2] == ["is", "no"]
        if (answer == "yes") == negated:
            return {}
        candidates = words
    else:
        candidates = words + [answer]
    facts = {}
    for w in candidates:
        if w in VQA_COLORS:
            facts.setdefault("color", w)
        elif w in VQA_SHAPES:
            facts.setdefault("shape", w)
    return facts


def vqa_caption(color: str | None, shape: str | None) -> str | None:
    """"a blue circle", "a blue shape", "a circle", or None."""
    if color or shape:
        return f"a {color} {shape}" if color and shape else f"a {color} shape" if color else f"a {shape}"
    return None


def easy_vqa_listing(source: str | Path | None, out_path: str | Path, *, split: str = "test",
                     limit: int | None = None) -> EvalSetListing:
    """easy-VQA (PyPI easy-vqa; source is ignored): one caption per image from its Q/A pairs
    (`vqa_facts`, first fact wins); images with no usable fact -> problem `no_caption`."""
    try:
        import easy_vqa
    except ImportError as e:
        raise ValueError("easy_vqa eval set: the package easy-vqa is not installed (pip install easy-vqa)") from e
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA split must be 'test' or 'train', got {split!r}")
    questions, answers, image_ids = easy_vqa.get_test_questions() if split == "test" else easy_vqa.get_train_questions()
    paths = easy_vqa.get_test_image_paths() if split == "test" else easy_vqa.get_train_image_paths()
    facts: dict[int, dict[str, str]] = {}
    for q, a, image_id in zip(questions, answers, image_ids):
        found = facts.setdefault(image_id, {})
        for k, v in vqa_facts(q, a).items():
            found.setdefault(k, v)
    ids = sorted(set(facts) | set(paths))[:limit]
    rows, problems = [], []
    for image_id in ids:
        f = facts.get(image_id, {})
        caption = vqa_caption(f.get("color"), f.get("shape"))
        image, reason = _resolve(paths.get(image_id), Path("."))
        if image_id not in paths:
            image, reason = f"easy_vqa {split} image {image_id}", "missing_file"
        if reason or caption is None:
            problems.append((image, reason or "no_caption"))
            continue
        rows.append(_row(image, [caption], [], split, {"image_id": image_id, **f}))
    return _write(out_path, "easy_vqa", rows, problems)


ADAPTERS: dict[str, Callable[..., EvalSetListing]] = {
    "coco": coco_listing, "karpathy": karpathy_listing, "pairs": pairs_listing, "long": long_listing,
    "folder": folder_listing, "fashion_mnist": fashion_mnist_listing, "easy_vqa": easy_vqa_listing,
}


def write_listing(kind: str, source: str | Path | None, out_path: str | Path, **options: Any) -> EvalSetListing:
    """Write the ingest listing of eval set `source` in format `kind` (one of ADAPTERS) to out_path."""
    if kind not in ADAPTERS:
        raise ValueError(f"unknown eval set kind {kind!r}; use one of {sorted(ADAPTERS)}")
    if source is None and kind not in ("fashion_mnist", "easy_vqa"):
        raise ValueError(f"eval set kind {kind!r} needs a source file or folder")
    return ADAPTERS[kind](source, out_path, **options)
