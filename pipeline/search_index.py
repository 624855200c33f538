"""Nearest neighbours by cosine over unit vectors: what `jobs.serve` searches images and captions with.

Exact search is one matrix product and a partial sort; ties are broken by row order, as
`jobs.evaluate` breaks them, so the service's top K of a held-out caption is the one its
recall@K counts. From `approximate_from` rows on, a faiss HNSW graph (inner product) answers
instead: bench/serve.py measures where exact search gets too slow on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Hits:
    """One query's top K: row numbers into the index, and their cosine scores, best first."""

    rows: np.ndarray  # int64 (k,)
    scores: np.ndarray  # float32 (k,)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1, norms)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column numbers of each row's k highest scores, best first; ties by column order."""
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    if k < scores.shape[1]:
        # the k-th best score, then every column at least as good (ties at the cut included)
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
        out = np.empty((scores.shape[0], k), dtype=np.int64)
        for i, (row, cut) in enumerate(zip(scores, kth)):
            candidates = np.flatnonzero(row >= cut)
            out[i] = candidates[np.argsort(-row[candidates], kind="stable")][:k]
        return out
    return np.argsort(-scores, axis=1, kind="stable")


class VectorIndex:
    """Unit vectors (one row per item) searched by inner product: exact below
    `approximate_from` rows, faiss HNSW from there on."""

    def __init__(self, vectors: np.ndarray, approximate_from: int | None = None, hnsw_m: int = 32, ef_search: int = 128):
        self.vectors = unit_rows(vectors) if len(vectors) else np.zeros((0, vectors.shape[1] if vectors.ndim == 2 else 0), np.float32)
        self.graph = None
        if approximate_from is not None and len(self.vectors) >= approximate_from:
            import faiss

            self.graph = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.graph.hnsw.efConstruction = max(2 * hnsw_m, 40)
            self.graph.hnsw.efSearch = ef_search
            self.graph.add(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def kind(self) -> str:
        return "exact" if self.graph is None else "hnsw"

    def search(self, queries: np.ndarray, k: int) -> list[Hits]:
        """The top `k` rows of each (unit) query row."""
        queries = unit_rows(np.atleast_2d(queries))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dim {queries.shape[1]}, the index {self.dim}")
        k = min(k, len(self))
        if self.graph is not None:
            scores, rows = self.graph.search(queries, k)
            return [Hits(r[r >= 0].astype(np.int64), s[r >= 0].astype(np.float32)) for r, s in zip(rows, scores)]
        scores = queries @ self.vectors.T
        best = top_k(scores, k)
        return [Hits(b, s[b].astype(np.float32)) for b, s in zip(best, scores)]
