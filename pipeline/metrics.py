"""Evaluation metrics on embeddings (numpy, no Ray): one function per metric, used by every
stage that reports it (finetune-text, train-clip's validation, evaluate).

* `caption_retrieval_accuracy` (CRA, the LLM2CLIP paper's text-model probe): N pairs of
  captions of one image; each of the 2N captions queries the other 2N - 1 and scores a hit
  when its top-1 neighbour (cosine) is its partner. `cra_protocol` says so in one line.
* `retrieval_scores`: image<->text recall@K in both directions from a similarity matrix and
  a positives matrix. An image hits at K when any of its captions is among its top K texts,
  a text hits when its image is among its top K images: CLIP_benchmark's definition, which
  this is exactly when every text describes one image. A text shared by several images
  (deduplicated captions) has all of them as positives. Ties keep index order.
* `zero_shot_scores`: top-k accuracy of images against class embeddings, each the mean of
  the normalised template embeddings of a class (`class_embeddings`), renormalised.
  `mean_per_class_recall` (balanced accuracy, CLIP_benchmark's third classification metric)
  comes from the top-1 `confusion_matrix`.
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


def cra_protocol(num_pairs: int) -> str:
    """The CRA protocol in one line, written beside every CRA figure."""
    return (f"CRA: {num_pairs} caption pairs; each of the {2 * num_pairs} captions queries the other {2 * num_pairs - 1} "
            "(the other captions of the set, its own partner among them) by cosine; a hit when its partner is top-1")


def pairs_cra(encode: Callable[[list[str]], np.ndarray], pairs: Sequence[tuple[str, str]]) -> float:
    """CRA of text pairs under `encode` (a list of texts -> one embedding row per text)."""
    first = np.asarray(encode([a for a, _ in pairs]))
    second = np.asarray(encode([b for _, b in pairs]))
    return caption_retrieval_accuracy(first, second)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) cosine similarities."""
    return _normalise(a) @ _normalise(b).T


def _first_positive_rank(sims: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Per row: the 0-based rank of its best-ranked positive column (len(row) when it has none)."""
    order = np.argsort(-sims, axis=1, kind="stable")
    hits = np.take_along_axis(positives, order, axis=1)
    return np.where(hits.any(axis=1), hits.argmax(axis=1), sims.shape[1])


def _check_positives(sims: np.ndarray, positives: np.ndarray) -> np.ndarray:
    positives = np.asarray(positives, dtype=bool)
    if sims.shape != positives.shape:
        raise ValueError(f"similarities {sims.shape} and positives {positives.shape} differ in shape")
    return positives


def retrieval_scores(sims: np.ndarray, positives: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """{'i2t_r@K': ..., 't2i_r@K': ...} for sims (images, texts) and positives (images, texts):
    positives[i, j] when text j describes image i."""
    sims = np.asarray(sims, dtype=np.float64)
    positives = _check_positives(sims, positives)
    i2t = _first_positive_rank(sims, positives)
    t2i = _first_positive_rank(sims.T, positives.T)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float(np.mean(i2t < k))
        out[f"t2i_r@{k}"] = float(np.mean(t2i < k))
    return out


def recall_curve(sims: np.ndarray, positives: np.ndarray, max_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(i2t, t2i) recall at K = 1..max_k, for recall@K plots (same definition as retrieval_scores)."""
    sims = np.asarray(sims, dtype=np.float64)
    positives = _check_positives(sims, positives)
    i2t = _first_positive_rank(sims, positives)
    t2i = _first_positive_rank(sims.T, positives.T)
    ks = np.arange(1, max_k + 1)
    return (i2t[None, :] < ks[:, None]).mean(axis=1), (t2i[None, :] < ks[:, None]).mean(axis=1)


def _chance_hit(candidates: int, positives: int, k: int) -> float:
    """P(at least one of `positives` among the top k of a uniformly random order of `candidates`)."""
    miss = 1.0
    for i in range(min(k, candidates)):
        miss *= max(candidates - positives - i, 0) / (candidates - i)
    return 1.0 - miss


def retrieval_chance(positives: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """What a random ranking scores on retrieval_scores' metrics (same keys)."""
    positives = np.asarray(positives, dtype=bool)
    n_images, n_texts = positives.shape
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float(np.mean([_chance_hit(n_texts, int(p), k) for p in positives.sum(axis=1)]))
        out[f"t2i_r@{k}"] = float(np.mean([_chance_hit(n_images, int(p), k) for p in positives.sum(axis=0)]))
    return out


def owner_positives(text_to_image: Sequence[int], num_images: int) -> np.ndarray:
    """positives (images, texts) when text j describes exactly image text_to_image[j]."""
    owner = np.asarray(text_to_image, dtype=np.int64)
    positives = np.zeros((num_images, len(owner)), dtype=bool)
    positives[owner, np.arange(len(owner))] = True
    return positives


def retrieval_recall(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """retrieval_scores of embeddings; text j describes image text_to_image[j]."""
    if len(text_to_image) != len(text_emb):
        raise ValueError("text_to_image needs one image index per text")
    return retrieval_scores(cosine_similarity(image_emb, text_emb), owner_positives(text_to_image, len(image_emb)), ks)


def class_embeddings(template_emb: np.ndarray) -> np.ndarray:
    """(classes, templates, dim) -> (classes, dim): the mean of each class's normalised
    template embeddings, renormalised (CLIP's zero-shot classifier)."""
    emb = np.asarray(template_emb, dtype=np.float64)
    if emb.ndim != 3:
        raise ValueError(f"need (classes, templates, dim) embeddings, got shape {emb.shape}")
    unit = emb / np.clip(np.linalg.norm(emb, axis=2, keepdims=True), 1e-12, None)
    return _normalise(unit.mean(axis=1))


def zero_shot_scores(sims: np.ndarray, labels: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{'top1': ..., 'top5': ...}: the share of images whose true class is among their k
    most similar classes; sims (images, classes). k above the number of classes is left out."""
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(sims):
        raise ValueError(f"{len(labels)} labels for {len(sims)} images")
    rank = _first_positive_rank(sims, labels[:, None] == np.arange(sims.shape[1])[None, :])
    return {f"top{k}": float(np.mean(rank < k)) for k in ks if k <= sims.shape[1]}


def confusion_matrix(sims: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = top-1 prediction."""
    sims = np.asarray(sims)
    out = np.zeros((sims.shape[1], sims.shape[1]), dtype=np.int64)
    np.add.at(out, (np.asarray(labels, dtype=np.int64), sims.argmax(axis=1)), 1)
    return out


def mean_per_class_recall(confusion: np.ndarray) -> float:
    """The mean over true classes of each one's top-1 recall (sklearn's balanced_accuracy_score,
    which CLIP_benchmark reports): classes with no image are left out, as they have no recall."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1)
    present = totals > 0
    if not present.any():
        raise ValueError("no image in the confusion matrix")
    return float(np.mean(np.diag(confusion)[present] / totals[present]))
