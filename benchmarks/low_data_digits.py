"""Does synthetic data help a classifier trained on 20 real digits per class? An experiment, not a tuned result.

One project, one real set (scikit-learn digits, 20 training images per class; the held-out test split is 20% of
all digits), one reference classifier and one LoRA-adapted generator; then two synthetic sets with the same
generation budget (400 images before filtering):

  static    every real training image seeds 2 images, no VoG filter (Real-Fake style: uniform, no feedback)
  gda       GenDataAgent's way: the lowest-marginal-score fifth of the real images seed 10 images each (weaker
            classes get more), and VoG drops the lowest quarter of each class

Each goes through judge, dedup (also against the real images), tag and split like the default pipeline, and
`synthforge evaluate` trains the same small CNN under: real only; real + static; real + gda (real:synthetic
1:1, random mixing), over 5 seeds, scored on the real test images. Every classifier trains for 200 epochs,
enough for one on the 200 real images alone to converge; nothing else was chosen by looking at the outcome.

    .venv/bin/python benchmarks/low_data_digits.py [--workdir DIR] [--seeds 5] [--per-class 20]

Writes the table to benchmarks/results/low_data_digits.md (and .json, and the plots) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("generated", "judged", "deduped", "tagged", "split")
EPOCHS = 200  # for the reference classifier and every evaluated model: enough for the real-only one to converge

ARMS = {
    "static": {
        "seeds": {"fraction": 1.0, "images_per_seed": 2, "budget": "uniform"},
        "judge": {"checks": [{"name": "image_format", "channels": 1, "min_size": 8, "min_std": 8.0}]},
    },
    "gda": {
        "seeds": {"fraction": 0.2, "images_per_seed": 10, "budget": "accuracy"},
        "judge": None,  # the default pipeline's judge: image format, then VoG dropping the lowest 25% per class
    },
}


def _write_params(project: Path, name: str, params: dict) -> Path:
    path = project / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run(workdir: Path, seeds: int, per_class: int) -> dict:
    from synthforge.evaluate import run_evaluate, summary_markdown, verdict_sentences
    from synthforge.params import load_params
    from synthforge.project import init_project
    from synthforge.stages.dedup import run_dedup
    from synthforge.stages.generate_images import run_generate_images
    from synthforge.stages.judge import run_judge
    from synthforge.stages.prepare import run_adapt, run_classifier, run_real
    from synthforge.stages.seeds import run_seeds
    from synthforge.stages.split import run_split
    from synthforge.stages.tag import run_tag

    project = init_project(workdir / "low-data-digits")
    base = yaml.safe_load((project / "params.yaml").read_text())
    base["real"]["per_class"] = per_class
    # 200 images are 7 steps an epoch at batch 32: 200 epochs let the classifier converge (training loss ~1e-3).
    # At the default 30 epochs it stays at chance, and so would the marginal scores and VoG that depend on it.
    base["classifier"].update({"epochs": EPOCHS, "batch_size": 32})
    timings = {}
    with contextlib.chdir(project):
        shared = load_params(_write_params(project, "shared", base))
        start = time.perf_counter()
        run_real(shared, "data/real")
        run_classifier(shared, "data/real", "models/classifier")
        run_adapt(shared, "data/real", "models/generator")
        timings["real + classifier + adapt"] = time.perf_counter() - start
        for arm, changes in ARMS.items():
            params = json.loads(json.dumps(base))
            params["seeds"].update(changes["seeds"])
            if changes["judge"] is not None:
                params["judge"] = changes["judge"]
            p = load_params(_write_params(project, arm, params))
            d = Path(f"data-{arm}")
            start = time.perf_counter()
            run_seeds(p, "data/real", "models/classifier", d / "seeds")
            run_generate_images(p, d / "seeds", "data/real", "models/generator", d / "generated")
            run_judge(p, d / "generated", d / "judged")
            run_dedup(p, d / "judged", d / "deduped")
            run_tag(p, d / "deduped", d / "tagged")
            run_split(p, d / "tagged", d / "split")
            timings[f"{arm}: seeds..split"] = time.perf_counter() - start
        base["evaluate"] = {
            "seeds": seeds,
            "epochs": EPOCHS,
            "batch_size": 32,
            "settings": [
                {"name": "real only"},
                {"name": "real + static", "synthetic": "data-static/split", "ratio": 1.0},
                {"name": "real + gda", "synthetic": "data-gda/split", "ratio": 1.0},
            ],
        }
        p = load_params(_write_params(project, "evaluate", base))
        start = time.perf_counter()
        result = run_evaluate(p, "data/real", "models/classifier", "data/evaluation", project=project)
        timings["evaluate"] = time.perf_counter() - start
        # Samples left after each stage: how much of the budget each arm's filters kept.
        counts = {
            arm: {stage: json.loads((Path(f"data-{arm}") / stage / "stats.json").read_text())["kept"] for stage in STAGES}
            for arm in ARMS
        }
        RESULTS.mkdir(exist_ok=True)
        for png in ("metrics.png", "per_class_accuracy.png"):
            shutil.copy(Path("data/evaluation") / png, RESULTS / f"low_data_digits_{png}")
    summary = {
        "per_class": per_class,
        "real": result["real"],
        "generated": counts,
        "sources": {x["name"]: x["source"] for x in result["settings"] if x["source"]},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "comparison": result["comparison"],
        "verdicts": verdict_sentences(result),
    }
    (RESULTS / "low_data_digits.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = "\n".join(
        [
            f"# Low-data digits: {per_class} real images per class, {seeds} seeds",
            "",
            f"Real: {result['real']['train']} training and {result['real']['test']} test images. "
            "Synthetic samples kept after each stage (the evaluation trains on the split stage's train split):",
            "",
            "| arm | " + " | ".join(STAGES) + " |",
            "|---|" + "---|" * len(STAGES),
            *(f"| {arm} | " + " | ".join(str(n) for n in c.values()) + " |" for arm, c in counts.items()),
            "",
            summary_markdown(result),
            *(f"- {line}" for line in verdict_sentences(result)),
            "",
            "![metrics](low_data_digits_metrics.png)",
            "",
            "![per-class accuracy](low_data_digits_per_class_accuracy.png)",
            "",
        ]
    )
    (RESULTS / "low_data_digits.md").write_text(text)
    print(text)
    print(json.dumps(summary["timings_s"], indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the project is built (default: a temp dir)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=20)
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args.workdir, args.seeds, args.per_class)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args.seeds, args.per_class)


if __name__ == "__main__":
    main()
