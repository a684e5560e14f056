"""Image near-duplicate benchmark: synthforge's imagehash + multi-index hashing beside brute force and imagededup.

Three systems find every pair of images whose 64-bit perceptual hashes are within `--max-distance` bits:

1. synthforge: `hash_images` (imagehash.phash bits) and `MultiIndexHash.pairs_within`;
2. brute force: the same hashes, every pair's popcount distance in NumPy, in row blocks of the upper triangle;
3. imagededup 0.3 `PHash`: `encode_images` over the image folder and `find_duplicates(encoding_map=...,
   max_distance_threshold=t)` (its own phash, its C++ brute-force search, multiprocessing with its defaults).

The corpus is seeded: scikit-learn's 8x8 digits upscaled to 32x32 with random scale, shift, rotation and
stroke intensity, so every image is distinct, and 10% of them planted copies of another image made by one of:
Gaussian noise (sigma 6), brightness +15..35, a 1-pixel shift, or JPEG re-encoding (quality 60..90, kept as
JPEG). All images are written to one folder as files, and every system starts from those files.

    python benchmarks/bench_image_dedup.py                  # 10,000 images, max distance 10
    python benchmarks/bench_image_dedup.py --n 2000         # smoke check
    python benchmarks/bench_image_dedup.py --max-distance 6 --json out.json

imagededup imports its CNN method (torchvision) from its package __init__; without torchvision the hashing
module is loaded on its own (see `_imagededup_phash`). Install it with `pip install --no-deps imagededup`.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from synthforge.vision.imagehash_index import MultiIndexHash, hamming, hash_images

SEED = 20261121
SIZE = 32
PLANTED_FRACTION = 0.10
TRANSFORMS = ("noise", "brightness", "shift", "jpeg")
BRUTE_FORCE_CELLS = 1 << 22  # distances computed at once by the brute force (rows x N)
BASELINE = "imagededup 0.3 PHash"
SYSTEMS = ("synthforge", "brute force", BASELINE)


# --- corpus ------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    files: list[Path]  # in corpus order
    planted: np.ndarray  # int64 [k, 2]: (original index, copy index)
    transform: np.ndarray  # index into TRANSFORMS, one per planted pair


def _encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **options)
    return buf.getvalue()


def _jittered_digit(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 digit (0..16) as a distinct 32x32 grey image: random scale, offset, rotation and stroke intensity."""
    from PIL import Image

    side = int(rng.integers(22, 33))
    glyph = Image.fromarray((digit * (255 / 16) * rng.uniform(0.7, 1.0)).astype(np.uint8))
    glyph = glyph.resize((side, side), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (SIZE, SIZE))
    room = SIZE - side
    canvas.paste(glyph, (int(rng.integers(0, room + 1)), int(rng.integers(0, room + 1))))
    return np.asarray(canvas.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR))


def _planted_copy(pixels: np.ndarray, transform: str, rng: np.random.Generator) -> tuple[bytes, str]:
    if transform == "jpeg":
        return _encode(pixels, "JPEG", quality=int(rng.integers(60, 91))), "jpg"
    copy = pixels.astype(np.float64)
    if transform == "noise":
        copy += rng.normal(0, 6, copy.shape)
    elif transform == "brightness":
        copy += rng.uniform(15, 35)
    else:  # shift by one pixel in a random direction, filling with black
        axis, step = int(rng.integers(2)), int(rng.choice([-1, 1]))
        copy = np.roll(copy, step, axis=axis)
        edge = [slice(None)] * 2
        edge[axis] = 0 if step == 1 else -1
        copy[tuple(edge)] = 0
    return _encode(np.clip(np.rint(copy), 0, 255).astype(np.uint8), "PNG"), "png"


