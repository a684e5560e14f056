"""Decontamination benchmark: synthforge's hashed n-gram index and blocked cosine search beside a plain baseline.

Both systems apply the same three tests to every synthetic text, against every eval item:
equal normalised text (NFKC, case-folded word tokens), a shared run of `--ngram` words (an eval item shorter
than that must appear whole), and cosine >= a threshold (`--thresholds`) of the all-MiniLM-L6-v2 embeddings.

1. synthforge: `Decontaminator` (64-bit hashes of word n-grams in one sorted array, looked up a batch at a
   time; the longest shared run as evidence; `nearest` over blocks for the embeddings);
2. plain baseline: for every (text, eval item) pair a Python set test of their word n-grams, then the full
   text x eval cosine matrix in NumPy for the texts the n-grams left.

The embeddings are computed once, timed on their own, and given to both. The corpus is seeded: eval items are
customer-support questions (see bench_semantic_dedup.py) followed by a sentence of context; the synthetic texts
are 10% exact copies (case and punctuation changed), 10% near-exact copies (one or two words replaced, wrapped in
a longer prompt), 10% reworded copies (another opening, the qualifier moved, the context said in other words)
and 70% clean questions about other things.

    python benchmarks/bench_decontam.py                     # 4,000 texts vs 1,000 eval items; ~2 min, mostly embedding
    python benchmarks/bench_decontam.py --texts 1000 --eval 300
    python benchmarks/bench_decontam.py --texts 20000 --eval 5000 --ngrams-only
"""

from __future__ import annotations

import argparse
import json
import re
import time
import unicodedata
from pathlib import Path

import numpy as np
from bench_semantic_dedup import ACTIONS, OBJECTS, QUALIFIERS, question
from rich.console import Console
from rich.table import Table

from synthforge.text.decontam import Decontaminator, ProtectedSet

SEED = 20261121
KINDS = ("exact", "near-exact", "reworded", "clean")
SHARES = (0.1, 0.1, 0.1, 0.7)
# Context sentences in two wordings: the eval items say the first, reworded copies and clean texts the second.
SUBJECTS = [
    ("The parcel", "The package"), ("The confirmation email", "The order confirmation"), ("My refund", "The money back"),
    ("The tracking number", "The shipment code"), ("The discount code", "The promo voucher"),
    ("The replacement part", "The spare piece"), ("The courier", "The delivery driver"), ("The invoice", "The bill"),
    ("The customer account", "My online profile"), ("The store manager", "The shop supervisor"),
]  # fmt: skip
PROBLEMS = [
    ("never arrived at my house", "did not reach my home"), ("was damaged on the way", "got broken during shipping"),
    ("shows the wrong amount", "has an incorrect total"), ("stopped working after two days", "broke down within 48 hours"),
    ("was sent to my old address", "went to the place I moved out of"), ("expired before I could use it", "ran out early"),
    ("is missing a page", "lacks one sheet"), ("was cancelled without notice", "got called off with no warning"),
    ("cannot be found in the system", "does not show up anywhere online"), ("was charged twice", "billed me double"),
]  # fmt: skip
CONSEQUENCES = [
    ("and the support chat closes before anyone answers.", "and nobody replies in the help window."),
    ("and I have already waited more than three weeks.", "and it has been almost a month now."),
    ("and the hotline keeps me on hold for an hour.", "and phoning support means endless waiting music."),
    ("and my bank says the problem is on your side.", "and the card company blames the shop."),
    ("and the website shows an error every time I try.", "and the site crashes whenever I attempt it."),
    ("and I need it for a family event this weekend.", "and there is a celebration in a few days."),
    ("and the previous ticket was closed without a reply.", "and my earlier complaint got no response."),
    ("and nobody at the store could explain what happened.", "and the shop staff had no idea either."),
    ("and I was promised a call back that never came.", "and the promised phone call did not happen."),
    ("and the form asks for a number I do not have.", "and I lack the code the form requires."),
]  # fmt: skip
_WORD = re.compile(r"\w+")


def context(parts: tuple[int, int, int], wording: int) -> str:
    return " ".join(options[p][wording] for options, p in zip((SUBJECTS, PROBLEMS, CONSEQUENCES), parts, strict=True))


