"""Semantic near-duplicates: connected components of the graph of pairs whose embeddings' cosine reaches a threshold.

Every pair is compared (no approximate index, so no pair above the threshold is missed), one square tile of the
similarity matrix at a time: memory is `block_size**2` similarities plus the edges found, never n x n.
Embeddings must be L2-normalised, so a dot product is the cosine.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from synthforge.minhash import cluster

DEFAULT_BLOCK_SIZE = 2048  # a 2048 x 2048 float32 tile is 16 MiB
_EDGES_BEFORE_MERGE = 1 << 22  # bounds the edges held at once when many texts are alike


def cosine_clusters(
    embeddings: np.ndarray,
    threshold: float,
    eligible: np.ndarray | None = None,
    exempt_pair: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """(representative index, cosine similarity to it) for every item.

    Items whose cosine is >= `threshold` are linked and each connected component is one cluster, represented by
    its earliest item; a representative's similarity is 1. Items not `eligible` stay alone, and pairs for which
    `exempt_pair(i, j)` (vectorised over index arrays) is true are never linked directly.
    """
    n = len(embeddings)
    members = np.arange(n) if eligible is None else np.flatnonzero(eligible)
    vectors = np.ascontiguousarray(embeddings[members], dtype=np.float32)
    m = len(members)
    labels = np.arange(m)  # index (into members) of each member's representative so far
    pending: list[np.ndarray] = []
    held = 0

    def merge() -> np.ndarray:
        # The components found so far, kept as star edges to their representative, plus the new edges.
        linked = np.flatnonzero(labels != np.arange(m))
        return cluster(m, np.concatenate([np.stack([labels[linked], linked], axis=1), *pending]))

    for row in range(0, m, block_size):
        for col in range(row, m, block_size):
            tile = vectors[row : row + block_size] @ vectors[col : col + block_size].T
            i, j = np.nonzero(tile >= threshold)
            i += row
            j += col
            upper = j > i
            i, j = i[upper], j[upper]
            if exempt_pair is not None and len(i):
                keep = ~exempt_pair(members[i], members[j])
                i, j = i[keep], j[keep]
            if len(i):
                pending.append(np.stack([i, j], axis=1))
                held += len(i)
            if held > _EDGES_BEFORE_MERGE:
                labels, pending, held = merge(), [], 0
    if pending:
        labels = merge()
    representative = np.arange(n)
    similarity = np.ones(n, dtype=np.float32)
    representative[members] = members[labels]
    similarity[members] = np.einsum("ij,ij->i", vectors, vectors[labels])
    similarity[representative == np.arange(n)] = 1.0
    return representative, similarity


def nearest(queries: np.ndarray, corpus: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(index of the most similar corpus item, its cosine) for every query; ties go to the earliest item.

    An empty corpus gives index -1 and similarity -inf.
    """
    best = np.full(len(queries), -1, dtype=np.int64)
    best_sim = np.full(len(queries), -np.inf, dtype=np.float32)
    corpus = np.ascontiguousarray(corpus, dtype=np.float32)
    for row in range(0, len(queries), block_size):
        q = np.ascontiguousarray(queries[row : row + block_size], dtype=np.float32)
        rows = slice(row, row + len(q))
        for col in range(0, len(corpus), block_size):
            tile = q @ corpus[col : col + block_size].T
            arg = tile.argmax(axis=1)
            sim = tile[np.arange(len(q)), arg]
            better = sim > best_sim[rows]
            best[rows] = np.where(better, arg + col, best[rows])
            best_sim[rows] = np.where(better, sim, best_sim[rows])
    return best, best_sim
