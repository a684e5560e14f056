"""Perceptual-hash near-duplicate search for images: imagehash hashes, multi-index hashing, clusters.

Hashes are bit strings of hash_size**2 bits packed into uint64 words, N x W with W = ceil(hash_size**2 / 64),
in imagehash's bit order: bit k of the flattened `ImageHash.hash` is bit 63 - k % 64 of word k // 64 (most
significant first; padding bits at the end are zero). For hash_size 8 the single word is therefore
`int(str(imagehash_obj), 16)`.

Search is multi-index hashing (Norouzi, Punjani and Fleet, "Fast Search in Hamming Space with Multi-Index
Hashing", CVPR 2012): split the bits into m disjoint chunks; two hashes within max_distance differ by at most
max_distance // m bits on at least one chunk (pigeonhole). With m = max_distance + 1 that is an exact match
on some chunk; fewer, longer chunks are searched with every flip of up to max_distance // m bits. Candidates
come from sorted (or directly tabled) chunk values, in bounded blocks, and are verified by popcount, so the
result is exactly what a brute-force all-pairs scan returns. The work is sub-quadratic while chunks stay
selective: 64-bit phash at distance <= ~10 over 10^4..10^6 images; near distance 32 it degrades to all pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, combinations
from math import comb

import numpy as np

from synthforge.errors import BadInput

# Only kinds whose hash is a hash_size x hash_size bit matrix; colorhash (binbits * 14 bits) is left out.
HASH_KINDS = ("phash", "dhash", "ahash", "whash")
_IMAGEHASH_FUNCTIONS = {"phash": "phash", "dhash": "dhash", "ahash": "average_hash", "whash": "whash"}

# Candidate pairs examined at once: bounds memory (a few int64 arrays of this length) whatever the bucket sizes.
_PAIR_BLOCK = 1 << 20
# Rows unpacked to one byte per bit at once when computing chunk keys.
_ROW_BLOCK = 1 << 16
# Cost of one probe (a table lookup or binary search) in verified candidates, for choosing the chunk count.
_PROBE_COST = 1.0
# Chunks up to this many bits index their values with a direct table (2**bits entries, 16 MiB at 20).
_DENSE_WIDTH = 20
# Most probes per chunk (flip masks) a chunk plan may need.
_MAX_PROBES = 20_000

_POPCOUNT_8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def imagehash_version() -> str:
    """The installed imagehash version: store it with hashes (imagehash 4.0 changed how hashes print as hex)."""
    from importlib.metadata import version

    return version("ImageHash")


def words_per_hash(hash_size: int) -> int:
    """Number of uint64 words that hold one hash of hash_size**2 bits."""
    return -(-(hash_size * hash_size) // 64)


def hash_images(images: Iterable[bytes], kind: str = "phash", hash_size: int = 8) -> np.ndarray:
    """Perceptual hashes of encoded images (PNG, JPEG, ...) -> uint64 array N x W, W = ceil(hash_size**2 / 64).

    Bits are imagehash's own (`imagehash.phash(img, hash_size)` etc.), packed as the module docstring says.
    Raises ValueError naming the index of the first image that cannot be decoded; BadInput for a bad kind or size.
    """
    import imagehash
    from PIL import Image

    from synthforge.vision.images import decode_image

    if kind not in HASH_KINDS:
        raise BadInput(f"image hash kind {kind!r} is not one of {', '.join(HASH_KINDS)}")
    if isinstance(hash_size, bool) or not isinstance(hash_size, int | np.integer) or hash_size < 2:
        raise BadInput(f"image hash_size must be an integer >= 2, got {hash_size!r}")
    if kind == "whash" and hash_size & (hash_size - 1):
        raise BadInput(f"image hash_size for whash must be a power of 2, got {hash_size}")
    hash_function = getattr(imagehash, _IMAGEHASH_FUNCTIONS[kind])
    n_bits = hash_size * hash_size
    row_bytes = 8 * words_per_hash(hash_size)

    packed = bytearray()
    for index, data in enumerate(images):
        if data is None:
            raise ValueError(f"image {index}: no image (null)")
        try:
            image = decode_image(data)
        except (ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"image {index}: {exc}") from None
        bits = hash_function(image, hash_size=hash_size).hash.ravel()
        if bits.size != n_bits:  # guards the packing below against a change in imagehash
            raise AssertionError(f"imagehash.{hash_function.__name__} gave {bits.size} bits, expected {n_bits}")
        packed += np.packbits(bits).tobytes().ljust(row_bytes, b"\0")
    # Packed bytes are big-endian words: the first bit is the most significant, as in imagehash's hex.
    return np.frombuffer(bytes(packed), dtype=">u8").reshape(-1, row_bytes // 8).astype(np.uint64)


def _as_hashes(hashes: np.ndarray, name: str) -> np.ndarray:
    """Validate an N x W array of 64-bit words; returns it as C-contiguous uint64 (same bits for int64 input)."""
    arr = np.asarray(hashes)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise BadInput(f"{name} must be a 2-D array of uint64 words (N x W), got shape {arr.shape}")
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize != 8:
        raise BadInput(f"{name} must hold 64-bit integer words (uint64), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr.view(np.uint64))


def _check_max_distance(max_distance: int, n_bits: int) -> None:
    if isinstance(max_distance, bool) or not isinstance(max_distance, int | np.integer):
        raise BadInput(f"max_distance must be an integer, got {max_distance!r}")
    if not 0 <= max_distance < n_bits:
        raise BadInput(f"max_distance must be between 0 and {n_bits - 1} for {n_bits}-bit hashes, got {max_distance}")


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance between rows of two uint64 word arrays (broadcasting over leading axes) -> int32."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).sum(axis=-1, dtype=np.int32)
    return _POPCOUNT_8[x.view(np.uint8)].reshape(*x.shape[:-1], -1).sum(axis=-1, dtype=np.int32)


def _expand_ranges(starts: np.ndarray, counts: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Enumerate (k, starts[k] + o) for every k and 0 <= o < counts[k], at most _PAIR_BLOCK pairs at a time.

    This is how buckets' pairs are listed without a Python loop over items, and without ever holding more
    than a block of them, however large one bucket is.
    """
    owners = np.flatnonzero(counts)
    if owners.size == 0:
        return
    counts = counts[owners].astype(np.int64)
    ends = np.cumsum(counts)
    begins = ends - counts
    total = int(ends[-1])
    for t0 in range(0, total, _PAIR_BLOCK):
        t1 = min(t0 + _PAIR_BLOCK, total)
        k0, k1 = np.searchsorted(ends, [t0, t1 - 1], side="right")
        part = slice(k0, k1 + 1)
        taken = np.minimum(ends[part], t1) - np.maximum(begins[part], t0)  # an owner may straddle block edges
        positions = np.arange(t0, t1, dtype=np.int64) + np.repeat(starts[owners[part]] - begins[part], taken)
        yield np.repeat(owners[part], taken), positions


