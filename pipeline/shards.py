"""WebDataset tar shards, as img2dataset writes them, read over `pipeline.uri` (no Ray).

A shard source is a brace pattern (`s3://b/cc3m/{00000..00331}.tar`), one `.tar`, or a folder
or prefix holding `.tar` files (an img2dataset output folder: `00000.tar` with `00000.parquet`
and `00000_stats.json` beside it).

A sample is the members that share a key: `a/000123.jpg`, `a/000123.txt`, `a/000123.json` are
sample `a/000123` (WebDataset's rule: the key is the name up to the first dot of its base
name). Members are grouped by key over the whole shard, not by neighbours, so a shard whose
members are out of order reads right (Ray Data's `read_webdataset` mixes them up, ray#44068),
and no per-sample DataFrame is built (ray#65350).

An image stays in its shard: it is referenced as `{shard}#member=NAME&offset=O&size=N` (a
*member reference*) and read later by one byte-range read (`read_member`), so a dataset is not
copied a second time into an image cache.

Damage is per member, not per shard: a member cut short ends the shard there (`truncated`); a
header that fails its checksum is skipped block by block until the next good header (tarfile's
`ignore_zeros`), and the bytes skipped are reported as one damaged region.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlencode

import pyarrow.fs as pafs

from pipeline import uri

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm"}
SHARD_SUFFIX = ".tar"
_BLOCK = 512


def is_pattern(source: str) -> bool:
    return "{" in source and "}" in source


def is_shard_source(source: str) -> bool:
    """A brace pattern, a `.tar`, or a folder or prefix whose files include `.tar` shards and no
    image (a folder of images with a stray archive in it stays a folder of images)."""
    location = uri.absolute(source)
    if is_pattern(source) or uri.suffix(location) == SHARD_SUFFIX:
        return True
    try:
        if not uri.is_dir(location):
            return False
        fs, path = uri.filesystem(location)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        names = [i.base_name for i in infos if i.type == pafs.FileType.File]
        return any(n.endswith(SHARD_SUFFIX) for n in names) and not any(split_key(n)[1] in IMAGE_EXTENSIONS for n in names)
    except (OSError, uri.LocationError):
        return False


def shard_locations(source: str) -> list[str]:
    """The shards of a source, sorted: a brace pattern expanded (every shard must exist: a
    missing one is a `LocationError` naming it), a single shard, or the `.tar` files directly
    in a folder or prefix."""
    from braceexpand import braceexpand

    location = uri.absolute(source) if not is_pattern(source) else source
    if is_pattern(source):
        shards = [uri.absolute(s) for s in braceexpand(source)]
        missing = [s for s in shards if not uri.is_file(s)]
        if missing:
            raise uri.LocationError(f"ingest source {source}: {len(missing)} of {len(shards)} shards do not exist, e.g. {missing[0]}")
        return sorted(shards)
    if uri.suffix(location) == SHARD_SUFFIX:
        uri.require(location, "ingest source")
        return [location]
    fs, path = uri.filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(uri.uri_of(location, i.path) for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(SHARD_SUFFIX))


# ---------------------------------------------------------------- member references
@dataclass(frozen=True)
class MemberRef:
    """Where one member's bytes are: a byte range of a shard."""

    shard: str
    member: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.shard}#{urlencode({'member': self.member, 'offset': self.offset, 'size': self.size}, quote_via=quote)}"


def parse_member(location: str) -> MemberRef | None:
    """The member a reference names, or None when `location` is not a member reference."""
    shard, hash_, fragment = location.rpartition("#")
    if not hash_ or not fragment.startswith("member="):
        return None
    fields = dict(parse_qsl(fragment))
    return MemberRef(shard, fields["member"], int(fields["offset"]), int(fields["size"]))


def sample_uri(shard: str, key: str) -> str:
    """A sample that has no image member to point at (a failed download, a sample without image)."""
    return f"{shard}#{urlencode({'key': key}, quote_via=quote)}"


def region_uri(shard: str, offset: int) -> str:
    """Damaged bytes of a shard that are no member (a header that failed its checksum)."""
    return f"{shard}#offset={offset}"


#: The fragment of a location inside a shard: a member, a sample (key) or a damaged region.
FRAGMENT_REGEX = r"#(member|key|offset)=.*$"


def shard_of(location: str) -> str:
    """The shard a member reference or sample uri belongs to (the location itself otherwise)."""
    return re.sub(FRAGMENT_REGEX, "", location)


def read_member(ref: MemberRef) -> bytes:
    """One member's bytes by a single byte-range read of its shard."""
    fs, path = uri.filesystem(ref.shard)
    with fs.open_input_file(path) as f:
        data = f.read_at(ref.size, ref.offset)
    if len(data) != ref.size:
        raise EOFError(f"{ref.shard} ends before member {ref.member} ({len(data)} of {ref.size} bytes)")
    return data


# ---------------------------------------------------------------- reading a shard
@dataclass
class Sample:
    """One key's members as read from a shard: the image (bytes, reference), caption texts, JSON."""

    key: str
    image: object = None  # what `inspect` made of the image's bytes (the bytes are not kept)
    image_ref: MemberRef | None = None
    texts: list[str] = field(default_factory=list)  # .txt members
    meta: dict | None = None  # the .json member
    damage: str = ""  # why its image could not be read ('' when it could)


@dataclass
class ShardRead:
    """Everything a shard held, by key (in the order first seen), and the damage found."""

    samples: dict[str, Sample]
    damaged: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of byte regions that were no member
    truncated: str = ""  # the shard ended inside a member or a header


def split_key(name: str) -> tuple[str, str]:
    """(key, extension): `a/000123.seg.png` -> (`a/000123`, `seg.png`), WebDataset's rule."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def read_shard(shard: str, inspect: Callable[[bytes], object]) -> ShardRead:
    """Read every member of a shard in one sequential pass: each image's bytes go to `inspect`
    at once (a shard's images are never all in memory), its byte range is kept; caption texts
    and JSON by key."""
    fs, path = uri.filesystem(shard)
    out = ShardRead({})
    expected = 0  # where the next header should start: a gap means skipped (damaged) blocks
    with fs.open_input_stream(path) as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", ignore_zeros=True)
        except tarfile.TarError as e:
            out.truncated = f"not a tar file: {e}"
            return out
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, EOFError, OSError) as e:
                out.truncated = f"unreadable header after byte {expected}: {e}"
                break
            if info is None:
                break
            if info.offset > expected:
                out.damaged.append((expected, info.offset))
            expected = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
            if not info.isfile():
                continue
            key, ext = split_key(info.name)
            sample = out.samples.setdefault(key, Sample(key))
            try:
                data = tar.extractfile(info).read()
            except (tarfile.TarError, EOFError, OSError) as e:
                out.truncated = f"member {info.name} is cut short: {e}"
                if ext in IMAGE_EXTENSIONS:
                    sample.damage = out.truncated
                break
            if ext in IMAGE_EXTENSIONS:
                if sample.image_ref is None:  # a second image of one key (e.g. a mask) is not the sample's image
                    sample.image, sample.image_ref = inspect(data), MemberRef(shard, info.name, info.offset_data, info.size)
            elif ext == "txt":
                sample.texts.append(data.decode("utf-8", errors="replace"))
            elif ext == "json":
                try:
                    sample.meta = json.loads(data.decode("utf-8", errors="replace"))
                except ValueError:
                    sample.meta = None
    return out


def companion(shard: str, suffix: str) -> str:
    """img2dataset's files beside a shard: `00000.tar` -> `00000.parquet`, `00000_stats.json`."""
    return shard[: -len(SHARD_SUFFIX)] + suffix
