"""Image reading, validation and normalisation (no Ray, no MLflow).

`inspect_image` decides whether bytes are a usable image and why not; `to_rgb` turns any
accepted image (CMYK, 16-bit, palette, alpha, grayscale...) into 8-bit RGB for models.
Limits are checked from the header before decoding, so decompression bombs and huge
images are rejected without allocating their pixels.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # the model code (clip_model -> image_transforms) runs without pyarrow/pydantic
    from pipeline.config import ImageLimits


class Reject:
    """Machine-readable reasons a record is rejected (the rejects store's `reason`)."""

    MISSING_FILE = "missing_file"
    UNREADABLE = "unreadable"
    EMPTY_FILE = "empty_file"
    FILE_TOO_LARGE = "file_too_large"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated_or_corrupt"
    DECOMPRESSION_BOMB = "decompression_bomb"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    DUPLICATE = "duplicate_image"
    NO_IMAGE_MEMBER = "no_image_member"  # a shard's sample (key) with captions but no image
    DOWNLOAD_FAILED = "download_failed"  # img2dataset's parquet: the download failed, nothing in the shard
    MISSING_FROM_SHARD = "missing_from_shard"  # img2dataset's parquet says success, the shard lacks it
    CHANGED_SINCE_INGEST = "changed_since_ingest"


@dataclass(frozen=True)
class ImageCheck:
    ok: bool
    sha256: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    reason: str = ""
    detail: str = ""

    @property
    def image_id(self) -> str:
        return image_id_for(self.sha256)


def image_id_for(sha256: str) -> str:
    """Stable image id: the same bytes get the same id on every run, wherever they live."""
    return sha256[:16]


def read_uri(uri: str, max_bytes: int | None = None) -> bytes:
    """Bytes of a local path, a pyarrow filesystem URI or a tar shard's member reference
    (`pipeline.shards`: one byte-range read); FileNotFoundError if absent."""
    import pyarrow.fs as pafs

    from pipeline.shards import parse_member, read_member
    from pipeline.uri import filesystem

    member = parse_member(uri)
    if member is not None:
        if max_bytes is not None and member.size > max_bytes:
            raise OverflowError(f"{member.size} bytes > limit {max_bytes}")
        try:
            return read_member(member)
        except EOFError as e:
            raise OSError(str(e)) from None
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(uri)
    if max_bytes is not None and info.size is not None and info.size > max_bytes:
        raise OverflowError(f"{info.size} bytes > limit {max_bytes}")
    with fs.open_input_stream(path) as f:
        return f.read()


def read_image_bytes(uri: str, max_bytes: int) -> tuple[bytes | None, str, str]:
    """(bytes, '', '') or (None, reason, detail) for a missing, too large or unreadable file."""
    if not uri:
        return None, Reject.MISSING_FILE, "no image path"
    try:
        return read_uri(uri, max_bytes=max_bytes), "", ""
    except FileNotFoundError:
        return None, Reject.MISSING_FILE, f"no file at {uri}"
    except OverflowError as e:
        return None, Reject.FILE_TOO_LARGE, str(e)
    except OSError as e:
        return None, Reject.UNREADABLE, f"{type(e).__name__}: {e}"


def read_ingested_bytes(uri: str, sha256: str, max_bytes: int) -> tuple[bytes | None, str, str]:
    """An ingested image's bytes, or why not: besides `read_image_bytes`'s reasons, bytes that
    no longer hash to the manifest's sha256 are refused (the image id would lie)."""
    data, reason, detail = read_image_bytes(uri, max_bytes)
    if data is not None and sha256 and hashlib.sha256(data).hexdigest() != sha256:
        return None, Reject.CHANGED_SINCE_INGEST, f"{uri} no longer has the bytes ingested as {sha256[:16]}"
    return data, reason, detail


def inspect_image(data: bytes, limits: ImageLimits) -> ImageCheck:
    """Decode `data` fully under `limits`; ok with sha256/size/mode, or a reason."""
    if len(data) == 0:
        return ImageCheck(False, reason=Reject.EMPTY_FILE, detail="zero-byte file")
    if len(data) > limits.max_bytes:
        return ImageCheck(False, reason=Reject.FILE_TOO_LARGE, detail=f"{len(data)} bytes > {limits.max_bytes}")
    sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between 1x and 2x its own bomb limit; we check ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return ImageCheck(False, sha256=sha, reason=Reject.NOT_AN_IMAGE, detail="not a recognised image format")
    except Image.DecompressionBombError as e:
        return ImageCheck(False, sha256=sha, reason=Reject.DECOMPRESSION_BOMB, detail=str(e))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a reject, never a crash
        return ImageCheck(False, sha256=sha, reason=Reject.NOT_AN_IMAGE, detail=f"{type(e).__name__}: {e}")
    width, height = img.size
    base = dict(sha256=sha, width=width, height=height, mode=img.mode, format=img.format or "")
    if width * height > limits.max_pixels:
        return ImageCheck(
            False, **base, reason=Reject.DECOMPRESSION_BOMB,
            detail=f"{width}x{height} = {width * height} pixels > max_pixels {limits.max_pixels}",
        )
    if max(width, height) > limits.max_side:
        return ImageCheck(False, **base, reason=Reject.TOO_LARGE, detail=f"{width}x{height} > max_side {limits.max_side}")
    if min(width, height) < limits.min_side:
        return ImageCheck(False, **base, reason=Reject.TOO_SMALL, detail=f"{width}x{height} < min_side {limits.min_side}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()  # decodes every pixel: truncated files fail here
    except Exception as e:  # noqa: BLE001
        return ImageCheck(False, **base, reason=Reject.TRUNCATED, detail=f"{type(e).__name__}: {e}")
    return ImageCheck(True, **base)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """8-bit RGB from any PIL mode: alpha is composited on `background`, 16/32-bit
    grayscale is rescaled (not clipped), palette and CMYK are converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGB", img.size, background)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_rgb(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode bytes that passed `inspect_image` into RGB (raises ValueError otherwise)."""
    check = inspect_image(data, limits)
    if not check.ok:
        raise ValueError(f"{check.reason}: {check.detail}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return to_rgb(Image.open(io.BytesIO(data)))
