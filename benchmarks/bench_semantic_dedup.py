"""Semantic dedup benchmark: synthforge's blocked cosine clustering beside two plain baselines on the same embeddings.

All three find the connected components of the graph of pairs whose cosine is >= `--threshold`, each cluster
represented by its earliest text:

1. synthforge: `cosine_clusters` (square tiles of the similarity matrix, components merged as edges come);
2. numpy n x n: the full similarity matrix at once, its upper-triangle edges, a union-find in Python;
3. scikit-learn `NearestNeighbors(radius=1 - threshold, metric="cosine", algorithm="brute")`, its
   `radius_neighbors_graph` and scipy's connected components.

The corpus is seeded: customer-support questions built from an action, an object and a qualifier (25 x 40 x 25
distinct triples) with one of several openings; 10% of the questions get a planted paraphrase (another opening,
sometimes with the qualifier moved to the front) a few hundred positions later, so every prefix of the corpus
holds its own planted pairs. The bundled all-MiniLM-L6-v2 embeds the largest corpus once (timed on its own);
each size is a prefix of it. Recall is the share of planted pairs that end in one cluster; precision is the
share of same-cluster pairs that are planted pairs, and (more leniently) that ask for the same action on the same
object. Peak memory is tracemalloc's peak (NumPy allocations included).

    python benchmarks/bench_semantic_dedup.py                      # 2,000 and 10,000 texts; ~1.5 min, mostly embedding
    python benchmarks/bench_semantic_dedup.py --sizes 2000 --threshold 0.85
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from synthforge.text.semantic import cosine_clusters

SEED = 20261121
PLANTED_FRACTION = 0.10
PLANTED_WITHIN = 300  # a paraphrase lands at most this many positions after its original

ACTIONS = [
    "cancel", "track", "return", "pay for", "upgrade", "insure", "repair", "exchange", "gift-wrap", "reorder",
    "split the payment for", "change the delivery address of", "register the warranty of", "get an invoice for",
    "reserve", "rate", "recycle", "unlock", "reset", "resell", "clean", "charge", "update", "assemble", "donate",
]  # fmt: skip
OBJECTS = [
    "my order", "the laptop I bought last week", "a gift card", "the blue running shoes", "my phone",
    "the coffee machine", "the winter jacket", "my subscription box", "the garden chairs", "a pair of headphones",
    "the kids' bicycle", "the kitchen knives", "my new television", "the office desk", "the birthday cake order",
    "a box of printer paper", "the electric toothbrush", "my smartwatch", "the camping tent", "the vacuum cleaner",
    "the yoga mat", "the wireless router", "a set of bed sheets", "the travel suitcase", "my gaming console",
    "the baby stroller", "the standing lamp", "the microwave oven", "the e-book reader", "my car seat covers",
    "the dining table", "a bottle of olive oil", "the hiking boots", "the electric kettle", "the wall clock",
    "a bag of dog food", "the board game", "my reading glasses", "the air purifier", "the sewing machine",
]  # fmt: skip
QUALIFIERS = [
    "before Friday", "without an account", "from abroad", "using the mobile app", "for my grandmother",
    "after the warranty expired", "if I lost the receipt", "during the holiday sale", "with a foreign credit card",
    "on a weekend", "when the box was opened", "through a courier", "at the store near me", "by phone",
    "for a business customer", "in another currency", "while travelling", "with store credit", "after thirty days",
    "as a student", "from my partner's account", "in two separate parcels", "without paying extra", "online", "today",
]  # fmt: skip
OPENINGS = ["How do I", "Can I", "Is it possible to", "What is the fastest way to", "Where can I"]
PARAPHRASE_OPENINGS = ["Please explain how to", "I need help: how can I", "Tell me how I can", "Could you show me how to"]


def question(rng: np.random.Generator, triple: tuple[int, int, int], paraphrase: bool = False) -> str:
    action, obj, qualifier = ACTIONS[triple[0]], OBJECTS[triple[1]], QUALIFIERS[triple[2]]
    openings = PARAPHRASE_OPENINGS if paraphrase else OPENINGS
    opening = openings[rng.integers(len(openings))]
    if paraphrase and rng.random() < 0.5:
        return f"{qualifier[0].upper()}{qualifier[1:]}, {opening[0].lower()}{opening[1:]} {action} {obj}?"
    return f"{opening} {action} {obj} {qualifier}?"


def make_corpus(n: int, seed: int = SEED) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts, planted pairs [k, 2] of (original, paraphrase) indices, each text's request: action x object)."""
    rng = np.random.default_rng(seed)
    n_planted = int(round(n * PLANTED_FRACTION))
    n_base = n - n_planted
    space = len(ACTIONS) * len(OBJECTS) * len(QUALIFIERS)
    codes = rng.choice(space, size=n_base, replace=False)
    triples = np.stack(np.unravel_index(codes, (len(ACTIONS), len(OBJECTS), len(QUALIFIERS))), axis=1)
    texts = [question(rng, tuple(t)) for t in triples]
    originals = rng.choice(n_base, size=n_planted, replace=False)
    texts += [question(rng, tuple(triples[o]), paraphrase=True) for o in originals]
    request = np.concatenate(
        [triples[:, 0] * len(OBJECTS) + triples[:, 1], (triples[originals, 0] * len(OBJECTS) + triples[originals, 1])]
    )
    # Sorting by these keys keeps the originals in order and puts each paraphrase a little after its original.
    keys = np.concatenate([np.arange(n_base), originals + rng.uniform(0.5, PLANTED_WITHIN, size=n_planted)])
    order = np.argsort(keys, kind="stable")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    planted = np.stack([position[originals], position[n_base + np.arange(n_planted)]], axis=1)
    return [texts[i] for i in order], planted, request[order]


