"""Pairs of captions of one image, for CRA and for contrastive fine-tuning (no Ray).

Protocols (state one next to every CRA figure):
* `short-short`: the first two original captions of an image (the paper's COCO protocol:
  the first two human captions);
* `short-dense`: the first original caption and the image's dense caption.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

PROTOCOLS = ("short-short", "short-dense")


def caption_pairs(manifest: pa.Table, captions: pa.Table, split: str | None, protocol: str) -> list[tuple[str, str]]:
    """(caption_id, caption_id) pairs for the images of `split` (all images when None),
    in manifest order. `captions` holds rows of the caption store (any versions)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    originals: dict[tuple[str, str], str] = {}
    dense: dict[str, list[str]] = defaultdict(list)
    cols = captions.select(["caption_id", "image_id", "text", "source"]).to_pylist()
    for row in sorted(cols, key=lambda r: r["caption_id"]):
        if row["source"] == "original":
            originals.setdefault((row["image_id"], row["text"]), row["caption_id"])
        elif row["source"] == "dense":
            dense[row["image_id"]].append(row["caption_id"])
    pairs = []
    for image in manifest.select(["image_id", "split", "captions"]).to_pylist():
        if split is not None and image["split"] != split:
            continue
        short = [originals.get((image["image_id"], t)) for t in image["captions"][:2]]
        if protocol == "short-short":
            if len(short) == 2 and all(short):
                pairs.append((short[0], short[1]))
        elif short and short[0] and dense[image["image_id"]]:
            pairs.append((short[0], dense[image["image_id"]][0]))
    return pairs


def version_pairs(first: pa.Table, second: pa.Table, same_version: bool) -> list[tuple[str, str, str]]:
    """(image_id, text_a, text_b) for every image with captions in both tables (caption-store
    rows in write order): its first `first` caption with the first `second` caption that is a
    different text (with `same_version`, the image's second caption)."""
    by_image_a: dict[str, list[str]] = defaultdict(list)
    by_image_b: dict[str, list[str]] = defaultdict(list)
    for image_id, text in zip(first.column("image_id").to_pylist(), first.column("text").to_pylist()):
        by_image_a[image_id].append(text)
    for image_id, text in zip(second.column("image_id").to_pylist(), second.column("text").to_pylist()):
        by_image_b[image_id].append(text)
    pairs = []
    for image_id, texts in by_image_a.items():
        a = texts[0]
        candidates = texts[1:] if same_version else by_image_b.get(image_id, [])
        b = next((t for t in candidates if t.strip() and t != a), None)
        if a.strip() and b is not None:
            pairs.append((image_id, a, b))
    return pairs
