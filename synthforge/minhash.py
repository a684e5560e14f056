"""Near-duplicate text detection: MinHash signatures and LSH banding, vectorised with NumPy.

Written by hand rather than taken from datasketch because it works on a whole batch of documents at once
(one flat array of shingle hashes, one `minimum.reduceat` per chunk, LSH buckets by sorting), where
datasketch hashes each shingle in Python and keeps its LSH index in Python dicts;
`benchmarks/bench_dedup.py` measures both at the same settings.
The banding parameters are chosen the way datasketch does (minimising the weighted false-positive and
false-negative areas under the S-curve), so a threshold means the same thing in both.
"""

from __future__ import annotations

import hashlib
import unicodedata
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_NON_WORD = r"[^\p{L}\p{N}_]+"  # a word is a run of letters, digits and underscores, as Python's \w
_TEXTS_PER_CHUNK = 8192  # bounds the memory of tokenising and signing
_SHINGLES_PER_CHUNK = 1 << 13  # keeps the (shingles x permutations) matrix cache-sized: ~8 MB at 128 perms


def normalize(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: what 'the same text' means for exact dedup."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def joined_text(row: dict, fields: Sequence[str]) -> str:
    """The text of a sample that dedup and leakage checks compare: the named fields, one per line."""
    return "\n".join(str(row.get(f) or "") for f in fields)


def exact_hash(text: str) -> str:
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()[:32]


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a well-spread 64-bit hash of each 64-bit value."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class MinHasher:
    """Signatures over word n-gram shingles; `num_perm` universal hash functions (multiply-shift)."""

    def __init__(self, num_perm: int = 128, ngram: int = 3, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self._a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self._b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def shingles(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(64-bit hashes of every text's word n-grams, concatenated; shingles per text).

        A text with fewer than `ngram` words is one shingle; a text without words has none. Tokenising runs in
        Arrow's C++ kernels and only distinct words are hashed in Python; the n-gram windows are n vectorised
        passes over one flat array of word hashes.
        """
        words = pc.split_pattern_regex(pc.utf8_lower(pc.utf8_normalize(pa.array(texts, pa.large_string()), "NFKC")), _NON_WORD)
        flat, parents = pc.list_flatten(words), pc.list_parent_indices(words)
        nonempty = pc.not_equal(pc.binary_length(flat), 0)
        flat, parents = flat.filter(nonempty), parents.filter(nonempty)
        lengths = np.bincount(parents.to_numpy(), minlength=len(texts)).astype(np.int64)
        encoded = pc.dictionary_encode(flat)
        vocab = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in encoded.dictionary.to_pylist()), dtype=np.uint64)
        word_hashes = vocab[encoded.indices.to_numpy()] if len(flat) else np.empty(0, dtype=np.uint64)
        counts = np.where(lengths == 0, 0, np.maximum(lengths - self.ngram + 1, 1))
        first_word = np.repeat(np.cumsum(lengths) - lengths, counts)
        first_word += np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        width = np.repeat(np.minimum(lengths, self.ngram), counts)
        h = np.zeros(len(first_word), dtype=np.uint64)
        for j in range(self.ngram):
            take = np.flatnonzero(j < width)
            h[take] = splitmix64(h[take] ^ word_hashes[first_word[take] + j])
        return h, counts

    def signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures uint32 [len(texts), num_perm], has_words bool [len(texts)]), in bounded memory."""
        sigs = np.full((len(texts), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        has_words = np.zeros(len(texts), dtype=bool)
        for first in range(0, len(texts), _TEXTS_PER_CHUNK):
            chunk = slice(first, first + _TEXTS_PER_CHUNK)
            sigs[chunk], has_words[chunk] = self._sign(texts[chunk])
        return sigs, has_words

    def _sign(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        sigs = np.full((len(texts), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        hashes, counts = self.shingles(texts)
        has_words = counts > 0
        ends = np.cumsum(counts)
        start = 0
        while start < len(texts):  # chunks of whole texts, about _SHINGLES_PER_CHUNK shingles each
            base = ends[start] - counts[start]
            stop = max(start + 1, int(np.searchsorted(ends, base + _SHINGLES_PER_CHUNK, side="right")))
            rows = np.flatnonzero(has_words[start:stop]) + start
            if len(rows):
                flat = hashes[base : ends[stop - 1]]
                values = flat[:, None] * self._a[None, :]
                values += self._b[None, :]
                values >>= np.uint64(32)
                offsets = (ends[rows] - counts[rows]) - base
                sigs[rows] = np.minimum.reduceat(values, offsets, axis=0)
            start = stop
        return sigs, has_words


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive and false-negative probability areas."""
    s_lo = np.linspace(0.0, threshold, 200)
    s_hi = np.linspace(threshold, 1.0, 200)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - s_lo**r) ** b, s_lo)
            fn = np.trapezoid((1 - s_hi**r) ** b, s_hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def estimated_jaccard(sigs: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return (sigs[i] == sigs[j]).mean(axis=1)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """The LSH bucket key of each signature in each band, uint64 [n, bands]; the band is mixed into its key."""
    keys = np.empty((len(sigs), bands), dtype=np.uint64)
    for band in range(bands):
        cols = sigs[:, band * rows : (band + 1) * rows].astype(np.uint64)
        key = np.full(len(sigs), np.uint64(band), dtype=np.uint64)
        for c in range(cols.shape[1]):
            key = splitmix64(key ^ cols[:, c])
        keys[:, band] = key
    return keys


def bucket_pairs(band: np.ndarray, key: np.ndarray, item: np.ndarray, star_above: int = 64) -> np.ndarray:
    """Pairs (i < j) of items that share a bucket (band, key), as an int64 array [k, 2]; rows in any order.

    Buckets up to `star_above` members give all their pairs; larger ones link each member to the first,
    which keeps connectivity for clustering without a quadratic blow-up on degenerate inputs.
    """
    found = []
    for b in np.unique(band):
        in_band = np.flatnonzero(band == b)
        order = in_band[np.argsort(key[in_band], kind="stable")]
        sorted_keys = key[order]
        starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_keys)) + 1))
        sizes = np.diff(np.concatenate((starts, [len(sorted_keys)])))
        pairs_of_two = starts[sizes == 2]
        if len(pairs_of_two):
            found.append(np.stack([item[order[pairs_of_two]], item[order[pairs_of_two + 1]]], axis=1))
        for s, n in zip(starts[sizes > 2], sizes[sizes > 2], strict=True):
            members = np.sort(item[order[s : s + n]])
            if n <= star_above:
                i, j = np.triu_indices(n, k=1)
                found.append(np.stack([members[i], members[j]], axis=1))
            else:
                found.append(np.stack([np.full(n - 1, members[0]), members[1:]], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found).astype(np.int64), axis=1)
    return np.unique(pairs, axis=0)


def candidate_pairs(sigs: np.ndarray, bands: int, rows: int, star_above: int = 64) -> np.ndarray:
    """Pairs (i < j) that share at least one LSH band bucket, as an int64 array [k, 2] (see `bucket_pairs`)."""
    keys = band_keys(sigs, bands, rows)
    band = np.tile(np.arange(bands), len(sigs))
    item = np.repeat(np.arange(len(sigs)), bands)
    return bucket_pairs(band, keys.reshape(-1), item, star_above)


def cluster(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components over `pairs`; each item's label is the smallest index in its component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    first = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    return first[labels]


def verified_pairs(
    pairs: np.ndarray,
    sigs: np.ndarray,
    threshold: float,
    eligible: np.ndarray | None = None,
    exempt_pair: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The candidate pairs that may join a cluster: both eligible, not exempt, estimated Jaccard >= threshold."""
    if eligible is not None and len(pairs):
        pairs = pairs[eligible[pairs[:, 0]] & eligible[pairs[:, 1]]]
    if exempt_pair is not None and len(pairs):
        pairs = pairs[~exempt_pair(pairs[:, 0], pairs[:, 1])]
    if len(pairs):
        pairs = pairs[estimated_jaccard(sigs, pairs[:, 0], pairs[:, 1]) >= threshold]
    return pairs


def near_duplicate_representatives(
    sigs: np.ndarray,
    threshold: float,
    bands: int,
    rows: int,
    eligible: np.ndarray | None = None,
    exempt_pair: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """For every item, the index of its cluster's representative (the earliest member; itself if unique).

    Candidate pairs from LSH are verified by estimated Jaccard >= threshold before they join a cluster.
    Items not `eligible` (for example texts without words) are their own representative; `exempt_pair(i, j)`
    returns a mask of candidate pairs that must not be linked (a variant and the sample it was derived from).
    """
    pairs = verified_pairs(candidate_pairs(sigs, bands, rows), sigs, threshold, eligible, exempt_pair)
    return cluster(len(sigs), pairs)