def make_corpus(n_texts: int, n_eval: int, seed: int = SEED) -> tuple[list[str], list[str], list[int], np.ndarray]:
    """(eval texts, synthetic texts, the eval item each planted text copies (-1 for clean), kind per text)."""
    rng = np.random.default_rng(seed)
    shape = (len(ACTIONS), len(OBJECTS), len(QUALIFIERS))
    codes = rng.choice(int(np.prod(shape)), size=n_eval + n_texts, replace=False)
    triples = np.stack(np.unravel_index(codes, shape), axis=1)
    contexts = rng.integers(len(SUBJECTS), size=(n_eval + n_texts, 3))
    eval_texts = [
        f"{question(rng, tuple(t))} {context(tuple(c), 0)}" for t, c in zip(triples[:n_eval], contexts[:n_eval], strict=True)
    ]
    kinds = rng.choice(len(KINDS), size=n_texts, p=SHARES)
    source = np.where(kinds < 3, rng.integers(n_eval, size=n_texts), -1)
    vocabulary = sorted({w for t in eval_texts for w in t.split()})
    texts = []
    for k, (kind, item) in enumerate(zip(kinds.tolist(), source.tolist(), strict=True)):
        if KINDS[kind] == "exact":
            words = eval_texts[item].split()
            texts.append(" ".join(w.upper() if rng.random() < 0.2 else w for w in words).replace("?", "").replace(".", "!"))
        elif KINDS[kind] == "near-exact":
            words = eval_texts[item].split()
            for position in rng.choice(len(words), size=int(rng.integers(1, 3)), replace=False):
                words[position] = vocabulary[rng.integers(len(vocabulary))]
            texts.append(f"Customer message: {' '.join(words)} Please draft a short, polite reply.")
        elif KINDS[kind] == "reworded":
            texts.append(f"{question(rng, tuple(triples[item]), paraphrase=True)} {context(tuple(contexts[item]), 1)}")
        else:
            texts.append(f"{question(rng, tuple(triples[n_eval + k]))} {context(tuple(contexts[n_eval + k]), 1)}")
    return eval_texts, texts, source.tolist(), kinds


# --- systems -------------------------------------------------------------------------------------------------


class Precomputed:
    """Hands the Decontaminator the eval embeddings made up front, so that encoding is timed once for both."""

    def __init__(self, texts: list[str], embeddings: np.ndarray):
        self._rows = dict(zip(texts, embeddings, strict=True))

    def encode(self, texts: list[str], progress: str | None = None) -> np.ndarray:
        return np.stack([self._rows[t] for t in texts])


def run_synthforge(eval_texts, texts, eval_emb, text_emb, ngram, threshold) -> dict:
    start = time.perf_counter()
    protected = ProtectedSet("eval", "bench", [str(k) for k in range(len(eval_texts))], eval_texts)
    encoder = Precomputed(eval_texts, eval_emb) if threshold is not None else None
    index = Decontaminator([protected], ngram, threshold, encoder)
    built = time.perf_counter()
    matches = index.find(texts, text_emb)
    done = time.perf_counter()
    return {
        "index_s": built - start,
        "check_s": done - built,
        "item": [int(m.eval_item_id) if m else -1 for m in matches],
        "method": [m.method if m else None for m in matches],
    }


def tokens(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def grams(words: list[str], width: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + width]) for i in range(len(words) - width + 1)}


def run_baseline(eval_texts, texts, eval_emb, text_emb, ngram, threshold) -> dict:
    start = time.perf_counter()
    eval_tokens = [tokens(t) for t in eval_texts]
    exact = {}
    for k, words in enumerate(eval_tokens):
        exact.setdefault(" ".join(words), k)
    eval_grams = [(min(ngram, len(w)), grams(w, min(ngram, len(w)))) for w in eval_tokens]
    widths = sorted({width for width, _ in eval_grams})
    built = time.perf_counter()
    item, method = [-1] * len(texts), [None] * len(texts)
    for i, text in enumerate(texts):
        words = tokens(text)
        if " ".join(words) in exact:
            item[i], method[i] = exact[" ".join(words)], "exact"
            continue
        mine = {width: grams(words, width) for width in widths}
        for k, (width, theirs) in enumerate(eval_grams):
            if not mine[width].isdisjoint(theirs):
                item[i], method[i] = k, "ngram"
                break
    left = [i for i in range(len(texts)) if item[i] < 0]
    if threshold is None:
        return {"index_s": built - start, "check_s": time.perf_counter() - built, "item": item, "method": method}
    similarity = text_emb[left] @ eval_emb.T
    best = similarity.argmax(axis=1)
    for i, k, sim in zip(left, best.tolist(), similarity[np.arange(len(left)), best].tolist(), strict=True):
        if sim >= threshold:
            item[i], method[i] = k, "embedding"
    return {"index_s": built - start, "check_s": time.perf_counter() - built, "item": item, "method": method}