# --- systems -----------------------------------------------------------------------------------------------


def run_synthforge(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    return cosine_clusters(embeddings, threshold)[0]


def run_numpy_union_find(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    similarity = embeddings @ embeddings.T
    i, j = np.nonzero(np.triu(similarity >= threshold, k=1))
    parent = list(range(len(embeddings)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the smaller root wins: a component's root is its earliest text
    return np.array([find(x) for x in range(len(embeddings))], dtype=np.int64)


def run_sklearn(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(radius=1 - threshold, metric="cosine", algorithm="brute").fit(embeddings)
    _, labels = connected_components(index.radius_neighbors_graph(embeddings, mode="connectivity"), directed=False)
    first = np.full(labels.max() + 1, len(labels), dtype=np.int64)
    np.minimum.at(first, labels, np.arange(len(labels)))
    return first[labels]


SYSTEMS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "synthforge": run_synthforge,
    "numpy n x n + union-find": run_numpy_union_find,
    "sklearn radius search": run_sklearn,
}


def measure(system: Callable, embeddings: np.ndarray, threshold: float, repeat: int) -> tuple[np.ndarray, float, float]:
    """(representatives, best of `repeat` seconds, peak MiB); the peak comes from one more run under tracemalloc."""
    seconds = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        reps = system(embeddings, threshold)
        seconds = min(seconds, time.perf_counter() - start)
    tracemalloc.start()
    system(embeddings, threshold)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return reps, seconds, peak


def pairs_within(groups: np.ndarray) -> int:
    counts = np.unique(groups, return_counts=True)[1]
    return int((counts * (counts - 1) // 2).sum())


def evaluate(reps: np.ndarray, planted: np.ndarray, request: np.ndarray) -> dict:
    same_cluster = pairs_within(reps)
    found = int((reps[planted[:, 0]] == reps[planted[:, 1]]).sum())
    return {
        "clusters": int((np.bincount(reps) >= 2).sum()),
        "recall": found / len(planted) if len(planted) else float("nan"),
        "precision": found / same_cluster if same_cluster else float("nan"),
        # Questions with the same action and object differ only in opening and qualifier: near in meaning too.
        "precision_same_request": pairs_within(reps * (request.max() + 1) + request) / same_cluster
        if same_cluster
        else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10_000])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the embeddings")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per system (best is shown)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    from synthforge.text.embeddings import shared_encoder

    torch.set_num_threads(args.threads)
    texts, planted, request = make_corpus(max(args.sizes))
    encoder = shared_encoder()
    start = time.perf_counter()
    embeddings = encoder.encode(texts)
    encode_s = time.perf_counter() - start
    cosines = np.einsum("ij,ij->i", embeddings[planted[:, 0]], embeddings[planted[:, 1]])

    console = Console(width=110)
    results = {"encoder": encoder.identity, "encode_s": encode_s, "texts": len(texts), "sizes": {}}
    for n in sorted(args.sizes):
        inside = planted[planted[:, 1] < n]
        runs = {name: measure(system, embeddings[:n], args.threshold, args.repeat) for name, system in SYSTEMS.items()}
        reference = runs["synthforge"][0]
        table = Table(
            title=f"Semantic dedup, {n:,} texts, cosine >= {args.threshold}",
            caption=(
                f"{len(inside):,} planted paraphrase pairs, {(cosines[planted[:, 1] < n] >= args.threshold).mean():.2f} of them "
                f"at cosine >= {args.threshold}; embeddings ({encoder.identity}) made once: "
                f"{len(texts):,} texts in {encode_s:.1f} s ({len(texts) / encode_s:,.0f} texts/s)"
            ),
        )
        table.add_column("")
        for name in runs:
            table.add_column(name, justify="right")
        scores = {
            name: {"seconds": s, "items_per_s": n / s, "peak_mib": p, **evaluate(r, inside, request[:n])}
            for name, (r, s, p) in runs.items()
        }
        for name, (r, _, _) in runs.items():
            scores[name]["same_clusters_as_synthforge"] = bool(np.array_equal(r, reference))
        for label, key, fmt in [
            ("cluster time (s)", "seconds", "{:.3f}"),
            ("items/s", "items_per_s", "{:,.0f}"),
            ("peak memory (MiB)", "peak_mib", "{:,.1f}"),
            ("clusters (>= 2 texts)", "clusters", "{:,}"),
            ("recall, planted pairs", "recall", "{:.3f}"),
            ("precision: planted pairs", "precision", "{:.3f}"),
            ("precision: same action and object", "precision_same_request", "{:.3f}"),
            ("same clusters as synthforge", "same_clusters_as_synthforge", "{}"),
        ]:
            table.add_row(label, *(fmt.format(s[key]) for s in scores.values()))
        console.print(table)
        results["sizes"][n] = scores
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
