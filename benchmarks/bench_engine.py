"""Throughput per stage, local engine vs Ray Data engine, at growing sizes of a text set.

    python benchmarks/bench_engine.py                       # 10k and 100k, both engines
    python benchmarks/bench_engine.py --sizes 1000000 --engines local

The input is a generated stage directory of short texts (support questions made of random words) with 5% exact
and 5% near duplicates, written in streaming batches. Each (size, engine) runs in its own process, so peak memory
(the driver's max RSS; on Ray the workers' memory comes on top) is that run's alone. The stages: judge (rules),
dedup (exact + MinHash LSH), tag, split, with the settings of the text-eval pipeline where they apply.
Figures go to benchmarks/results/engine_scale.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stage_runs import STAGES, peak_rss_mb, run_stages

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PARAMS = {
    "seed": 7,
    "judge": {
        "checks": [
            {"name": "length", "field": "prompt", "min_chars": 20, "max_chars": 4000},
            {"name": "banned_patterns", "fields": ["prompt"], "patterns": ["<<missing:", "\\bTODO\\b"]},
        ]
    },
    "dedup": {"fields": ["prompt"], "exact": True, "near": {"method": "minhash", "threshold": 0.8, "num_perm": 128, "ngram": 3}},
    "tag": {"field": "prompt", "hard_min_words": 40, "medium_min_words": 25},
    "split": {"ratios": {"train": 0.8, "validation": 0.1, "test": 0.1}, "group_by": "source", "stratify_by": "difficulty"},
}


def make_input(n: int, out: Path, batch: int = 20_000) -> None:
    """n texts into a stage directory, batch by batch (never all in memory)."""
    import numpy as np
    import pyarrow as pa

    from synthforge.provenance import make_sample_id, new_record
    from synthforge.stagedir import StageWriter, stage_fingerprint

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(20_000)]
    schema = pa.schema([("prompt", pa.string())])
    fingerprint = stage_fingerprint("generate", {"bench": n}, {})
    made: list[str] = []  # a reservoir of earlier texts to copy or edit
    with StageWriter(out, "generate", schema, fingerprint) as writer:
        for start in range(0, n, batch):
            rows = []
            for i in range(start, min(n, start + batch)):
                roll = rng.random()
                if made and roll < 0.05:
                    text = made[rng.integers(len(made))]  # an exact copy
                elif made and roll < 0.10:
                    words = made[rng.integers(len(made))].split()
                    words[rng.integers(len(words))] = vocab[rng.integers(len(vocab))]  # a one-word edit
                    text = " ".join(words)
                else:
                    text = "how do I " + " ".join(vocab[j] for j in rng.integers(0, len(vocab), rng.integers(12, 50)))
                if len(made) < 50_000:
                    made.append(text)
                sid = make_sample_id({"bench": i}, {"prompt": text})
                prov = new_record(
                    sample_id=sid,
                    run_id="bench",
                    source={"uri": "bench://texts", "record_id": str(i // 3), "row": i},
                    method="template",
                    model="bench",
                    model_revision=None,
                    batch_id=f"bench-{start // batch:05d}",
                    seed=0,
                    params={},
                    prompt_template_id="bench",
                    prompt_version="1",
                    prompt_hash="0" * 64,
                    parent_ids=[],
                    raw_output=None,
                    parsed=None,
                )
                rows.append({"sample_id": sid, "prompt": text, "provenance": prov})
            writer.write(rows)


def run_one(size: int, engine: str, work: Path) -> dict:
    """One (size, engine) run in this process: seconds and rows/s per stage, peak RSS."""
    params = {**PARAMS, "engine": {"name": engine, "batch_rows": 8192, "ray": {"num_cpus": os.cpu_count()}}}
    src = work / "generated"
    t0 = time.perf_counter()
    make_input(size, src)
    figures = {"size": size, "engine": engine, "input_s": round(time.perf_counter() - t0, 2)}
    os.chdir(work)
    figures |= run_stages(params, src, work)
    figures["peak_rss_mb"] = peak_rss_mb()
    return figures


def table(results: list[dict]) -> str:
    head = "| size | engine | " + " | ".join(f"{s} rows/s" for s in STAGES) + " | total s | driver peak RSS |"
    lines = [head, "|" + "---|" * (len(STAGES) + 4)]
    for r in results:
        total = sum(v["seconds"] for v in r["stages"].values())
        cells = " | ".join(f"{r['stages'][s]['rows_per_s']:,}" for s in STAGES)
        lines.append(f"| {r['size']:,} | {r['engine']} | {cells} | {total:.1f} | {r['peak_rss_mb']:,} MB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "ENGINE"), help=argparse.SUPPRESS)  # a child run
    args = ap.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(run_one(int(args.one[0]), args.one[1], Path(work))))
        return
    results = []
    for size in args.sizes:
        for engine in args.engines:
            env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
            done = subprocess.run(
                [sys.executable, __file__, "--one", str(size), engine], capture_output=True, text=True, env=env, check=False
            )
            if done.returncode:
                sys.exit(f"{size} on {engine} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    previous = json.loads((RESULTS / "engine_scale.json").read_text()) if (RESULTS / "engine_scale.json").exists() else []
    keep = [r for r in previous if (r["size"], r["engine"]) not in {(x["size"], x["engine"]) for x in results}]
    merged = sorted(keep + results, key=lambda r: (r["size"], r["engine"]))
    (RESULTS / "engine_scale.json").write_text(json.dumps(merged, indent=2) + "\n")
    md = f"# Engine throughput (rows/s per stage), {os.cpu_count()} CPUs\n\n{table(merged)}\n"
    (RESULTS / "engine_scale.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
