"""WebDataset shards as img2dataset writes them and open_clip reads them (no Ray).

A shard is a tar file `{00000..N}.tar` of samples; a sample is the tar members that share a
key (`{key}.png`, `{key}.txt`, ...), written one after the other, which is how
`webdataset.WebDataset` groups them. Beside the shards: `sizes.json` ({shard name: samples},
what open_clip's `get_dataset_size` reads, so `--train-num-samples` is optional) and
`_index.json` (the export's `ExportIndex`), written last: a folder without it is an
interrupted export. Shards stream to their location (a path or any pyarrow filesystem URI),
one member at a time, so a shard's images are never all in memory.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from pipeline import uri
from pipeline.store import read_record, write_record

SHARD_DIGITS = 5  # img2dataset's 00000.tar
SIZES_FILE = "sizes.json"
INDEX_FILE = "_index.json"
FORMAT_VERSION = 1  # what a sample holds; part of an export's key, so a change rewrites old exports
#: The image members open_clip reads (`rename(image="jpg;png;jpeg;webp")`), by PIL format.
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}
_SHARD_RE = re.compile(r"^\d+\.tar$")
_MTIME = 0  # members carry no time: the same export writes the same bytes


def shard_name(index: int, num_shards: int) -> str:
    """`00042.tar`: zero-padded to 5 digits, or more when there are more shards."""
    return f"{index:0{max(SHARD_DIGITS, len(str(max(num_shards - 1, 0))))}d}.tar"


def shard_pattern(location: str, num_shards: int) -> str:
    """The brace pattern of every shard, as webdataset and open_clip's --train-data take it."""
    if num_shards == 0:
        return ""
    first, last = shard_name(0, num_shards), shard_name(num_shards - 1, num_shards)
    return uri.join(location, f"{{{first[:-4]}..{last[:-4]}}}.tar")


def image_member(data: bytes) -> tuple[str, bytes, str]:
    """(extension, bytes, converted_from) of an image: JPEG, PNG and WebP as they are; any other
    format (GIF, BMP, TIFF, ...) re-encoded losslessly as PNG, since open_clip reads only
    jpg/png/jpeg/webp members. Raises PIL's errors for bytes that are no image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ingest checked the limits
        img = Image.open(io.BytesIO(data))
        if img.format in KEPT_FORMATS:
            return KEPT_FORMATS[img.format], data, ""
        img.load()
    source = img.format or "unknown"
    if img.mode not in PNG_MODES:  # CMYK, YCbCr, 32-bit...: PNG has no such mode
        from pipeline.images import to_rgb

        img = to_rgb(img)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return "png", out.getvalue(), source


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as a `.npy` file (what webdataset's decoder reads back with np.load)."""
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def json_bytes(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()


@dataclass
class Sample:
    """One sample: its key (no dots: webdataset splits keys at the first dot) and members by extension."""

    key: str
    members: dict[str, bytes]

    def __post_init__(self) -> None:
        if "." in self.key or "/" in self.key:
            raise ValueError(f"a sample key has no '.' or '/': {self.key!r}")


class _Counted:
    """A write-only stream that counts what passes (tarfile's stream mode needs only write)."""

    def __init__(self, stream):
        self.stream, self.size = stream, 0

    def write(self, data) -> int:
        self.stream.write(data)
        self.size += len(data)
        return len(data)


def write_tar(location: str, samples: Iterable[Sample]) -> tuple[int, int]:
    """Stream samples into a tar at `location`; returns (samples, bytes). A local shard is
    written beside and renamed, so its name never holds half a shard; an object store's
    upload appears when it completes."""
    fs, path = uri.filesystem(location)
    folder, name = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{folder}/.tmp-{name}" if local else path
    count = 0
    with fs.open_output_stream(target) as stream:
        counted = _Counted(stream)
        with tarfile.open(fileobj=counted, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                for ext, data in sample.members.items():
                    info = tarfile.TarInfo(f"{sample.key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
                    tar.addfile(info, io.BytesIO(data))
                count += 1
    if local:
        fs.move(target, path)
    return count, counted.size


def clear_export(location: str) -> list[str]:
    """Remove what an export writes under `location` (its index first, then the shards and
    sizes): an interrupted or outdated export is redone from nothing. Other files are left alone."""
    fs, path = uri.filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    ours = [i.path for i in infos if i.type == pafs.FileType.File and
            (_SHARD_RE.match(i.base_name) or i.base_name in (SIZES_FILE, INDEX_FILE) or i.base_name.startswith(".tmp-"))]
    for p in sorted(ours, key=lambda p: not p.endswith(INDEX_FILE)):  # the completion marker goes first
        fs.delete_file(p)
    return ours


def write_sizes(location: str, sizes: dict[str, int]) -> None:
    uri.write_text(uri.join(location, SIZES_FILE), json.dumps(sizes, indent=1, sort_keys=True))


@dataclass(frozen=True)
class ExportIndex:
    """`_index.json`: what an export holds, written last. `key` names its inputs and options;
    an export whose index has the key a config asks for is complete, and a re-run does nothing."""

    key: str
    dataset: str
    split: str | None
    caption_versions: list[str]
    encoder_version: str | None
    embedding_dtype: str | None  # of the .npy members (None: no .npy)
    dim: int | None
    samples_per_shard: int
    shards: int
    images: int  # manifest images (of the split) = samples + rejected
    samples: int
    captions: int  # captions in the samples' .json (and rows of their .npy)
    captions_without_embedding: int  # left out of the samples: the embedding version has no row for them
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> images
    format: int = FORMAT_VERSION
    created_at: str = ""
    mlflow_run_id: str | None = None


def read_index(location: str) -> ExportIndex | None:
    fs, path = uri.filesystem(uri.join(location, INDEX_FILE))
    return read_record(fs, path, ExportIndex)


def write_index(location: str, index: ExportIndex) -> None:
    fs, path = uri.filesystem(uri.join(location, INDEX_FILE))
    write_record(fs, path, index)