def make_corpus(n: int, folder: Path, seed: int = SEED) -> Corpus:
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits().images
    n_copies = int(round(n * PLANTED_FRACTION))
    n_base = n - n_copies
    bases = [_jittered_digit(digits[rng.integers(len(digits))], rng) for _ in range(n_base)]
    encoded = [(_encode(b, "PNG"), "png") for b in bases]
    originals = rng.choice(n_base, size=n_copies, replace=False)  # one copy per original: planted pairs are the truth
    transform = rng.integers(len(TRANSFORMS), size=n_copies)
    encoded += [_planted_copy(bases[o], TRANSFORMS[t], rng) for o, t in zip(originals, transform, strict=True)]
    # Copies land at random positions, so "earliest" carries no hint of which image is the copy.
    position = rng.permutation(n)
    files = [Path()] * n
    for i, (data, ext) in enumerate(encoded):
        files[position[i]] = folder / f"img{position[i]:06d}.{ext}"
        files[position[i]].write_bytes(data)
    planted = np.stack([position[originals], position[n_base:]], axis=1).astype(np.int64)
    return Corpus(files, planted, transform)


# --- systems -------------------------------------------------------------------------------------------------


def best_time(function, repeat: int):
    """(fastest wall time, result) of `repeat` calls: the searches take well under a second on a shared machine."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - t0)
    return min(times), result


def run_synthforge(corpus: Corpus, max_distance: int, repeat: int) -> dict:
    t0 = time.perf_counter()
    hashes = hash_images(p.read_bytes() for p in corpus.files)
    t1 = time.perf_counter()
    search_s, (i, j, _) = best_time(lambda: MultiIndexHash(hashes, max_distance).pairs_within(), repeat)
    return {"time_hash_s": t1 - t0, "time_search_s": search_s, "pairs": np.stack([i, j], axis=1), "hashes": hashes}


def run_brute_force(hashes: np.ndarray, max_distance: int, repeat: int) -> dict:
    search_s, pairs = best_time(lambda: brute_force_pairs(hashes, max_distance), repeat)
    return {"time_hash_s": float("nan"), "time_search_s": search_s, "pairs": pairs}


def brute_force_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    found = []
    rows = max(1, BRUTE_FORCE_CELLS // len(hashes))
    for start in range(0, len(hashes), rows):
        block = hashes[start : start + rows]
        dist = hamming(block[:, None, :], hashes[None, start:, :])  # the upper triangle's rows only
        i, j = np.nonzero(dist <= max_distance)
        keep = j > i  # j counts from `start`, as i does
        found.append(np.stack([i[keep] + start, j[keep] + start], axis=1))
    pairs = np.concatenate(found)
    return pairs[np.lexsort(pairs.T[::-1])]


def _imagededup_phash():
    try:
        from imagededup.methods import PHash
    except ModuleNotFoundError as exc:
        if exc.name != "torchvision":
            raise
        # imagededup.methods and imagededup.utils import its CNN model (torchvision) in their __init__; hashing
        # needs neither, so stand in empty packages and import the hashing module directly.
        import imagededup

        root = Path(imagededup.__file__).parent
        for name in ("methods", "utils"):
            sys.modules.pop(f"imagededup.{name}", None)
            package = types.ModuleType(f"imagededup.{name}")
            package.__path__ = [str(root / name)]
            sys.modules[f"imagededup.{name}"] = package
        from imagededup.methods.hashing import PHash
    return PHash


def run_imagededup(corpus: Corpus, max_distance: int, workers: int) -> dict:
    import logging
    import warnings

    phasher = _imagededup_phash()(verbose=False)
    logging.disable(logging.INFO)  # imagededup logs every step at INFO on its own stderr handlers
    folder = corpus.files[0].parent
    t0 = time.perf_counter()
    encodings = phasher.encode_images(image_dir=folder, num_enc_workers=workers)
    t1 = time.perf_counter()
    with warnings.catch_warnings():  # it warns that num_enc_workers (a default) does nothing with an encoding_map
        warnings.simplefilter("ignore", RuntimeWarning)
        duplicates = phasher.find_duplicates(
            encoding_map=encodings, max_distance_threshold=max_distance, num_dist_workers=workers
        )
    t2 = time.perf_counter()
    logging.disable(logging.NOTSET)
    index_of = {p.name: k for k, p in enumerate(corpus.files)}
    pairs = {tuple(sorted((index_of[a], index_of[b]))) for a, found in duplicates.items() for b in found}
    pairs = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    return {"time_hash_s": t1 - t0, "time_search_s": t2 - t1, "pairs": pairs, "hashed": len(encodings)}


# --- evaluation ----------------------------------------------------------------------------------------------


def evaluate(result: dict, corpus: Corpus) -> dict:
    n = len(corpus.files)
    reported = set((result["pairs"][:, 0] * n + result["pairs"][:, 1]).tolist())
    truth = np.sort(corpus.planted, axis=1)
    found = np.array([a * n + b in reported for a, b in truth])
    out = {
        "time_hash_s": result["time_hash_s"],
        "time_search_s": result["time_search_s"],
        "pairs_reported": len(reported),
        "planted_found": int(found.sum()),
        "precision": float(found.sum() / len(reported)) if reported else float("nan"),
        "recall": float(found.mean()),
    }
    for k, name in enumerate(TRANSFORMS):
        out[f"recall_{name}"] = float(found[corpus.transform == k].mean())
    return out


def render(config: dict, results: dict[str, dict]) -> Table:
    caption = [
        f"pairs within Hamming distance {config['max_distance']}; {config['planted']:,} planted copies",
        f"({', '.join(TRANSFORMS)}, about a quarter each); precision = planted pairs / pairs reported.",
        f"synthforge and brute force: 1 process, search time best of {config['repeat']}.",
        f"imagededup: {config['workers']} worker processes, one run." if config["workers"] else "",
        f"MultiIndexHash: {config['n_chunks']} chunks, radius {config['radius']} per chunk.",
    ]
    table = Table(
        title=f"Image near-duplicate search, {config['n']:,} images ({SIZE}x{SIZE} digits), 64-bit phash",
        caption=" ".join(part for part in caption if part),
    )
    table.add_column("")
    for name in results:
        table.add_column(name, justify="right")
    rows = [
        ("hashing (s)", "time_hash_s", "{:.2f}"),
        ("search (s)", "time_search_s", "{:.3f}"),
        ("pairs reported", "pairs_reported", "{:,}"),
        ("planted pairs found", "planted_found", "{:,}"),
        ("precision", "precision", "{:.4f}"),
        ("recall, all planted", "recall", "{:.4f}"),
        *((f"recall, {name}", f"recall_{name}", "{:.4f}") for name in TRANSFORMS),
    ]
    for label, key, fmt in rows:
        table.add_row(label, *("-" if np.isnan(r[key]) else fmt.format(r[key]) for r in results.values()))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of images (default 10000)")
    parser.add_argument("--max-distance", type=int, default=10, help="Hamming distance threshold (imagededup's default, 10)")
    parser.add_argument("--workers", type=int, default=multiprocessing.cpu_count(), help="imagededup worker processes")
    parser.add_argument("--repeat", type=int, default=3, help="synthforge and brute-force searches: best of this many runs")
    parser.add_argument("--no-imagededup", action="store_true", help="leave imagededup out (its search is quadratic in Python)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-image-dedup-") as tmp:
        t0 = time.perf_counter()
        corpus = make_corpus(args.n, Path(tmp))
        print(f"corpus: {args.n:,} images written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        raw = {"synthforge": run_synthforge(corpus, args.max_distance, args.repeat)}
        hashes = raw["synthforge"]["hashes"]
        raw["brute force"] = run_brute_force(hashes, args.max_distance, args.repeat)
        if not np.array_equal(raw["synthforge"]["pairs"], raw["brute force"]["pairs"]):
            raise AssertionError("MultiIndexHash and brute force disagree: the search is supposed to be exact")
        if not args.no_imagededup:
            raw[BASELINE] = run_imagededup(corpus, args.max_distance, args.workers)
        if BASELINE in raw and raw[BASELINE]["hashed"] != args.n:
            raise AssertionError(f"imagededup hashed {raw[BASELINE]['hashed']} of {args.n} images")

    index = MultiIndexHash(hashes, args.max_distance)
    config = {
        "n": args.n,
        "max_distance": args.max_distance,
        "planted": len(corpus.planted),
        "workers": None if args.no_imagededup else args.workers,
        "repeat": args.repeat,
        "n_chunks": index.n_chunks,
        "radius": index.radius,
        "cpus": os.cpu_count(),
    }
    results = {name: evaluate(r, corpus) for name, r in raw.items()}
    Console().print(render(config, results))
    if args.json:
        args.json.write_text(json.dumps({"config": config, "baseline": BASELINE, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
