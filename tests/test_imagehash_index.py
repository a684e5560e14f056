"""Perceptual-hash near-duplicate search: imagehash bits, exact multi-index search, clusters and reference matches."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from synthforge.errors import BadInput
from synthforge.vision import imagehash_index
from synthforge.vision.imagehash_index import (
    HASH_KINDS,
    MultiIndexHash,
    cluster_near_duplicates,
    hamming,
    hash_images,
    imagehash_version,
    words_per_hash,
)

# --- helpers -----------------------------------------------------------------------------------------------


def flip_bits(word_row: np.ndarray, bits, n_bits: int) -> np.ndarray:
    """A copy of one hash (W words) with the given bit positions (imagehash order, 0 = first) flipped."""
    row = word_row.copy()
    for bit in bits:
        assert bit < n_bits
        row[bit // 64] ^= np.uint64(1) << np.uint64(63 - bit % 64)
    return row


def random_hashes(rng: np.random.Generator, n: int, hash_size: int) -> np.ndarray:
    """Uniform random hashes of hash_size**2 bits, padding bits zero as hash_images leaves them."""
    n_bits = hash_size * hash_size
    bits = rng.integers(0, 2, size=(n, n_bits), dtype=np.uint8)
    padded = np.zeros((n, 64 * words_per_hash(hash_size)), dtype=np.uint8)
    padded[:, :n_bits] = bits
    return np.packbits(padded, axis=1).view(">u8").astype(np.uint64)


def neighbours(rng: np.random.Generator, hashes: np.ndarray, hash_size: int, sources, distances) -> np.ndarray:
    """One row per (source, distance): hashes[source] with exactly `distance` random bits flipped."""
    n_bits = hash_size * hash_size
    rows = [
        flip_bits(hashes[s], rng.choice(n_bits, size=d, replace=False), n_bits) for s, d in zip(sources, distances, strict=True)
    ]
    return np.array(rows).reshape(-1, hashes.shape[1])


def with_planted(rng: np.random.Generator, hashes: np.ndarray, hash_size: int, distances) -> tuple[np.ndarray, list]:
    """hashes plus one neighbour of a random earlier hash per distance; the (source, neighbour, distance) planted."""
    sources = rng.integers(len(hashes), size=len(distances))
    planted = [(int(s), len(hashes) + k, d) for k, (s, d) in enumerate(zip(sources, distances, strict=True))]
    return np.vstack([hashes, neighbours(rng, hashes, hash_size, sources, distances)]), planted


def all_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All-pairs Hamming distances by unpacking bits: a reference that shares no code with the module."""
    bits_a = np.unpackbits(a.astype(">u8").view(np.uint8), axis=1).astype(np.int32)
    bits_b = np.unpackbits(b.astype(">u8").view(np.uint8), axis=1).astype(np.int32)
    return (bits_a[:, None, :] != bits_b[None, :, :]).sum(axis=2)


def brute_pairs(hashes: np.ndarray, max_distance: int):
    dist = all_distances(hashes, hashes)
    i, j = np.nonzero(np.triu(dist <= max_distance, k=1))
    return i, j, dist[i, j]


def brute_query(queries: np.ndarray, hashes: np.ndarray, max_distance: int):
    dist = all_distances(queries, hashes)
    q, x = np.nonzero(dist <= max_distance)
    return q, x, dist[q, x]


def assert_same_triples(got, expected):
    assert [len(a) for a in got] == [len(a) for a in expected]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


# --- exact search ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hash_size", [8, 16])
@pytest.mark.parametrize("max_distance", [0, 1, 3, 7])
def test_pairs_within_and_query_return_exactly_the_brute_force_pairs(hash_size, max_distance):
    rng = np.random.default_rng(hash_size * 100 + max_distance)
    distances = list(range(max_distance + 2)) * 3  # neighbours at every distance 0..t and at t + 1
    hashes, planted = with_planted(rng, random_hashes(rng, 250, hash_size), hash_size, distances)
    hashes, chained = with_planted(rng, hashes, hash_size, distances)  # some are neighbours of neighbours
    hashes = np.vstack([hashes, hashes[:3]])  # exact copies too

    index = MultiIndexHash(hashes, max_distance)
    got = index.pairs_within()
    assert_same_triples(got, brute_pairs(hashes, max_distance))
    found = set(zip(got[0].tolist(), got[1].tolist(), strict=True))
    for source, neighbour, d in planted + chained:
        assert ((min(source, neighbour), max(source, neighbour)) in found) == (d <= max_distance)

    sources = rng.integers(len(hashes), size=len(distances))
    queries = np.vstack([random_hashes(rng, 40, hash_size), neighbours(rng, hashes, hash_size, sources, distances)])
    got = index.query(queries)
    assert_same_triples(got, brute_query(queries, hashes, max_distance))
    found = set(zip(got[0].tolist(), got[1].tolist(), strict=True))
    for k, (source, d) in enumerate(zip(sources, distances, strict=True)):
        assert ((40 + k, source) in found) == (d <= max_distance)


