"""Stage-2 samples, without Ray: a sample is one image plus every caption of it the text
side can read, from every configured caption version (each caption's cached LLM embedding,
or its text for the CLIP text-tower baseline).

Every epoch a sample draws one caption (a version by the configured weights among those it
has, then one caption of that version uniformly) and its image is read, checked against
the manifest's sha256, decoded and randomly crop-resized; held-out images are centre
cropped and keep all their captions. Pixels leave as uint8 (H, W, 3): a quarter of the
bytes of normalised floats cross the object store, and the training step normalises them
on its device (`normalise_pixels`).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.image_transforms import random_resized_crop, resize_center_crop
from pipeline.images import Reject, read_ingested_bytes, to_rgb

#: What a sample carries per caption: the cached LLM embedding, or the caption's text.
PAYLOAD = {"llm": "embedding", "clip": "text"}


def order_key(seed: int, image_id: str) -> int:
    """A sample's place in the run's order: a seeded hash, so the order (and the sample ids
    counted along it) depends on the run's content and seed only."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{image_id}".encode()).digest()[:7], "big")


def sample_digest(image_id: str, caption_ids: Sequence[str]) -> int:
    """A sample's contribution to the run's content digest (summed, so block order and
    partitioning do not matter)."""
    text = image_id + "|" + "|".join(sorted(caption_ids))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def draw_caption(versions: Sequence[str], weights: Mapping[str, float], rng: np.random.Generator) -> int | None:
    """Index of the caption a sample trains on: a version drawn by weight among those the
    sample has, then one of its captions of that version uniformly; None if none has weight."""
    present = sorted(set(versions) & {v for v, w in weights.items() if w > 0})
    if not present:
        return None
    p = np.array([weights[v] for v in present], dtype=np.float64)
    version = present[rng.choice(len(present), p=p / p.sum())]
    options = [i for i, v in enumerate(versions) if v == version]
    return options[rng.integers(len(options))]


def load_image(uri: str, sha256: str, max_bytes: int) -> tuple[Image.Image | None, str, str]:
    """An ingested image as RGB, or (None, reason, detail) when it cannot be read any more."""
    data, reason, detail = read_ingested_bytes(uri, sha256, max_bytes)
    if data is None:
        return None, reason, detail
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return to_rgb(image), "", ""
    except Exception as e:  # noqa: BLE001 - any decoder failure is a reject, never a crash
        return None, Reject.TRUNCATED, f"{type(e).__name__}: {e}"


def prepare_batch(batch: pa.Table, size: int, payload: str, max_bytes: int, train: bool,
                  crop_scale: tuple[float, float] = (0.9, 1.0), weights: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Sample rows (sample_id, image_id, uri, sha256, caption_version[], <payload>[]) -> a
    numpy batch: sample_id, image_id, pixels uint8 (b, size, size, 3), reason, detail, and
    for training the drawn caption (`payload` as one row each, caption_version), for
    evaluation every caption (caption_version[], <payload>[]). A row whose image cannot be
    read keeps black pixels and says why in `reason`."""
    rng = np.random.default_rng()  # augmentation: fresh every epoch
    rows = batch.to_pydict()
    n = batch.num_rows
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    reasons, details = [""] * n, [""] * n
    for i in range(n):
        image, reasons[i], details[i] = load_image(rows["uri"][i], rows["sha256"][i], max_bytes)
        if image is not None:
            image = random_resized_crop(image, size, crop_scale, rng=rng) if train else resize_center_crop(image, size)
            pixels[i] = np.asarray(image, dtype=np.uint8)
    out = {"sample_id": np.asarray(rows["sample_id"], dtype=np.int64), "image_id": np.asarray(rows["image_id"], dtype=object),
           "pixels": pixels, "reason": np.asarray(reasons, dtype=object), "detail": np.asarray(details, dtype=object)}
    if not train:
        out["caption_version"] = np.asarray(rows["caption_version"] + [None], dtype=object)[:-1]  # a 1-d array of lists
        out[payload] = np.asarray(rows[payload] + [None], dtype=object)[:-1]
        return out
    picks = [draw_caption(versions, weights or {}, rng) for versions in rows["caption_version"]]
    out["caption_version"] = np.asarray([v[k] if k is not None else "" for v, k in zip(rows["caption_version"], picks)], dtype=object)
    if payload == "embedding":  # float16 (or older float32) in the store, float32 for training
        dim = next((len(e[0]) for e in rows["embedding"] if e), 0)
        out["embedding"] = np.stack([np.asarray(e[k], dtype=np.float32) if k is not None else np.zeros(dim, np.float32)
                                     for e, k in zip(rows["embedding"], picks)]) if n else np.zeros((0, dim), np.float32)
    else:
        out["text"] = np.asarray([t[k] if k is not None else "" for t, k in zip(rows["text"], picks)], dtype=object)
    return out


def normalise_pixels(pixels, mean: Sequence[float], std: Sequence[float]):
    """uint8 (b, H, W, 3) torch tensor -> float (b, 3, H, W) normalised as the tower expects."""
    import torch

    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------- the adapter's input
@dataclass(frozen=True)
class TextStandardisation:
    """Per-dimension shift and scale of L2-normalised LLM embeddings (what `TextAdapter`
    applies first): the training captions' mean, and 1 / (std * sqrt(dim)), so that a
    standardised embedding has unit norm on average.

    Why: a mean-pooled LLM embedding is dominated by a direction every caption shares (raw
    SmolLM2's dense captions of the demo's scenes: mean cosine 0.94) and by a few
    high-variance dimensions, so what tells two captions apart is small. Standardised, the
    adapter gets those differences at full scale from its first step."""

    shift: tuple[float, ...]
    scale: tuple[float, ...]


def _embedding_rows(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, dim) float64 from an embedding column, whatever its nesting: one embedding per
    row, or a list of them (a sample's captions). Null embeddings are left out."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = 0
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        lengths = pc.list_value_length(values).drop_null()
        dim = int(pc.max(lengths).as_py() or 0) if len(lengths) else 0  # the innermost list's length is the last one kept
        values = pc.list_flatten(values)
    flat = values.to_numpy(zero_copy_only=False).astype(np.float64)
    return flat.reshape(-1, dim) if dim else np.zeros((0, 0))


def embedding_moments(batch: pa.Table) -> pa.Table:
    """One row: count, sum and sum of squares of the batch's L2-normalised embeddings (Ray
    Data sums them over a split: `standardisation`)."""
    x = _embedding_rows(batch.column("embedding"))
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return pa.table({"count": [len(x)], "sum": [x.sum(axis=0).tolist()], "sum_sq": [(x * x).sum(axis=0).tolist()]})


def standardisation(moments: Iterable[Mapping]) -> TextStandardisation:
    """The standardisation of the embeddings whose `embedding_moments` rows these are."""
    rows = [m for m in moments if m["count"]]
    if not rows:
        raise ValueError("no caption embeddings to standardise the adapter's input on")
    n = sum(m["count"] for m in rows)
    mean = sum(np.asarray(m["sum"]) for m in rows) / n
    var = np.maximum(sum(np.asarray(m["sum_sq"]) for m in rows) / n - mean**2, 0.0)
    std = np.sqrt(var)
    std = np.maximum(std, 0.01 * float(np.median(std)) + 1e-12)  # a dimension that never varies is not blown up
    return TextStandardisation(shift=tuple(mean.tolist()), scale=tuple((1.0 / (std * np.sqrt(len(std)))).tolist()))
