"""Trace benchmark: `synthforge.trace` over the manifests of many published versions beside a plain pandas scan.

The corpus is seeded and synthetic, shaped like releases of a text eval set: version k (of `--versions`) holds a
contiguous run of the samples made so far, re-publishing the previous release minus its oldest 2% plus new
samples, so releases grow from 0.55x to 1.45x the mean size, overlap heavily and total `--samples` manifest rows.
A sample is a prompt (one of 20 templates' fixed instruction, then a customer message of 30-50 Zipf-distributed
words from a 20,000-word vocabulary), a JSON reference, a label and a locale; 80% are template samples in batches
of 64, 20% paraphrases of an earlier template sample (another batch and model, their own words, the parent in
`parent_ids`). Each version folder is what a publish writes (or a Hub download gives): provenance/manifest.parquet
with full provenance structs and the text index, and data/{split}-*.parquet shards with the content.

Lookups, each answered by both systems and checked to find the same (sample, version, split) rows:

- batch: a template batch and its descendants. pandas reads every manifest's sample_id, split and provenance
  (pyarrow dtypes, only those columns), filters on the batch and follows parent_ids until nothing new turns up.
- text, exact: a sample's prompt with its case and spacing changed. pandas reads every shard's text columns and
  compares NFKC + case-folded + whitespace-collapsed text.
- text, near-duplicate: a prompt with 3 words changed (MinHash: Jaccard of word 3-grams >= 0.5). pandas computes
  that Jaccard for every text field of every row.
- text, n-gram: a customer message with 3 words changed, the kind of held-out item pasted into a longer prompt
  (a shared run of 13 words). pandas checks every row's 13-grams against the item's.

synthforge answers through `trace(..., versions=[(label, folder), ...])` with no stage directories: exact and
MinHash look up the manifests' index and read only candidates' text, n-gram reads each sample's text once. Every
lookup runs in its own spawned process; peak RSS is that process's peak over its RSS before the lookup (Linux).
The files sit in the OS page cache (they were just written or read), as they would on a warm machine.

    python benchmarks/bench_trace.py                             # 1,000,000 manifest rows in 10 versions
    python benchmarks/bench_trace.py --samples 100000            # a quick run
    python benchmarks/bench_trace.py --cache /tmp/x --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import re
import resource
import shutil
import time
import unicodedata
from pathlib import Path

import numpy as np

SEED = 20261121
CORPUS = "c1"  # names the cache folder: change it when the corpus generator changes
TEMPLATES = 20
BATCH = 64
SHARD_ROWS = 100_000  # as synthforge.release
NGRAM = 13
_WORD = re.compile(r"\w+")


# --- the corpus ------------------------------------------------------------------------------------------------


def release_ranges(samples: int, versions: int) -> list[tuple[int, int]]:
    """[first, end) sample range of each version: sizes grow linearly, each drops 2% of the mean size at the front."""
    mean = samples / versions
    sizes = [round(mean * (0.55 + 0.9 * k / max(1, versions - 1))) for k in range(versions)]
    sizes[-1] += samples - sum(sizes)
    return [(round(0.02 * mean * k), round(0.02 * mean * k) + size) for k, size in enumerate(sizes)]


def _vocabulary(rng: np.random.Generator, n: int) -> np.ndarray:
    """n pseudo-words in frequency order: the short ones (1-2 syllables, the "the" and "of" of this language) first."""
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fi", "go", "ha", "ju", "pe", "zo"]
    words = {"".join(rng.choice(syllables, size=k)) for k in rng.choice([1, 2, 3, 4], size=n * 3, p=[0.01, 0.09, 0.4, 0.5])}
    return np.array(sorted(words, key=lambda w: (len(w), rng.random()))[:n])


def make_samples(n: int, first_release: np.ndarray, seed: int = SEED):
    """(the unique samples as an Arrow table of split-stage rows: content, sample_id, provenance; the customer
    message inside each prompt). `first_release[i]`: the release that first publishes sample i."""
    import pyarrow as pa

    from synthforge.provenance import PROVENANCE_TYPE

    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng, 20_000)
    instructions = [" ".join(rng.choice(vocab[:2000], size=20)) + "." for _ in range(TEMPLATES)]
    ids = np.array([f"{x:024x}" for x in rng.choice(1 << 62, size=n, replace=False)])
    paraphrase = rng.random(n) < 0.2
    paraphrase[:BATCH] = False  # a paraphrase needs an earlier template sample
    template = rng.integers(0, TEMPLATES, size=n)
    lengths = rng.integers(30, 51, size=n)
    zipf = 1 / np.arange(1, len(vocab) + 1)  # word frequencies as in natural text (Zipf's law, s = 1)
    words = vocab[rng.choice(len(vocab), size=int(lengths.sum()), p=zipf / zipf.sum())]
    messages = [" ".join(ws) for ws in np.split(words, np.cumsum(lengths)[:-1])]
    prompts = [f"{instructions[t]}\n\nCustomer message:\n{m}" for t, m in zip(template.tolist(), messages, strict=True)]
    amounts = rng.integers(100, 100_000, size=n)
    references = [f'{{"amount": "${a / 100:.2f}", "order_id": "OR-{i:06d}"}}' for i, a in enumerate(amounts.tolist())]
    # batches of 64 samples of one method, numbered within the generation run of the release that adds them
    method = np.where(paraphrase, "paraphrase", "template")
    batch = np.empty(n, dtype=object)
    for release in np.unique(first_release).tolist():
        for m in ("template", "paraphrase"):
            where = np.flatnonzero((method == m) & (first_release == release))
            batch[where] = [f"r{release:02d}-{m}-{k // BATCH:05d}" for k in range(len(where))]
    # a paraphrase's parent: an earlier template sample, usually a recent one
    template_rows, paraphrase_rows = np.flatnonzero(~paraphrase), np.flatnonzero(paraphrase)
    before = np.searchsorted(template_rows, paraphrase_rows)
    back = np.minimum(rng.exponential(2000, size=len(paraphrase_rows)).astype(np.int64), before - 1)
    parent = np.full(n, -1)
    parent[paraphrase_rows] = template_rows[before - 1 - back]
    split = rng.choice(["train", "validation", "test"], size=n, p=[0.8, 0.1, 0.1])
    label = np.array([f"intent_{t % 7}" for t in range(TEMPLATES)])[template]

    def strings(values) -> pa.Array:
        return pa.array(list(values), pa.string())

    def struct(type_: pa.StructType, **children) -> pa.StructArray:
        arrays = [children.get(f.name, pa.nulls(n, f.type)) for f in type_]
        return pa.StructArray.from_arrays(arrays, fields=list(type_))

    gen_type = PROVENANCE_TYPE.field("generation").type
    offsets = np.concatenate(([0], np.cumsum(paraphrase))).astype(np.int32)
    parent_ids = pa.ListArray.from_arrays(pa.array(offsets), strings(ids[parent[paraphrase]]))
    generation = struct(
        gen_type,
        method=strings(method),
        model=strings(np.where(paraphrase, "Qwen/Qwen2.5-7B-Instruct", "jinja2-template-engine")),
        model_revision=strings(np.where(paraphrase, "a09a35458c702241", "3.1.6")),
        prompt_template_id=strings(np.where(paraphrase, "paraphrase", np.char.add("template-", template.astype(str)))),
        prompt_version=strings(np.where(paraphrase, "1", (template % 3 + 1).astype(str))),
        seed=pa.array(np.full(n, SEED)),
        batch_id=strings(batch),
        parent_ids=parent_ids,
        created_at=strings(np.full(n, "2026-11-21T00:00:00+00:00")),
    )
    record = rng.integers(0, 5000, size=n)
    source = struct(
        PROVENANCE_TYPE.field("source").type,
        uri=strings(np.full(n, "sources/customer_requests.jsonl")),
        record_id=strings(np.char.add("rec-", record.astype(str))),
        row=pa.array(record),
    )
    check_type = PROVENANCE_TYPE.field("judge").type.field("checks").type.value_type
    scores = rng.integers(1, 6, size=n)
    checks = pa.StructArray.from_arrays(
        [
            strings(np.tile(["length", "llm_judge"], n)),
            strings(np.full(2 * n, "pass")),
            pa.array(np.stack([lengths.astype(float), scores.astype(float)], axis=1).ravel()),
            pa.nulls(2 * n, pa.string()),
            strings(
                np.stack([np.full(n, None), [f'{{"score": {s}, "rationale": "ok"}}' for s in scores.tolist()]], axis=1).ravel()
            ),
            pa.array(np.tile([None, True], n), pa.bool_()),
            strings(np.tile([None, "HuggingFaceTB/SmolLM2-1.7B-Instruct"], n)),
            pa.nulls(2 * n, pa.string()),
        ],
        fields=list(check_type),
    )
    judge = struct(
        PROVENANCE_TYPE.field("judge").type,
        verdict=strings(np.full(n, "pass")),
        checks=pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), checks),
    )
    dedup = struct(
        PROVENANCE_TYPE.field("dedup").type,
        cluster_id=strings(np.char.add("c-", ids)),
        representative_id=strings(ids),
        is_representative=pa.array(np.ones(n, dtype=bool)),
    )
    stage_type = PROVENANCE_TYPE.field("stages").type.value_type
    stage_names = ["generate", "judge", "dedup", "tag", "split"]
    stages = pa.StructArray.from_arrays(
        [strings(np.tile(stage_names, n)), strings(np.tile([f"{s}-fp" for s in stage_names], n))], fields=list(stage_type)
    )
    provenance = struct(
        PROVENANCE_TYPE,
        sample_id=strings(ids),
        synthforge_version=strings(np.full(n, "0.1.0")),
        source=source,
        generation=generation,
        judge=judge,
        dedup=dedup,
        tags=pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), strings(method)),
        difficulty=strings(rng.choice(["easy", "medium", "hard"], size=n)),
        split=strings(split),
        stages=pa.ListArray.from_arrays(pa.array(np.arange(0, 5 * n + 1, 5, dtype=np.int32)), stages),
    )
    return pa.table(
        {
            "sample_id": strings(ids),
            "prompt": strings(prompts),
            "reference": strings(references),
            "label": strings(label),
            "locale": strings(np.full(n, "en-US")),
            "provenance": provenance,
        }
    ), messages


def build(folder: Path, samples: int, versions: int) -> Path:
    """Write the version folders and the queries once per corpus (later runs reuse them); returns the corpus folder."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from synthforge.content_index import INDEX_FIELDS, INDEX_METADATA, index_columns, row_text, text_fields
    from synthforge.release import content_hash, manifest_schema

    ranges = release_ranges(samples, versions)
    settings = hashlib.sha256(repr(sorted(INDEX_METADATA.items())).encode()).hexdigest()[:12]  # a new index: a new corpus
    corpus = folder / f"{CORPUS}-n{samples}-v{versions}-seed{SEED}-index{settings}"
    if (corpus / "queries.json").exists():
        return corpus
    shutil.rmtree(corpus, ignore_errors=True)
    unique = ranges[-1][1]
    t0 = time.perf_counter()
    table, messages = make_samples(unique, np.searchsorted([end for _, end in ranges], np.arange(unique), side="right"))

    # The queries are made from samples every version holds. A held-out item (the n-gram query's source) also
    # leaked into 30 other prompts, and the exact query's prompt was generated again for 3 later samples.
    rng = np.random.default_rng(SEED + 1)
    exact, near, leaked = (ranges[-1][0] + 2 * BATCH + k for k in range(3))
    prompts = table.column("prompt").to_pylist()
    others = rng.choice(np.setdiff1d(np.arange(unique), [exact, near, leaked]), size=33, replace=False).tolist()
    for i in others[:30]:
        prompts[i] += f"\n\nFor reference: {messages[leaked]}"
    for i in others[30:]:
        prompts[i] = prompts[exact]
    table = table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(prompts, pa.string()))

    def edit(text: str, positions: list[int]) -> str:
        words = text.split(" ")
        for p in positions:
            words[p] = "zebra"
        return " ".join(words)

    near_words = len(prompts[near].split(" "))
    queries = {
        "batch": table.column("provenance")[exact].as_py()["generation"]["batch_id"],
        "exact": "  " + prompts[exact].upper().replace(" ", "  ") + "  ",  # case and spacing changed
        "minhash": edit(prompts[near], sorted(rng.choice(np.arange(5, near_words), size=3, replace=False).tolist())),
        "ngram": edit(messages[leaked], [1, 20, len(messages[leaked].split(" ")) - 1]),  # runs of 18+ words left
        "targets": {k: table.column("sample_id")[i].as_py() for k, i in (("exact", exact), ("minhash", near), ("ngram", leaked))},
    }

    rows = table.drop_columns(["provenance"]).to_pylist()
    index = index_columns([row_text(r, text_fields(table.schema)) for r in rows])
    split = pc.struct_field(table.column("provenance"), "split")
    manifest = pa.table(
        {
            "sample_id": table.column("sample_id"),
            "split": split,
            "content_hash": pa.array([content_hash(r) for r in rows], pa.string()),
            "label": table.column("label"),
            **{f.name: pa.array(index[f.name], f.type) for f in INDEX_FIELDS},
            "provenance": table.column("provenance"),
        },
        schema=manifest_schema(),
    )
    print(f"corpus: {unique:,} unique samples made and indexed in {time.perf_counter() - t0:.0f} s")
    for k, (first, end) in enumerate(ranges):
        version = corpus / f"v{k + 1}.0.0"
        (version / "provenance").mkdir(parents=True)
        (version / "data").mkdir()
        pq.write_table(manifest.slice(first, end - first), version / "provenance" / "manifest.parquet", compression="zstd")
        for name in ("train", "validation", "test"):
            part = table.slice(first, end - first).filter(pc.equal(split.slice(first, end - first), name))
            shards = max(1, -(-len(part) // SHARD_ROWS))
            for s in range(shards):
                path = version / "data" / f"{name}-{s:05d}-of-{shards:05d}.parquet"
                pq.write_table(part.slice(s * SHARD_ROWS, SHARD_ROWS), path, compression="zstd")
    (corpus / "queries.json").write_text(json.dumps(queries, indent=2) + "\n")
    rows_written = sum(end - first for first, end in ranges)
    print(f"corpus: {rows_written:,} manifest rows in {versions} versions written in {time.perf_counter() - t0:.0f} s")
    return corpus


def version_folders(corpus: Path) -> list[tuple[str, Path]]:
    return [(f"bench {p.name}", p) for p in sorted(corpus.glob("v*.0.0"), key=lambda p: int(p.name[1:].split(".")[0]))]


# --- the two systems (each lookup in a spawned child) ----------------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthforge_lookup(corpus: Path, lookup: str, query: str) -> set[tuple[str, str, str]]:
    from synthforge.trace import trace

    versions = version_folders(corpus)
    empty = corpus / "no-stages"
    if lookup == "batch":
        result = trace(empty, None, batch=query, versions=versions)
        samples = result.samples
    else:
        result = trace(empty, None, texts=[query], methods=[lookup], versions=versions)
        samples = [s for s in result.samples if s.relation.startswith("match")]
    return {(s.sample_id, *place.rsplit(" ", 1)) for s in samples for place in s.published}


def pandas_lookup(corpus: Path, lookup: str, query: str) -> set[tuple[str, str, str]]:
    return _pandas_batch(corpus, query) if lookup == "batch" else _pandas_text(corpus, lookup, query)


def _pandas_batch(corpus: Path, batch: str) -> set[tuple[str, str, str]]:
    import pandas as pd

    frames = []
    for label, folder in version_folders(corpus):
        manifest = folder / "provenance" / "manifest.parquet"
        df = pd.read_parquet(manifest, columns=["sample_id", "split", "provenance"], dtype_backend="pyarrow")
        generation = df["provenance"].struct.field("generation")
        frames.append(
            df[["sample_id", "split"]].assign(
                version=label, batch=generation.struct.field("batch_id"), parents=generation.struct.field("parent_ids")
            )
        )
    df = pd.concat(frames, ignore_index=True)
    ids = set(df.loc[df["batch"] == batch, "sample_id"])
    edges = df[["sample_id", "parents"]].explode("parents").dropna()
    while more := set(edges.loc[edges["parents"].isin(ids), "sample_id"]) - ids:  # descendants, generation by generation
        ids |= more
    rows = df[df["sample_id"].isin(ids)]
    return set(zip(rows["sample_id"], rows["version"], rows["split"], strict=True))


def _grams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def _pandas_text(corpus: Path, lookup: str, query: str) -> set[tuple[str, str, str]]:
    """Every text field of every row of every shard, folded as synthforge folds it and compared with the query."""
    import pandas as pd

    folded_query = " ".join(unicodedata.normalize("NFKC", query).casefold().split())
    query_words = _WORD.findall(folded_query)
    shingles, width = _grams(query_words, 3), min(NGRAM, len(query_words))
    ngrams = _grams(query_words, width)

    def similar(words: list[str]) -> bool:
        return bool(words) and len(_grams(words, 3) & shingles) / len(_grams(words, 3) | shingles) >= 0.5

    def shares_ngram(words: list[str]) -> bool:
        return len(words) >= width and not ngrams.isdisjoint(_grams(words, width))

    found = set()
    for label, folder in version_folders(corpus):
        for shard in sorted((folder / "data").glob("*.parquet")):
            df = pd.read_parquet(shard, columns=["sample_id", "prompt", "reference", "label", "locale"])
            hit = pd.Series(False, index=df.index)
            for field in ("prompt", "reference", "label", "locale"):
                folded = (
                    df[field].fillna("").str.normalize("NFKC").str.casefold().str.replace(r"\s+", " ", regex=True).str.strip()
                )
                if lookup == "exact":
                    hit |= folded == folded_query
                else:
                    hit |= folded.str.findall(r"\w+").map(similar if lookup == "minhash" else shares_ngram).astype(bool)
            found |= {(sid, label, shard.name.split("-")[0]) for sid in df.loc[hit, "sample_id"]}
    return found


def run_lookup(system: str, corpus: Path, lookup: str, query: str) -> dict:
    """Child entry point: one lookup by one system, timed, with its peak RSS over the RSS it started from."""
    # the libraries either system loads are imported first: a lookup is timed without its imports
    import duckdb  # noqa: F401
    import pandas  # noqa: F401

    import synthforge.text.decontam  # noqa: F401
    import synthforge.trace  # noqa: F401

    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS mark to the current RSS
    baseline = _peak_rss_mib()
    t0 = time.perf_counter()
    rows = (synthforge_lookup if system == "synthforge" else pandas_lookup)(corpus, lookup, query)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mib": _peak_rss_mib() - baseline, "rows": rows}


# --- the run -------------------------------------------------------------------------------------------------


LOOKUPS = {
    "batch": "batch + descendants",
    "exact": "text, exact",
    "minhash": "text, MinHash",
    "ngram": "text, 13-gram",
}


def render(results: dict[str, dict[str, dict]], rows: int, versions: int):
    from rich.table import Table

    from synthforge import content_index as ci

    table = Table(
        title=f"trace over {rows:,} manifest rows in {versions} versions",
        caption=(
            f"peak RSS over each lookup process's start; MinHash: {ci.NUM_PERM} perms, word {ci.SHINGLE}-grams, "
            f"{ci.BANDS} x {ci.ROWS} bands, Jaccard >= {ci.THRESHOLD}; n-gram: {ci.NGRAM} words"
        ),
    )
    table.add_column("lookup")
    for column in ("synthforge (s)", "pandas (s)", "faster", "synthforge MiB", "pandas MiB", "rows"):
        table.add_column(column, justify="right")
    table.add_column("same rows")
    for lookup, name in LOOKUPS.items():
        sf, pd_ = results[lookup]["synthforge"], results[lookup]["pandas"]
        more, fewer = len(sf["rows"] - pd_["rows"]), len(pd_["rows"] - sf["rows"])
        table.add_row(
            name, f"{sf['seconds']:.2f}", f"{pd_['seconds']:.2f}", f"{pd_['seconds'] / sf['seconds']:.1f}x",
            f"{sf['peak_mib']:.0f}", f"{pd_['peak_mib']:.0f}", f"{len(sf['rows']):,}",
            "yes" if not more and not fewer else f"no: synthforge has {more} more, {fewer} fewer",
        )  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000, help="manifest rows over all versions (default 1000000)")
    parser.add_argument("--versions", type=int, default=10, help="published versions (default 10)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/synthforge-bench-trace"), help="where the corpus is kept")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:  # a child builds the corpus, so this process stays small for the ones after it
        corpus = pool.apply(build, (args.cache, args.samples, args.versions))
    queries = json.loads((corpus / "queries.json").read_text())
    results: dict[str, dict[str, dict]] = {}
    for lookup in LOOKUPS:
        for system in ("pandas", "synthforge"):
            with ctx.Pool(1) as pool:
                results.setdefault(lookup, {})[system] = pool.apply(run_lookup, (system, corpus, lookup, queries[lookup]))
        target = queries["targets"].get(lookup)
        if target and not any(sid == target for sid, _, _ in results[lookup]["synthforge"]["rows"]):
            raise AssertionError(f"{lookup}: synthforge did not find the sample the query was made from")

    from rich.console import Console

    versions = version_folders(corpus)
    rows = sum(manifest_rows(folder) for _, folder in versions)
    Console(width=max(120, Console().width)).print(render(results, rows, len(versions)))
    if args.json:
        figures = lambda r: {"seconds": r["seconds"], "peak_mib": r["peak_mib"], "rows": len(r["rows"])}  # noqa: E731
        summary = {lookup: {system: figures(r) for system, r in by.items()} for lookup, by in results.items()}
        args.json.write_text(json.dumps({"manifest_rows": rows, "versions": len(versions), "results": summary}, indent=2) + "\n")


def manifest_rows(folder: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(folder / "provenance" / "manifest.parquet").metadata.num_rows


if __name__ == "__main__":
    main()