def evaluate(result: dict, source: list[int], kinds: np.ndarray) -> dict:
    item, method = np.array(result["item"]), np.array(result["method"], dtype=object)
    found = item >= 0
    by_ngrams = np.isin(method, ["exact", "ngram"])
    clean = kinds == KINDS.index("clean")
    out = {"index_s": result["index_s"], "check_s": result["check_s"], "items_per_s": len(item) / result["check_s"]}
    for k, kind in enumerate(KINDS[:3]):
        out[f"recall_ngrams_{kind}"] = float(by_ngrams[kinds == k].mean())
        out[f"recall_{kind}"] = float(found[kinds == k].mean())
    # Eval items share context sentences, so a copy can overlap several; the evidence should name the copied one.
    caught = found & ~clean
    out["right_item"] = float((item == np.array(source))[caught].mean())
    out["clean_flagged_ngrams"] = float(by_ngrams[clean].mean())
    out["clean_flagged"] = float(found[clean].mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=4000, help="synthetic texts to check")
    parser.add_argument("--eval", type=int, default=1000, help="eval items to protect")
    parser.add_argument("--ngram", type=int, default=13)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.85], help="embedding cosine thresholds")
    parser.add_argument("--ngrams-only", action="store_true", help="no embeddings: the n-gram tests alone, at any size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the embeddings")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch

    from synthforge.text.embeddings import shared_encoder

    torch.set_num_threads(args.threads)
    eval_texts, texts, source, kinds = make_corpus(args.texts, args.eval)
    thresholds, eval_emb, text_emb, encode_s, embedded = [None], None, None, None, "no embeddings"
    if not args.ngrams_only:
        encoder = shared_encoder()
        start = time.perf_counter()
        eval_emb, text_emb = encoder.encode(eval_texts), encoder.encode(texts)
        encode_s, thresholds = time.perf_counter() - start, args.thresholds
        embedded = (
            f"embeddings ({encoder.identity}) made once for all: {len(texts) + len(eval_texts):,} texts in "
            f"{encode_s:.1f} s ({(len(texts) + len(eval_texts)) / encode_s:,.0f} texts/s)"
        )
    results = {}
    for threshold in thresholds:
        inputs = (eval_texts, texts, eval_emb, text_emb, args.ngram, threshold)
        at = f"\ncos >= {threshold}" if threshold is not None else ""
        results[f"synthforge{at}"] = evaluate(run_synthforge(*inputs), source, kinds)
        results[f"plain baseline{at}"] = evaluate(run_baseline(*inputs), source, kinds)
    counts = {kind: int((kinds == k).sum()) for k, kind in enumerate(KINDS)}
    table = Table(
        title=f"Decontamination, {args.texts:,} texts against {args.eval:,} eval items, {args.ngram}-word n-grams",
        caption="planted: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()) + f"; {embedded}",
    )
    table.add_column("")
    for name in results:
        table.add_column(name, justify="right")
    with_embeddings = [] if args.ngrams_only else [(f"recall {kind}, with embeddings", f"recall_{kind}") for kind in KINDS[:3]]
    rows = [
        ("index build (s)", "index_s", "{:.3f}"),
        ("check (s)", "check_s", "{:.3f}"),
        ("items/s (check)", "items_per_s", "{:,.0f}"),
        *[(f"recall {kind}, n-grams only", f"recall_ngrams_{kind}", "{:.3f}") for kind in KINDS[:3]],
        *[(label, key, "{:.3f}") for label, key in with_embeddings],
        ("caught copies naming the copied item", "right_item", "{:.3f}"),
        ("clean texts flagged, n-grams only", "clean_flagged_ngrams", "{:.3f}"),
        *([] if args.ngrams_only else [("clean texts flagged, with embeddings", "clean_flagged", "{:.3f}")]),
    ]
    for label, key, fmt in rows:
        table.add_row(label, *(fmt.format(r[key]) for r in results.values()))
    Console(width=120).print(table)
    if args.json:
        payload = {"config": vars(args) | {"json": None}, "planted": counts, "encode_s": encode_s, "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
