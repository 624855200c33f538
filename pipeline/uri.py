"""Locations: a local path or a filesystem URI (s3://, gs://, hdfs://, file://), on pyarrow.fs.

Every location a user gives (listings, sources, images, stores, training storage, models,
evaluation sets, reports) goes through here, so no `Path()` is ever built from a URI
(`Path("s3://b/k")` is `s3:/b/k`). Credentials and endpoints come from the environment
pyarrow reads (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION,
GOOGLE_APPLICATION_CREDENTIALS...); `storage_env` names the ones a job hands its workers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

#: Environment variables that say how to reach object storage: a job passes the ones it was
#: given to its Ray workers (its runtime_env), so every node reads the same bucket.
STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_STORAGE_", "ARROW_S3_")
STORAGE_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_TOKEN")


class LocationError(OSError):
    """A location that cannot be read: a missing bucket, key or file. The message is one line naming it."""


def is_uri(location: str | os.PathLike) -> bool:
    """True for scheme://... (file:// included); False for a plain local path."""
    return "://" in str(location)


def is_local(location: str | os.PathLike) -> bool:
    return not is_uri(location) or str(location).startswith("file://")


def local_path(location: str | os.PathLike) -> str:
    """The absolute local path of a local location (a path or a file:// URI)."""
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif is_uri(text):
        raise ValueError(f"{text} is not on this node's disk")
    return str(Path(text).expanduser().resolve())


_FILESYSTEMS: dict[str, pafs.FileSystem] = {}
_LOCK = threading.Lock()


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a location. One filesystem per scheme and bucket per
    process (making an S3 filesystem costs a round trip)."""
    text = str(location)
    if is_local(text):
        return pafs.LocalFileSystem(), local_path(text)
    scheme, _, rest = text.partition("://")
    key = f"{scheme}://{rest.split('/', 1)[0]}"
    with _LOCK:
        fs = _FILESYSTEMS.get(key)
    if fs is None or "?" in text:
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (OSError, ValueError) as e:
            raise LocationError(f"{text}: {_one_line(e)}") from None
        with _LOCK:
            _FILESYSTEMS[key] = fs
        return fs, path
    return fs, rest.rstrip("/")  # as from_uri gives it


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a path or a URI (URIs keep their `//`)."""
    out = str(base).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def parent(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[0]


def name(location: str) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def suffix(location: str) -> str:
    """'.parquet' of .../listing.parquet (lower case); '' when there is none."""
    base = name(location)
    return base[base.rfind("."):].lower() if "." in base else ""


def absolute(location: str | os.PathLike) -> str:
    """A URI as it is; a local path made absolute (relative paths mean the current folder)."""
    return str(location) if is_uri(location) and not str(location).startswith("file://") else local_path(location)


def info(location: str) -> pafs.FileInfo:
    """The location's FileInfo (type NotFound when there is nothing there). A missing bucket
    or a refused request is a `LocationError` naming the location."""
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise LocationError(f"{location}: {_one_line(e)}") from None


def exists(location: str) -> bool:
    return info(location).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    return info(location).type == pafs.FileType.File


def is_dir(location: str) -> bool:
    return info(location).type == pafs.FileType.Directory


def require(location: str, what: str) -> pafs.FileInfo:
    """The location's FileInfo; a one-line `LocationError` when nothing is there."""
    found = info(location)
    if found.type == pafs.FileType.NotFound:
        bucket = bucket_of(location)
        if bucket and info(bucket).type == pafs.FileType.NotFound:
            raise LocationError(f"{what} {location}: bucket {bucket} does not exist")
        raise LocationError(f"{what} {location} does not exist")
    return found


def bucket_of(location: str) -> str | None:
    """s3://bucket of s3://bucket/key; None for a local location."""
    if is_local(location):
        return None
    scheme, _, rest = str(location).partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location} does not exist") from None
    except OSError as e:
        if "not found" in str(e).lower() or "NoSuchKey" in str(e) or "does not exist" in str(e):
            raise FileNotFoundError(f"{location} does not exist") from None
        raise LocationError(f"{location}: {_one_line(e)}") from None


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file: readers see all of it or nothing (a local file is written beside
    and renamed; an object store's PUT is atomic)."""
    fs, path = filesystem(location)
    folder = path.rsplit("/", 1)[0]
    fs.create_dir(folder, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{folder}/.tmp-{os.getpid()}-{path.rsplit('/', 1)[-1]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def list_files(location: str, recursive: bool = True) -> Iterator[pafs.FileInfo]:
    """The files under a folder or prefix (hidden names skipped), sorted by path."""
    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise LocationError(f"{location}: {_one_line(e)}") from None
    hidden = lambda i: any(part.startswith(".") for part in i.path[len(path):].split("/"))  # noqa: E731
    yield from sorted((i for i in infos if i.type == pafs.FileType.File and not hidden(i)), key=lambda i: i.path)


def uri_of(location: str, fs_path: str) -> str:
    """The location-style name of a path that `list_files(location)` returned: a URI under a
    URI, a local path under a local path."""
    if is_local(location):
        return fs_path
    scheme = str(location).split("://", 1)[0]
    return f"{scheme}://{fs_path}"


def upload_dir(local_dir: str | os.PathLike, dest: str) -> None:
    """Copy a local folder's files to `dest` (a URI or a local folder)."""
    fs, path = filesystem(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(source: str, local_dir: str | os.PathLike) -> None:
    """Copy the files under `source` (a URI or a local folder) into a local folder."""
    fs, path = filesystem(source)
    if info(source).type != pafs.FileType.Directory:
        raise LocationError(f"{source} is not a folder or prefix")
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def storage_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The storage settings in an environment (this process's by default): what a job hands its workers."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(STORAGE_ENV_PREFIXES) or k in STORAGE_ENV}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300]
