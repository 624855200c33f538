"""Retrieval metrics on embeddings (numpy, no Ray).

* `caption_retrieval_accuracy` (CRA, the LLM2CLIP paper's text-model probe): N pairs of
  captions of one image; each of the 2N captions queries the other 2N - 1 and scores a hit
  when its top-1 neighbour (cosine) is its partner.
* `retrieval_recall`: image<->text recall@K in both directions; an image with several
  captions counts as found by text when its own image is in the top K, and finds its text
  when any of its captions is in the top K.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def caption_retrieval_accuracy(first: np.ndarray, second: np.ndarray) -> float:
    """Top-1 accuracy over all 2N captions; first[i] and second[i] describe image i."""
    if len(first) != len(second) or len(first) < 2:
        raise ValueError(f"need N >= 2 pairs of equal length, got {len(first)} and {len(second)}")
    n = len(first)
    emb = _normalise(np.concatenate([first, second]))
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)  # a caption does not retrieve itself
    partner = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    return float(np.mean(sims.argmax(axis=1) == partner))


def pairs_cra(encode: Callable[[list[str]], np.ndarray], pairs: Sequence[tuple[str, str]]) -> float:
    """CRA of text pairs under `encode` (a list of texts -> one embedding row per text)."""
    first = np.asarray(encode([a for a, _ in pairs]))
    second = np.asarray(encode([b for _, b in pairs]))
    return caption_retrieval_accuracy(first, second)


def retrieval_recall(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """{'i2t_r@K': ..., 't2i_r@K': ...}; text j describes image text_to_image[j]."""
    owner = np.asarray(text_to_image)
    if len(owner) != len(text_emb):
        raise ValueError("text_to_image needs one image index per text")
    sims = _normalise(image_emb) @ _normalise(text_emb).T  # (images, texts)
    out: dict[str, float] = {}
    i2t_rank = np.argsort(-sims, axis=1, kind="stable")
    t2i_rank = np.argsort(-sims.T, axis=1, kind="stable")
    for k in ks:
        top_texts = owner[i2t_rank[:, :k]]  # owners of each image's top-k texts
        out[f"i2t_r@{k}"] = float(np.mean((top_texts == np.arange(len(image_emb))[:, None]).any(axis=1)))
        out[f"t2i_r@{k}"] = float(np.mean((t2i_rank[:, :k] == owner[:, None]).any(axis=1)))
    return out