@pytest.mark.parametrize("hash_size, max_distance", [(8, 3), (8, 6), (16, 7)])
def test_every_chunk_count_gives_the_same_exact_pairs(hash_size, max_distance):
    """Fewer chunks than max_distance + 1 search each chunk within a radius: still exactly the brute-force pairs."""
    rng = np.random.default_rng(7)
    distances = list(range(max_distance + 2)) * 4
    hashes, _ = with_planted(rng, random_hashes(rng, 200, hash_size), hash_size, distances)
    sources = rng.integers(len(hashes), size=len(distances))
    queries = np.vstack([random_hashes(rng, 20, hash_size), neighbours(rng, hashes, hash_size, sources, distances)])
    expected_pairs = brute_pairs(hashes, max_distance)
    expected_query = brute_query(queries, hashes, max_distance)
    fewest = -(-hash_size * hash_size // 64)
    tried = 0
    for n_chunks in range(fewest, max_distance + 2):
        try:
            index = MultiIndexHash(hashes, max_distance, n_chunks=n_chunks)
        except BadInput as exc:  # too many flips to probe in one long chunk
            assert "probes" in str(exc)
            continue
        tried += 1
        assert index.n_chunks == n_chunks and index.radius == max_distance // n_chunks
        assert_same_triples(index.pairs_within(), expected_pairs)
        assert_same_triples(index.query(queries), expected_query)
    assert tried >= 3


def test_huge_buckets_are_walked_in_bounded_blocks(monkeypatch):
    """Many hashes sharing chunk values, with a block far smaller than a bucket: nothing lost, nothing twice."""
    monkeypatch.setattr(imagehash_index, "_PAIR_BLOCK", 7)
    rng = np.random.default_rng(3)
    base = random_hashes(rng, 1, 8)
    # 120 hashes that differ only in their last 8 bits: every other chunk is one big bucket.
    hashes = np.repeat(base, 120, axis=0)
    hashes[:, 0] = (hashes[:, 0] & ~np.uint64(0xFF)) | rng.integers(0, 256, size=120, dtype=np.uint64)
    hashes = np.vstack([hashes, random_hashes(rng, 60, 8)])
    for max_distance in (0, 2, 5):
        index = MultiIndexHash(hashes, max_distance)
        assert_same_triples(index.pairs_within(), brute_pairs(hashes, max_distance))
        assert_same_triples(index.query(hashes[::7]), brute_query(hashes[::7], hashes, max_distance))


def test_hamming_matches_bit_counting_with_and_without_numpy_bitwise_count(monkeypatch):
    rng = np.random.default_rng(5)
    a, b = random_hashes(rng, 50, 16), random_hashes(rng, 50, 16)
    expected = np.diagonal(all_distances(a, b))
    np.testing.assert_array_equal(hamming(a, b), expected)
    np.testing.assert_array_equal(hamming(a[:, None, :], b[None, :, :]), all_distances(a, b))  # broadcasting
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # the numpy < 2 path
    np.testing.assert_array_equal(hamming(a, b), expected)


def test_bad_search_inputs_name_the_parameter():
    hashes = random_hashes(np.random.default_rng(0), 10, 8)
    with pytest.raises(BadInput, match="max_distance"):
        MultiIndexHash(hashes, -1)
    with pytest.raises(BadInput, match="max_distance"):
        MultiIndexHash(hashes, 64)
    with pytest.raises(BadInput, match="dtype float64"):
        MultiIndexHash(hashes.astype(np.float64), 2)
    with pytest.raises(BadInput, match=r"shape \(10,\)"):
        MultiIndexHash(hashes[:, 0], 2)
    with pytest.raises(BadInput, match="n_chunks"):
        MultiIndexHash(hashes, 2, n_chunks=4)
    with pytest.raises(BadInput, match="words per hash"):
        MultiIndexHash(hashes, 2).query(random_hashes(np.random.default_rng(1), 3, 16))
    with pytest.raises(BadInput, match="reference"):
        cluster_near_duplicates(hashes, 2, reference=random_hashes(np.random.default_rng(1), 3, 16))


# --- clusters and reference matches ------------------------------------------------------------------------


def test_cluster_near_duplicates_on_a_planted_set():
    rng = np.random.default_rng(11)
    a, b, c, r0, r1 = random_hashes(rng, 5, 8)  # far apart: random 64-bit hashes sit ~32 bits from each other
    assert all_distances(np.array([a, b, c, r0, r1]), np.array([a, b, c, r0, r1]))[np.triu_indices(5, 1)].min() > 12
    c1 = flip_bits(c, [0, 1, 2], 64)
    c2 = flip_bits(c1, [10, 11, 12], 64)  # 3 from c1, 6 from c: joins c's cluster only through c1
    synthetic = np.array(
        [
            b,  # 0
            flip_bits(a, [5], 64),  # 1: a cluster whose earliest member is this one
            a,  # 2
            c2,  # 3: the chain's earliest member, so its representative
            c,  # 4
            c1,  # 5
            a,  # 6: an exact copy of item 2
            flip_bits(r1, [20, 21], 64),  # 7: a memorised copy of reference 1
            flip_bits(r0, [30, 31, 32, 33], 64),  # 8: 4 bits from reference 0: not a copy at max_distance 3
        ]
    )
    result = cluster_near_duplicates(synthetic, 3, reference=np.array([r0, r1, r1]))
    np.testing.assert_array_equal(result.representative, [0, 1, 1, 3, 3, 3, 1, 7, 8])
    np.testing.assert_array_equal(result.distance, [0, 0, 1, 0, 6, 3, 1, 0, 0])
    np.testing.assert_array_equal(result.is_representative, [1, 1, 0, 1, 0, 0, 0, 1, 1])
    # Reference 1 appears twice: the lower index wins the tie.
    np.testing.assert_array_equal(result.reference_match, [-1, -1, -1, -1, -1, -1, -1, 1, -1])
    np.testing.assert_array_equal(result.reference_distance, [-1, -1, -1, -1, -1, -1, -1, 2, -1])

    nothing_close = cluster_near_duplicates(synthetic, 3, reference=random_hashes(rng, 4, 8))
    assert (nothing_close.reference_match == -1).all() and (nothing_close.reference_distance == -1).all()
    looser = cluster_near_duplicates(synthetic, 4, reference=np.array([r0, r1]))
    assert looser.reference_match[8] == 0 and looser.reference_distance[8] == 4
    without_reference = cluster_near_duplicates(synthetic, 3)
    np.testing.assert_array_equal(without_reference.representative, result.representative)
    assert (without_reference.reference_match == -1).all() and (without_reference.reference_distance == -1).all()


def test_cluster_near_duplicates_matches_brute_force_components():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(13)
    hashes, _ = with_planted(rng, random_hashes(rng, 300, 16), 16, list(range(12)) * 10)
    hashes, _ = with_planted(rng, hashes, 16, list(range(12)) * 10)  # chains
    hashes = np.vstack([hashes, hashes[rng.choice(len(hashes), 40)]])
    i, j, _ = brute_pairs(hashes, 6)
    _, labels = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(len(hashes),) * 2), directed=False)
    earliest = {label: int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels)}
    expected = np.array([earliest[label] for label in labels])

    result = cluster_near_duplicates(hashes, 6)
    np.testing.assert_array_equal(result.representative, expected)
    np.testing.assert_array_equal(result.distance, all_distances(hashes, hashes)[np.arange(len(hashes)), expected])
    assert (result.representative < len(hashes)).all() and (result.is_representative.sum() < len(hashes))


