"""Near-duplicate detection benchmark: synthforge's vectorised MinHash LSH against datasketch MinHashLSH 2.0.

Both systems run at the same settings: `num_perm` permutations, word 3-gram shingles of the normalised text,
the (bands, rows) that `optimal_bands(threshold, num_perm)` picks, candidates verified by estimated
Jaccard >= threshold, clusters as connected components. The corpus is synthetic and seeded: short texts of
Zipf-distributed pseudo-words, ~10% of them planted copies of another text with 1-3 word edits.

Each system runs in its own spawned process, so peak RSS is its own; Linux only (/proc/self/clear_refs,
ru_maxrss in KiB).

    python -m benchmarks.bench_dedup                 # from the repository root; 100,000 texts
    python -m benchmarks.bench_dedup --n 2000        # smoke check, a few seconds
    python -m benchmarks.bench_dedup --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse.csgraph  # noqa: F401  (synthforge.minhash.cluster imports it lazily; load it before the RSS baseline)
from datasketch import MinHash, MinHashLSH
from rich.console import Console
from rich.table import Table

from synthforge.minhash import (
    MinHasher,
    candidate_pairs,
    cluster,
    estimated_jaccard,
    near_duplicate_representatives,
    normalize,
    optimal_bands,
)

BASELINE = "datasketch MinHashLSH 2.0"
SYSTEMS = {"synthforge": "synthforge", "datasketch": BASELINE}
NGRAM = 3
SEED = 20261121
VOCAB_SIZE = 5000
WORDS_PER_TEXT = (30, 60)
PLANTED_FRACTION = 0.10
MAX_EDITS = 3
CLUSTER_CAP = 100  # clusters larger than this are judged on a sample of pairs, not all m*(m-1)/2
_WORD = re.compile(r"\w+", re.UNICODE)  # the tokenisation of synthforge.minhash.MinHasher.shingles


# --- corpus -------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    texts: list[str]
    planted: np.ndarray  # int64 [k, 2]: (original index, copy index)


def make_corpus(n: int, seed: int = SEED) -> Corpus:
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"]
    two_syllable = [a + b for a in syllables for b in syllables]
    vocab = [two_syllable[i] for i in rng.permutation(len(two_syllable))[:VOCAB_SIZE]]
    # Zipf-Mandelbrot word frequencies (s=1, q=2.7): a few very common words, as in natural text.
    cdf = np.cumsum(1.0 / (np.arange(VOCAB_SIZE) + 2.7))
    cdf /= cdf[-1]

    def draw(k: int) -> np.ndarray:
        return np.minimum(cdf.searchsorted(rng.random(k), side="right"), VOCAB_SIZE - 1)

    n_copies = int(round(n * PLANTED_FRACTION))
    n_base = n - n_copies
    lengths = rng.integers(WORDS_PER_TEXT[0], WORDS_PER_TEXT[1] + 1, size=n_base)
    docs = [d.tolist() for d in np.split(draw(int(lengths.sum())), np.cumsum(lengths)[:-1])]
    # Without replacement, so every original has exactly one copy and the planted pairs are the whole
    # ground truth (copy-copy pairs would be near-duplicates nobody planted).
    originals = rng.choice(n_base, size=n_copies, replace=False)
    for o in originals:
        words = list(docs[o])
        for _ in range(rng.integers(1, MAX_EDITS + 1)):
            op = rng.integers(3)
            if op == 0:  # substitute
                pos = rng.integers(len(words))
                new = words[pos]
                while new == words[pos]:
                    new = int(draw(1)[0])
                words[pos] = new
            elif op == 1:  # insert
                words.insert(rng.integers(len(words) + 1), int(draw(1)[0]))
            else:  # delete
                del words[rng.integers(len(words))]
        docs.append(words)
    # Copies land at random positions, so "earliest member" carries no hint of which text is the copy.
    position = rng.permutation(n)
    texts = [""] * n
    for i, words in enumerate(docs):
        sentence = " ".join(vocab[w] for w in words)
        texts[position[i]] = sentence[0].upper() + sentence[1:] + "."
    planted = np.stack([position[originals], position[n_base:]], axis=1).astype(np.int64)
    return Corpus(texts, planted)


def word_shingles(text: str) -> set[str]:
    """Word n-grams of the normalised text, exactly the shingles synthforge hashes (one if fewer words)."""
    words = _WORD.findall(normalize(text))
    if not words:
        return set()
    n = min(NGRAM, len(words))
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


# --- systems (each runs in a spawned child) --------------------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_synthforge(texts: list[str], threshold: float, num_perm: int, bands: int, rows: int) -> dict:
    t0 = time.perf_counter()
    sigs, has_words = MinHasher(num_perm=num_perm, ngram=NGRAM).signatures(texts)
    t1 = time.perf_counter()
    candidates = candidate_pairs(sigs, bands, rows)
    t2 = time.perf_counter()
    # The rest of near_duplicate_representatives, split out so LSH and clustering are timed apart.
    pairs = candidates[has_words[candidates[:, 0]] & has_words[candidates[:, 1]]]
    pairs = pairs[estimated_jaccard(sigs, pairs[:, 0], pairs[:, 1]) >= threshold]
    reps = cluster(len(texts), pairs)
    t3 = time.perf_counter()
    peak = _peak_rss_mib()
    if not np.array_equal(reps, near_duplicate_representatives(sigs, threshold, bands, rows, has_words)):
        raise AssertionError("the staged pipeline no longer matches near_duplicate_representatives")
    return {"times": (t1 - t0, t2 - t1, t3 - t2), "peak_mib": peak, "candidates": len(candidates), "reps": reps}


def _run_datasketch(texts: list[str], threshold: float, num_perm: int, bands: int, rows: int) -> dict:
    t0 = time.perf_counter()
    # MinHash.bulk is datasketch's batch API (one update_batch per document, shared permutations);
    # default hash function (SHA-1) and scheme (affine32).
    minhashes = MinHash.bulk(([s.encode("utf-8") for s in word_shingles(t)] for t in texts), num_perm=num_perm)
    t1 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=(bands, rows))
    with lsh.insertion_session() as session:
        for i, m in enumerate(minhashes):
            session.insert(i, m, check_duplication=False)
    neighbours = [[j for j in lsh.query(m) if j > i] for i, m in enumerate(minhashes)]
    t2 = time.perf_counter()
    # Union-find; the smaller root always wins, so a component's root is its earliest member.
    parent = list(range(len(texts)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, js in enumerate(neighbours):
        for j in js:
            if minhashes[i].jaccard(minhashes[j]) >= threshold:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    reps = np.array([find(i) for i in range(len(texts))], dtype=np.int64)
    t3 = time.perf_counter()
    peak = _peak_rss_mib()
    return {"times": (t1 - t0, t2 - t1, t3 - t2), "peak_mib": peak, "candidates": sum(map(len, neighbours)), "reps": reps}


def run_system(system: str, n: int, threshold: float, num_perm: int, bands: int, rows: int) -> dict:
    """Child entry point: build the corpus, reset the peak-RSS mark, run one system end to end."""
    texts = make_corpus(n).texts
    # Writing 5 to clear_refs resets the peak RSS to the current RSS, so the transient memory of building
    # the corpus does not hide the system's own peak.
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _peak_rss_mib()
    run = {"synthforge": _run_synthforge, "datasketch": _run_datasketch}[system]
    result = run(texts, threshold, num_perm, bands, rows)
    result["baseline_mib"] = baseline
    return result


# --- evaluation ----------------------------------------------------------------------------------------------


def evaluate(result: dict, corpus: Corpus, planted_j: np.ndarray, threshold: float, shingles: Callable[[int], set[str]]) -> dict:
    reps = result["reps"]
    found = reps[corpus.planted[:, 0]] == reps[corpus.planted[:, 1]]
    positive = planted_j >= threshold
    rng = np.random.default_rng(SEED)
    order = np.argsort(reps, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(reps[order]) != 0])
    members_of = np.split(order, starts[1:])
    judged, capped = [], 0
    for members in members_of:
        m = len(members)
        if m < 2:
            continue
        if m <= CLUSTER_CAP:
            i, j = np.triu_indices(m, k=1)
        else:
            capped += 1
            k = CLUSTER_CAP * (CLUSTER_CAP - 1) // 2
            i = rng.integers(m, size=k)
            j = rng.integers(m - 1, size=k)
            j += j >= i
        judged.extend(jaccard(shingles(a), shingles(b)) for a, b in zip(members[i], members[j], strict=True))
    judged = np.array(judged)
    t_sig, t_lsh, t_cluster = result["times"]
    return {
        "time_signatures_s": t_sig,
        "time_lsh_s": t_lsh,
        "time_verify_cluster_s": t_cluster,
        "time_total_s": t_sig + t_lsh + t_cluster,
        "peak_rss_mib": result["peak_mib"] - result["baseline_mib"],
        "baseline_rss_mib": result["baseline_mib"],
        "candidate_pairs": int(result["candidates"]),
        "clusters": int(sum(len(g) >= 2 for g in members_of)),
        "texts_in_clusters": int(sum(len(g) for g in members_of if len(g) >= 2)),
        "same_cluster_pairs_judged": len(judged),
        "capped_clusters": capped,
        "precision": float((judged >= threshold).mean()) if len(judged) else float("nan"),
        "recall": float(found[positive].mean()) if positive.any() else float("nan"),
        "recall_all_planted": float(found.mean()),
    }


def render(config: dict, corpus_stats: dict, results: dict[str, dict]) -> Table:
    table = Table(
        title=f"Near-duplicate detection, {config['n']:,} texts",
        caption=(
            f"num_perm={config['num_perm']}, word {NGRAM}-grams, threshold={config['threshold']}, "
            f"bands x rows = {config['bands']} x {config['rows']}; planted pairs: {corpus_stats['planted_pairs']:,}, "
            f"{corpus_stats['planted_positive']:,} with true Jaccard >= {config['threshold']} "
            f"(median true Jaccard {corpus_stats['planted_jaccard_median']:.3f})"
        ),
    )
    table.add_column("")
    for name in results:
        table.add_column(SYSTEMS[name], justify="right")
    rows = [
        ("signatures (s)", "time_signatures_s", "{:.2f}"),
        ("LSH index + query (s)", "time_lsh_s", "{:.2f}"),
        ("verify + cluster (s)", "time_verify_cluster_s", "{:.2f}"),
        ("total (s)", "time_total_s", "{:.2f}"),
        ("peak RSS over baseline (MiB)", "peak_rss_mib", "{:.0f}"),
        ("LSH candidate pairs", "candidate_pairs", "{:,}"),
        ("clusters (>= 2 texts)", "clusters", "{:,}"),
        ("same-cluster pairs judged", "same_cluster_pairs_judged", "{:,}"),
        (f"precision (true J >= {config['threshold']})", "precision", "{:.4f}"),
        (f"recall, planted, true J >= {config['threshold']}", "recall", "{:.4f}"),
        ("recall, all planted", "recall_all_planted", "{:.4f}"),
    ]
    for label, key, fmt in rows:
        table.add_row(label, *(fmt.format(r[key]) for r in results.values()))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of texts (default 100000)")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    bands, rows = optimal_bands(args.threshold, args.num_perm)
    config = {"n": args.n, "threshold": args.threshold, "num_perm": args.num_perm, "bands": bands, "rows": rows}

    # Children first, while this process is small: a spawned child inherits its parent's RSS as a floor
    # under ru_maxrss (the kernel carries the pre-exec peak over), which clear_refs cannot lower.
    raw = {}
    ctx = multiprocessing.get_context("spawn")
    for system in SYSTEMS:
        with ctx.Pool(1) as pool:
            raw[system] = pool.apply(run_system, (system, args.n, args.threshold, args.num_perm, bands, rows))

    corpus = make_corpus(args.n)
    cache: dict[int, set[str]] = {}

    def shingles(i: int) -> set[str]:
        if i not in cache:
            cache[i] = word_shingles(corpus.texts[i])
        return cache[i]

    planted_j = np.array([jaccard(shingles(a), shingles(b)) for a, b in corpus.planted])
    corpus_stats = {
        "planted_pairs": len(planted_j),
        "planted_positive": int((planted_j >= args.threshold).sum()),
        "planted_jaccard_median": float(np.median(planted_j)),
        "planted_jaccard_quartiles": [float(q) for q in np.quantile(planted_j, [0.25, 0.5, 0.75])],
    }
    results = {name: evaluate(r, corpus, planted_j, args.threshold, shingles) for name, r in raw.items()}
    Console().print(render(config, corpus_stats, results))
    if args.json:
        payload = {"config": config, "corpus": corpus_stats, "baseline": BASELINE, "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
