"""A corpus of bad and odd images, written to a folder with a listing that names them.

Used by ingest tests now and recaption tests later: every entry must end as an accepted
(normalised) image or a reject with the expected reason, never a crash.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> expected reject reason, or None when the image must be accepted (and normalised)
EXPECTED: dict[str, str | None] = {
    "good.png": None,
    "cmyk.jpg": None,
    "gray16.png": None,
    "palette.png": None,
    "palette_transparent.png": None,
    "rgba.png": None,
    "la.png": None,
    "bilevel.png": None,
    "empty.png": "empty_file",
    "text.jpg": "not_an_image",
    "truncated.jpg": "truncated_or_corrupt",
    "truncated.png": "truncated_or_corrupt",
    "bomb.png": "decompression_bomb",
    "huge.png": "too_large",
    "tiny.png": "too_small",
    "missing.png": "missing_file",
    "a_directory.png": "unreadable",
}
# Limits used with this corpus (small, so "huge" and "bomb" files stay small on disk).
LIMITS = {"min_side": 8, "max_side": 2048, "max_pixels": 3_000_000}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def write_corpus(folder: Path) -> Path:
    """Write the corpus into `folder` and return a JSONL listing of it (with captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    rgb.save(folder / "good.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 27).astype(np.uint16)).save(folder / "gray16.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(folder / "palette_transparent.png", transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (40, 60), dtype=np.uint8)))
    rgba.save(folder / "rgba.png")
    rgba.convert("LA").save(folder / "la.png")
    rgb.convert("1").save(folder / "bilevel.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n" * 10)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "bomb.png").write_bytes(_png_header_only(30_000, 30_000))
    Image.new("RGB", (3000, 200), (10, 20, 30)).save(folder / "huge.png")  # 600k px, side too long
    Image.new("RGB", (4, 4), (1, 2, 3)).save(folder / "tiny.png")
    (folder / "a_directory.png").mkdir(exist_ok=True)
    listing = folder / "listing.jsonl"
    with open(listing, "w") as f:
        for name in EXPECTED:
            f.write(json.dumps({"image": name, "captions": [f"a picture called {name}"]}) + "\n")
    return listing