# --- hashing real images -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_images():
    """Ten digits (one per class) upscaled to 32x32, a noised copy and a brightened copy of each."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from synthforge.vision.images import encode_png

    digits = load_digits()
    rng = np.random.default_rng(0)
    first_of_class = [int(np.flatnonzero(digits.target == k)[0]) for k in range(10)]
    originals = [
        np.asarray(Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.Resampling.BICUBIC))
        for i in first_of_class
    ]
    noised = [np.clip(o + rng.normal(0, 5, o.shape), 0, 255).astype(np.uint8) for o in originals]
    brightened = [np.clip(o.astype(np.int16) + 20, 0, 255).astype(np.uint8) for o in originals]
    return [encode_png(p) for p in originals], [encode_png(p) for p in noised], [encode_png(p) for p in brightened]


def test_phash_of_copies_is_close_and_of_other_digits_far(digit_images):
    originals, noised, brightened = digit_images
    hashes = hash_images(originals + noised + brightened)  # defaults: phash, 64 bits
    assert hashes.shape == (30, 1) and hashes.dtype == np.uint64
    copies = np.concatenate([hamming(hashes[:10], hashes[10:20]), hamming(hashes[:10], hashes[20:])])
    between_digits = all_distances(hashes[:10], hashes[:10])[~np.eye(10, dtype=bool)]
    assert copies.max() <= 6
    assert between_digits.min() >= 12

    result = cluster_near_duplicates(hashes[10:], 6, reference=hashes[:10])
    np.testing.assert_array_equal(result.reference_match, np.tile(np.arange(10), 2))
    np.testing.assert_array_equal(result.representative, np.arange(20) % 10)  # each copy pairs with the other copy


@pytest.mark.parametrize("kind", HASH_KINDS)
@pytest.mark.parametrize("hash_size", [8, 16])
def test_hashes_are_imagehash_bits_in_imagehash_order(digit_images, kind, hash_size):
    import imagehash

    from synthforge.vision.images import decode_image

    images = digit_images[0] + digit_images[1][:3]
    hashes = hash_images(images, kind=kind, hash_size=hash_size)
    assert hashes.shape == (len(images), words_per_hash(hash_size))
    function = {"phash": imagehash.phash, "dhash": imagehash.dhash, "ahash": imagehash.average_hash, "whash": imagehash.whash}[
        kind
    ]
    for row, data in zip(hashes, images, strict=True):
        expected = function(decode_image(data), hash_size=hash_size)
        bits = np.unpackbits(row[None, :].astype(">u8").view(np.uint8), axis=1)[0]
        np.testing.assert_array_equal(bits[: hash_size**2], expected.hash.ravel().astype(np.uint8))
        assert not bits[hash_size**2 :].any()
        if hash_size == 8:  # the word is imagehash's own hex string read as a number
            assert int(row[0]) == int(str(expected), 16)


def test_bad_image_bytes_name_their_index(digit_images, monkeypatch):
    from PIL import Image

    good = digit_images[0][0]
    with pytest.raises(ValueError, match=r"^image 1: not a readable image"):
        hash_images([good, b"definitely not a PNG", good])
    with pytest.raises(ValueError, match=r"^image 2: empty image"):
        hash_images([good, good, b""])
    with pytest.raises(ValueError, match=r"^image 0: no image"):
        hash_images([None])
    with pytest.raises(ValueError, match=r"^image 1: not a readable image"):
        hash_images([good, good[: len(good) // 2]])  # truncated PNG
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 now counts as a decompression bomb
    with pytest.raises(ValueError, match=r"^image 0: .*decompression bomb"):
        hash_images([good])


def test_bad_hash_settings_raise_bad_input(digit_images):
    images = digit_images[0][:1]
    with pytest.raises(BadInput, match="colorhash"):
        hash_images(images, kind="colorhash")
    with pytest.raises(BadInput, match="hash_size"):
        hash_images(images, hash_size=1)
    with pytest.raises(BadInput, match="power of 2"):
        hash_images(images, kind="whash", hash_size=12)
    assert hash_images([], hash_size=16).shape == (0, 4)


def test_odd_hash_sizes_pad_the_last_word_and_still_search_exactly(digit_images):
    hashes = hash_images(digit_images[0] + digit_images[1], kind="dhash", hash_size=12)  # 144 bits in 3 words
    assert hashes.shape == (20, 3)
    for max_distance in (0, 5, 20):
        assert_same_triples(MultiIndexHash(hashes, max_distance).pairs_within(), brute_pairs(hashes, max_distance))


def test_imagehash_version_is_the_installed_one():
    import imagehash

    assert imagehash_version() == imagehash.__version__


def test_importing_the_module_stays_light():
    code = (
        "import sys, synthforge.vision.imagehash_index; print(sorted({'imagehash', 'PIL', 'scipy', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
