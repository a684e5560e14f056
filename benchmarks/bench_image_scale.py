"""The image pipeline after generation at growing sizes: rows/s per stage and peak memory, local engine (and Ray).

    python benchmarks/bench_image_scale.py                          # 10k and 100k images, local engine
    python benchmarks/bench_image_scale.py --sizes 2000 --engines local ray
    python benchmarks/bench_image_scale.py --torch-threads 1        # on a busy machine (see below)

Setup, once per invocation: a project from `synthforge init` (the default pipeline: scikit-learn's digits), its
real stage, and its reference classifier trained for 12 epochs instead of 30 (three checkpoints either way, so
VoG and tagging cost the same; it saves about a minute). The input of each size is a finished generate stage
directory written batch by batch, with the columns and provenance fields of `generate`: real training digits,
each shifted by up to a pixel and given Gaussian noise (so most are new to phash), plus 3% exact copies of an
earlier image. The stages, with the project's settings: judge (image_format + VoG over the 3 checkpoints, 25%
dropped per class), dedup (phash, also against the real images), tag (the classifier), split (grouped by parent).

Each size's input is made in its own process, and each (size, engine) run of the four stages in another, so the
peak RSS (the process's max RSS; on Ray the workers' memory comes on top) is the stages' alone. Figures go to
benchmarks/results/image_scale.{md,json}; a run replaces the rows of its (size, engine, torch threads) and keeps
the rest.

The VoG and tagging models are tiny: on a machine whose cores are busy, torch's threads spin-wait for each other
and `--torch-threads 1` made judge several times faster on 2 shared cores. Each run records the load average.
"""

from __future__ import annotations

import argparse
import contextlib
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
CLASSIFIER_EPOCHS = 12
COPY_FRACTION = 0.03  # exact copies of an earlier image
NOISE_STD = 24.0  # pixel noise (0-255) on top of the shift; at 16, phash near duplicates grow quickly with size
METHOD = "bench-perturbed-real"


def setup(root: Path) -> None:
    """The digits project, its real data and its reference classifier."""
    from synthforge.params import load_params
    from synthforge.project import init_project
    from synthforge.stages.prepare import run_classifier, run_real

    init_project(root)
    with contextlib.chdir(root):
        params = load_params("params.yaml")
        params["classifier"]["epochs"] = CLASSIFIER_EPOCHS
        run_real(params, "data/real")
        run_classifier(params, "data/real", "models/classifier")


def make_input(n: int, real: Path, out: Path, batch: int = 5_000) -> None:
    """n images into a generate stage directory, batch by batch (never all in memory)."""
    import numpy as np

    from synthforge.provenance import make_sample_id, new_record
    from synthforge.stagedir import StageWriter, stage_fingerprint
    from synthforge.vision.images import IMAGE_CONTENT_SCHEMA, decode_image, encode_png
    from synthforge.vision.real import read_real, real_info

    rng = np.random.default_rng(0)
    seeds = read_real(real, "train").to_pylist()  # the ~1.4k training digits
    pixels = [np.asarray(decode_image(s["image"]), dtype=np.float64) for s in seeds]
    source_uri = real_info(real)["source_id"]
    fingerprint = stage_fingerprint("generate", {"bench": n, "noise_std": NOISE_STD, "copies": COPY_FRACTION}, {})
    with StageWriter(out, "generate", IMAGE_CONTENT_SCHEMA, fingerprint) as writer:
        previous: list[tuple[int, bytes]] = []  # the last batch's (seed, image): what copies copy
        for start in range(0, n, batch):
            made, rows = [], []
            for i in range(start, min(n, start + batch)):
                if previous and rng.random() < COPY_FRACTION:
                    k, png = previous[rng.integers(len(previous))]
                    shift = None
                else:
                    k = int(rng.integers(len(seeds)))
                    shift = [int(d) for d in rng.integers(-1, 2, 2)]
                    moved = np.roll(pixels[k], shift, axis=(0, 1)) + rng.normal(0.0, NOISE_STD, pixels[k].shape)
                    png = encode_png(np.clip(moved, 0, 255).round().astype(np.uint8))
                made.append((k, png))
                s = seeds[k]
                origin = {"method": METHOD, "real_id": s["real_id"], "variant": i}
                sid = make_sample_id(origin, {"image_seed": i, "label": s["label"], "caption": s["caption"]})
                prov = new_record(
                    sample_id=sid,
                    run_id="bench",
                    source={"uri": source_uri, "record_id": s["real_id"], "row": s["source_row"]},
                    method=METHOD,
                    model="bench",
                    model_revision=None,
                    adapter_hash=None,
                    batch_id=f"bench-{start // batch:05d}",
                    seed=i,
                    params={"shift": shift, "noise_std": NOISE_STD if shift else None, "copy": shift is None},
                    prompt_template_id=None,
                    prompt_version=None,
                    prompt_hash=None,
                    parent_ids=[s["real_id"]],
                    caption={"raw": s["caption"], "perturbed": None, "model": None, "parsed": None},
                    seed_marginal_score=None,
                )
                prov["tags"] = [f"label:{s['label_name']}"]
                rows.append(
                    {
                        "sample_id": sid,
                        "image": png,
                        "label": s["label"],
                        "label_name": s["label_name"],
                        "caption": s["caption"],
                        "provenance": prov,
                    }
                )
            writer.write(rows)
            previous = made