def _flip_masks(n_bits: int, radius: int) -> np.ndarray:
    """Every n_bits-bit value with at most `radius` bits set, 0 first: the probes of one chunk."""
    masks = [0]
    for k in range(1, min(radius, n_bits) + 1):
        masks.extend(sum(1 << bit for bit in bits) for bits in combinations(range(n_bits), k))
    return np.array(masks, dtype=np.uint64)


def _probe_count(n_bits: int, radius: int) -> int:
    return sum(comb(n_bits, k) for k in range(min(radius, n_bits) + 1))


def _chunk_widths(n_bits: int, n_chunks: int) -> list[int]:
    """Bits per chunk when chunk c takes bits c, c + n_chunks, c + 2 * n_chunks, ... (see MultiIndexHash)."""
    return [len(range(c, n_bits, n_chunks)) for c in range(n_chunks)]


def _choose_chunks(n_bits: int, max_distance: int, n_items: int) -> int:
    """Chunk count with the least expected work per query under uniform bits: probes plus candidates.

    With m chunks of b bits each chunk is searched within radius max_distance // m: sum_k<=radius C(b, k)
    probes, each finding ~n_items / 2**b candidates. max_distance + 1 chunks (radius 0) is the classic
    pigeonhole split; fewer, longer chunks with a radius win when that split leaves chunks of a few bits
    (Norouzi et al. suggest m ~ bits / log2 n_items).
    """
    fewest = max(1, -(-n_bits // 64))  # a chunk's key is one uint64
    best, best_cost = fewest, float("inf")
    for m in range(fewest, max(max_distance + 1, fewest) + 1):
        widths = _chunk_widths(n_bits, m)
        radius = max_distance // m
        probes = [_probe_count(b, radius) for b in widths]
        cost = sum(p * (_PROBE_COST + n_items / 2.0**b) for p, b in zip(probes, widths, strict=True))
        if cost < best_cost and max(probes) <= _MAX_PROBES:
            best, best_cost = m, cost
    return best


class _ChunkTable:
    """One chunk's values for all indexed items: items sorted by value, and where each value's run lies."""

    def __init__(self, keys: np.ndarray, width: int):
        self.order = np.argsort(keys, kind="stable")
        values, starts, lengths = np.unique(keys[self.order], return_index=True, return_counts=True)
        self.values, self.run_starts, self.run_lengths = values, starts.astype(np.int64), lengths.astype(np.int64)
        # Narrow chunks get a direct table (value -> run), so a probe is one lookup, not a binary search.
        self.dense = width <= _DENSE_WIDTH
        if self.dense:
            self.start_of = np.zeros(1 << width, dtype=np.int64)
            self.count_of = np.zeros(1 << width, dtype=np.int64)
            self.start_of[values] = self.run_starts
            self.count_of[values] = self.run_lengths

    def runs(self, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) in sorted order of the items whose value equals each probe; length 0 if none."""
        if self.dense:
            return self.start_of[probes], self.count_of[probes]
        run = np.minimum(np.searchsorted(self.values, probes), len(self.values) - 1)
        return self.run_starts[run], np.where(self.values[run] == probes, self.run_lengths[run], 0)


class MultiIndexHash:
    """Exact Hamming-radius search over perceptual hashes by multi-index hashing (see the module docstring).

    The bits are split into `n_chunks` chunks (chosen from a cost model unless given); with m chunks, two
    hashes within max_distance are within max_distance // m of each other on at least one chunk, so probing
    each chunk's values with every flip of at most that many bits finds every candidate.
    Bits equal in every indexed hash (padding, phash's DC bit) carry no information and are left out of the
    chunks: the pigeonhole argument holds on any subset of the bits. The rest are dealt out in turn (chunk c
    takes the c-th, (c + m)-th, ... of them), because neighbouring bits (nearby DCT coefficients, adjacent
    pixel differences) are correlated: contiguous chunks of digit phashes gave twice the candidates.
    """

    def __init__(self, hashes: np.ndarray, max_distance: int, n_chunks: int | None = None):
        self.hashes = _as_hashes(hashes, "hashes")
        self.n_words = self.hashes.shape[1]
        _check_max_distance(max_distance, 64 * self.n_words)
        self.max_distance = int(max_distance)

        varying = np.bitwise_or.reduce(self.hashes, axis=0) & ~np.bitwise_and.reduce(self.hashes, axis=0)
        varying_bits = np.flatnonzero(_unpack_bits(varying[None, :])[0])
        n_bits = len(varying_bits)
        fewest = max(1, -(-n_bits // 64))  # a chunk's value is one uint64
        if n_chunks is None:
            n_chunks = _choose_chunks(n_bits, self.max_distance, len(self.hashes))
        elif not fewest <= n_chunks <= max(self.max_distance + 1, fewest):
            raise BadInput(f"n_chunks={n_chunks} must be between {fewest} and {max(self.max_distance + 1, fewest)}")
        self._chunk_bits = [varying_bits[c::n_chunks] for c in range(n_chunks)]  # bit positions per chunk
        self.radius = self.max_distance // n_chunks  # per-chunk search radius
        widths = [len(bits) for bits in self._chunk_bits]
        if max(_probe_count(b, self.radius) for b in widths) > _MAX_PROBES:
            raise BadInput(f"n_chunks={n_chunks} needs more than {_MAX_PROBES:,} probes per chunk; use more chunks")
        self._masks = [_flip_masks(b, self.radius) for b in widths]
        self._keys = self._chunk_keys(self.hashes)  # N x n_chunks
        self._tables = [_ChunkTable(self._keys[:, c], b) for c, b in enumerate(widths)]

    @property
    def n_chunks(self) -> int:
        return len(self._chunk_bits)

    def _chunk_keys(self, hashes: np.ndarray) -> np.ndarray:
        """Value of each chunk's bits for each hash, as uint64 (chunk bits in the low bits), N x n_chunks."""
        keys = np.empty((len(hashes), self.n_chunks), dtype=np.uint64)
        for row in range(0, len(hashes), _ROW_BLOCK):
            bits = _unpack_bits(hashes[row : row + _ROW_BLOCK])
            for c, chunk_bits in enumerate(self._chunk_bits):
                padded = np.zeros((len(bits), 64), dtype=np.uint8)
                padded[:, 64 - len(chunk_bits) :] = bits[:, chunk_bits]
                keys[row : row + _ROW_BLOCK, c] = np.packbits(padded, axis=1).view(">u8")[:, 0]
        return keys

    def _probe(
        self, chunk: int, probe_keys: np.ndarray, masks: np.ndarray, upward_only: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(probe row, indexed item) for every indexed item whose chunk value is probe_keys[row] ^ some mask.

        upward_only: only probe values above the probe's own, so that a self-join meets each pair of distinct
        values from one side (the lower one) instead of both.
        """
        table = self._tables[chunk]
        masks_per_block = max(1, _PAIR_BLOCK // max(1, len(probe_keys)))
        for m0 in range(0, len(masks), masks_per_block):
            probes = probe_keys[:, None] ^ masks[None, m0 : m0 + masks_per_block]
            rows = np.broadcast_to(np.arange(len(probe_keys))[:, None], probes.shape)
            if upward_only:
                wanted = probes > probe_keys[:, None]
                probes, rows = probes[wanted], rows[wanted]
            else:
                probes, rows = probes.ravel(), rows.ravel()
            starts, counts = table.runs(probes)
            for k, position in _expand_ranges(starts, counts):
                yield rows[k], table.order[position]

    def _verified(
        self, chunk: int, a: np.ndarray, b: np.ndarray, a_keys: np.ndarray, a_hashes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the candidates (a, b) within max_distance that this chunk reports, and their distances.

        a indexes a_keys / a_hashes (the indexed hashes themselves, or the queries), b the indexed hashes. A pair
        whose values are within `radius` on an earlier chunk was found there, so it is reported there only.
        """
        dist = hamming(a_hashes[a], self.hashes[b])
        keep = np.flatnonzero(dist <= self.max_distance)
        if chunk:
            earlier = np.bitwise_xor(a_keys[a[keep], :chunk], self._keys[b[keep], :chunk])
            keep = keep[(hamming(earlier[:, :, None], 0) > self.radius).all(axis=1)]
        return keep, dist[keep]

    def pairs_within(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All pairs of indexed hashes within max_distance: (i, j, dist) with i < j, each pair once, sorted."""
        n = len(self.hashes)
        positions = np.arange(n, dtype=np.int64)
        found_i, found_j, found_d = [], [], []
        for c, table in enumerate(self._tables):
            # Equal values: each sorted position pairs with the later positions of its run, so each pair once.
            later = np.repeat(table.run_starts + table.run_lengths, table.run_lengths) - positions - 1
            same = ((table.order[p], table.order[q]) for p, q in _expand_ranges(positions + 1, later))
            flipped = self._probe(c, self._keys[:, c], self._masks[c][1:], upward_only=True)
            for a, b in chain(same, flipped):
                a, b = np.minimum(a, b), np.maximum(a, b)
                keep, dist = self._verified(c, a, b, self._keys, self.hashes)
                found_i.append(a[keep])
                found_j.append(b[keep])
                found_d.append(dist)
        return _sorted_triples(found_i, found_j, found_d)

    def query(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (query, indexed hash) pair within max_distance: (query_idx, index_idx, dist), sorted."""
        queries = _as_hashes(queries, "queries")
        if queries.shape[1] != self.n_words:
            raise BadInput(f"queries have {queries.shape[1]} words per hash, the index has {self.n_words}")
        query_keys = self._chunk_keys(queries)
        found_q, found_x, found_d = [], [], []
        for c in range(self.n_chunks):
            for q, x in self._probe(c, query_keys[:, c], self._masks[c]):
                keep, dist = self._verified(c, q, x, query_keys, queries)
                found_q.append(q[keep])
                found_x.append(x[keep])
                found_d.append(dist)
        return _sorted_triples(found_q, found_x, found_d)


def _unpack_bits(words: np.ndarray) -> np.ndarray:
    """uint64 N x W -> uint8 N x 64W of 0/1, most significant bit of each word first."""
    return np.unpackbits(words.astype(">u8").view(np.uint8), axis=1)


def _sorted_triples(first: list, second: list, dist: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not first:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32)
    a, b, d = (np.concatenate(first).astype(np.int64), np.concatenate(second).astype(np.int64), np.concatenate(dist))
    order = np.lexsort((b, a))
    return a[order], b[order], d[order]


@dataclass(frozen=True)
class ImageDedupResult:
    """One entry per input hash."""

    representative: np.ndarray  # int64: the earliest index of its cluster (itself when it is the one kept)
    distance: np.ndarray  # int32: Hamming distance to its representative, 0 for representatives
    reference_match: np.ndarray  # int64: index of the closest reference hash within max_distance, or -1
    reference_distance: np.ndarray  # int32: distance to that reference hash, or -1

    @property
    def is_representative(self) -> np.ndarray:
        return self.representative == np.arange(len(self.representative))


def cluster_near_duplicates(hashes: np.ndarray, max_distance: int, reference: np.ndarray | None = None) -> ImageDedupResult:
    """Cluster hashes as connected components of the "within max_distance" graph; match them against reference.

    `hashes` are the synthetic items; `reference` (optional) the real images they must not copy. A cluster can
    chain (a~b, b~c with a, c farther apart): `distance` is always measured exactly to the representative.
    Ties for the closest reference hash go to the lowest reference index.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    hashes = _as_hashes(hashes, "hashes")
    _check_max_distance(max_distance, 64 * hashes.shape[1])
    n = len(hashes)
    if n == 0:
        empty_index, empty_dist = np.empty(0, np.int64), np.empty(0, np.int32)
        return ImageDedupResult(empty_index, empty_dist, empty_index, empty_dist)

    # Identical hashes (exact copies, flat images) are merged first, so a big group of them never reaches
    # the pair search, which would list all m * (m - 1) / 2 of their pairs.
    distinct, first_of, distinct_of = np.unique(hashes, axis=0, return_index=True, return_inverse=True)
    distinct_of = distinct_of.reshape(-1)
    i, j, _ = MultiIndexHash(distinct, max_distance).pairs_within()
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(len(distinct), len(distinct)))
    _, component = connected_components(graph, directed=False)
    earliest = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(earliest, component, first_of)
    representative = earliest[component[distinct_of]]
    distance = hamming(hashes, hashes[representative])

    reference_match = np.full(n, -1, dtype=np.int64)
    reference_distance = np.full(n, -1, dtype=np.int32)
    if reference is not None:
        reference = _as_hashes(reference, "reference")
        if reference.shape[1] != hashes.shape[1]:
            raise BadInput(f"reference hashes have {reference.shape[1]} words per hash, the hashes have {hashes.shape[1]}")
        if len(reference):
            q, x, d = MultiIndexHash(reference, max_distance).query(distinct)
            closest = np.lexsort((x, d, q))
            q, x, d = q[closest], x[closest], d[closest]
            best = np.ones(len(q), dtype=bool)  # the first, i.e. closest, match of each query
            best[1:] = q[1:] != q[:-1]
            match_of_distinct = np.full(len(distinct), -1, dtype=np.int64)
            distance_of_distinct = np.full(len(distinct), -1, dtype=np.int32)
            match_of_distinct[q[best]] = x[best]
            distance_of_distinct[q[best]] = d[best]
            reference_match = match_of_distinct[distinct_of]
            reference_distance = distance_of_distinct[distinct_of]
    return ImageDedupResult(representative, distance, reference_match, reference_distance)