def run_one(engine: str, project: Path, src: Path, work: Path) -> dict:
    """The four stages on one engine, in this process: seconds, rows/s, kept rows and peak RSS after each."""
    import torch

    from synthforge.params import load_params

    os.chdir(project)  # the params name the classifier and the real data relative to the project
    params = load_params("params.yaml")
    params["engine"] = {"name": engine, "batch_rows": 4096, "ray": {"num_cpus": os.cpu_count()}}
    figures = {
        "engine": engine,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "start_rss_mb": peak_rss_mb(),  # the libraries imported; each stage loads its models
    }
    figures |= run_stages(params, src, work)
    figures["peak_rss_mb"] = peak_rss_mb()
    return figures


def table(results: list[dict]) -> str:
    head = "| size | engine | torch threads | " + " | ".join(f"{s} rows/s" for s in STAGES) + " | total s | peak RSS |"
    lines = [head, "|" + "---|" * (len(STAGES) + 5)]
    for r in results:
        cells = " | ".join(f"{r['stages'][s]['rows_per_s']:,}" for s in STAGES)
        total = f"{stage_seconds(r):.1f}"
        lines.append(f"| {r['size']:,} | {r['engine']} | {r['torch_threads']} | {cells} | {total} | {r['peak_rss_mb']:,} MB |")
    return "\n".join(lines)


def run_key(run: dict) -> tuple[int, str, int]:
    return run["size"], run["engine"], run["torch_threads"]


def stage_seconds(run: dict) -> float:
    return sum(v["seconds"] for v in run["stages"].values())


def added_mb(run: dict) -> int:
    """What the stages added to the process's RSS with its libraries imported."""
    return run["peak_rss_mb"] - run["start_rss_mb"]


def findings(results: list[dict]) -> str:
    """What the figures say, per engine and torch thread count, between the smallest and the largest size."""
    parts = []
    for engine, threads in sorted({(r["engine"], r["torch_threads"]) for r in results}):
        runs = sorted((r for r in results if (r["engine"], r["torch_threads"]) == (engine, threads)), key=lambda r: r["size"])
        small, large = runs[0], runs[-1]
        entered = {s: large["stages"][s]["entered"] for s in STAGES}
        if added_mb(large):
            peak_stage = next(s for s in STAGES if large["stages"][s]["peak_rss_mb"] == large["peak_rss_mb"])
            where = f"{added_mb(large):,} MB more, reached during {peak_stage}"
        else:
            where = "no stage went above it"
        on = f"On {engine} with {threads} torch thread{'s' if threads > 1 else ''}"
        text = (
            f"{on}, {large['size']:,} images entered judge, {entered['dedup']:,} dedup, {entered['tag']:,} tag "
            f"and {entered['split']:,} split; the process held {large['start_rss_mb']:,} MB with its libraries imported, "
            f"before any stage, and peaked at {large['peak_rss_mb']:,} MB ({where})."
        )
        if large is not small:
            seconds = stage_seconds(small), stage_seconds(large)
            speeds = ", ".join(
                f"{s} {small['stages'][s]['rows_per_s']:,} -> {large['stages'][s]['rows_per_s']:,}" for s in STAGES
            )
            text += (
                f" From {small['size']:,} to {large['size']:,} images ({large['size'] / small['size']:g}x), peak RSS went "
                f"from {small['peak_rss_mb']:,} to {large['peak_rss_mb']:,} MB "
                f"({large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x; above the libraries, {added_mb(small):,} to "
                f"{added_mb(large):,} MB), and the stages' time from {seconds[0]:.1f} to {seconds[1]:.1f} s "
                f"({seconds[1] / seconds[0]:.1f}x). Rows/s per stage: {speeds}."
            )
        parts.append(text)
    parts.append(
        "Every stage streams record batches of 4,096 rows; what a process keeps for the whole set is the per-sample "
        "state of the global steps: sample ids (each stage's writer), VoG scores per class, 64-bit phashes, split groups."
    )
    return " ".join(parts)


def child(args: list[str]) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--engines", nargs="+", default=["local"], choices=["local", "ray"])
    ap.add_argument("--torch-threads", type=int, help="torch's intra-op threads in every run (default: torch's own)")
    # The child runs: set up the project; make one size's input; run the stages on one engine.
    ap.add_argument("--setup", metavar="PROJECT", help=argparse.SUPPRESS)
    ap.add_argument("--make-input", nargs=3, metavar=("SIZE", "PROJECT", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=3, metavar=("ENGINE", "PROJECT", "INPUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.setup or args.one:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
    if args.setup:
        t0 = time.perf_counter()
        setup(Path(args.setup))
        print(json.dumps({"setup_s": round(time.perf_counter() - t0, 2)}))
    elif args.make_input:
        size, project, out = args.make_input
        t0 = time.perf_counter()
        make_input(int(size), Path(project) / "data" / "real", Path(out))
        print(json.dumps({"input_s": round(time.perf_counter() - t0, 2), "input_peak_rss_mb": peak_rss_mb()}))
    elif args.one:
        engine, project, src = args.one
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(run_one(engine, Path(project), Path(src), Path(work))))
    else:
        run_all(args.sizes, args.engines, ["--torch-threads", str(args.torch_threads)] if args.torch_threads else [])


def run_all(sizes: list[int], engines: list[str], options: list[str]) -> None:
    """Every (size, engine) run in a child process, the figures merged into the results files.

    This process imports nothing heavy: a child's max RSS starts from its parent's RSS at the fork."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "proj"
        print(f"setup (real data, classifier): {child(['--setup', str(project), *options])['setup_s']} s", flush=True)
        for size in sizes:
            src = Path(tmp) / f"generated-{size}"
            made = child(["--make-input", str(size), str(project), str(src)])
            print(f"{size:,} images made in {made['input_s']} s", flush=True)
            for engine in engines:
                results.append({"size": size, **made, **child(["--one", engine, str(project), str(src), *options])})
                print(table(results[-1:]).splitlines()[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    file = RESULTS / "image_scale.json"
    previous = json.loads(file.read_text()) if file.exists() else []
    keep = [r for r in previous if run_key(r) not in {run_key(x) for x in results}]
    merged = sorted(keep + results, key=run_key)
    file.write_text(json.dumps(merged, indent=2) + "\n")
    loads = [r["load_avg_1m"] for r in merged]
    md = (
        f"# Image pipeline after generation: rows/s per stage and peak RSS, {os.cpu_count()} CPUs\n\n"
        f"`python benchmarks/bench_image_scale.py`: digits perturbed from the real training set (3% exact copies), "
        f"judge (image_format + VoG over 3 checkpoints), dedup (phash, also against the real images), tag (classifier), "
        f"split; record batches of 4,096 rows. Load average (1 min) at the start of the runs: {min(loads):.1f} to "
        f"{max(loads):.1f}.\n\n{table(merged)}\n\n{findings(merged)}\n"
    )
    (RESULTS / "image_scale.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
