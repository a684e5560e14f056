"""evaluate: does the synthetic data help? Train the same classifier under named settings over several seeds and
compare every metric with a real-only baseline.

A setting trains on the real training images, a synthetic source, or both mixed by `synthforge.torch` at a ratio
and strategy. Every setting sees the same seeds, and seed i starts every setting from the same weights, so the
settings are compared pairwise by seed. All are scored on the held-out REAL test split: overall and per difficulty
level (each real test image gets the tag stage's difficulty from the reference classifier). Augmentation does not
always help, and can help one metric while hurting another, so the verdict is per metric: helps / no measurable
effect / hurts, from a confidence interval on the paired difference.

    out/metrics.json          per setting: each metric's mean over seeds and the verdict against the baseline (DVC metrics)
    out/evaluation.json       everything: options, what each synthetic source was, per-seed results, summaries, verdicts
    out/summary.md            the verdict table as markdown (the dataset card embeds it)
    out/per_class_accuracy.png, out/metrics.png
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from synthforge.errors import BadInput
from synthforge.params import parse_options
from synthforge.stagedir import atomic_dir

if TYPE_CHECKING:
    import torch

REAL_ONLY = "real only"


@dataclass
class SettingOptions:
    """One training setting: real data, a synthetic source, or both mixed at `ratio` (real:synthetic = 1:ratio)."""

    name: str = ""  # set from the entry's `name` (parse_options keeps `name` for the method it names)
    real: bool = True
    # A split stage folder (data/split), a published version NAME@VERSION, or hf://ORG/NAME@VERSION.
    synthetic: str | None = None
    ratio: float = 1.0
    strategy: str = "random"  # random | class_balanced | weighted | curriculum (synthforge.torch)
    weight_by: str | None = None
    weights: dict | None = None
    curriculum: str = "easy_to_hard"
    synthetic_after: int = 0


@dataclass
class EvaluateOptions:
    settings: list = field(default_factory=lambda: [{"name": REAL_ONLY}])
    baseline: str = REAL_ONLY
    seeds: int = 3
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    width: int = 32
    split: str = "train"  # the synthetic source's split that is trained on (never its test split)
    confidence: float = 0.95  # of the paired interval behind each verdict
    min_effect: float = 0.0  # differences smaller than this (in metric units) count as no effect
    workers: int = 0  # DataLoader workers


def parse_evaluate_options(params: dict[str, Any]) -> tuple[EvaluateOptions, list[SettingOptions]]:
    params_file = params.get("__file__", "params.yaml")
    o = parse_options(EvaluateOptions, params.get("evaluate") or {}, "evaluate", params_file)
    where = f"{params_file}: evaluate"
    if o.seeds < 1 or o.epochs < 1:
        raise BadInput(f"{where}: seeds and epochs must be at least 1, got seeds={o.seeds}, epochs={o.epochs}")
    if not 0 < o.confidence < 1:
        raise BadInput(f"{where}.confidence: must be in (0, 1), got {o.confidence}")
    settings = []
    for i, raw in enumerate(o.settings):
        if not isinstance(raw, dict) or not raw.get("name"):
            raise BadInput(f"{where}.settings[{i}]: each setting needs a name, got {raw!r}")
        s = parse_options(SettingOptions, raw, f"evaluate.settings[{i}]", params_file)
        s.name = str(raw["name"])
        if not s.real and not s.synthetic:
            raise BadInput(f"{where}.settings[{i}] ({s.name}): trains on nothing (real: false and no synthetic)")
        if s.ratio < 0:
            raise BadInput(f"{where}.settings[{i}] ({s.name}).ratio: must be >= 0, got {s.ratio}")
        settings.append(s)
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise BadInput(f"{where}.settings: names must be unique, got {names}")
    if o.baseline not in names:
        raise BadInput(f"{where}.baseline: {o.baseline!r} is not one of the settings {names}")
    return o, settings


@dataclass
class SyntheticSource:
    """A synthetic training split, wherever it lives, with what identifies it."""

    spec: str
    rows: Any  # a datasets.Dataset (published version) or a list of rows (stage folder)
    images: list
    labels: list[int]
    identity: dict[str, Any]  # stage fingerprint, or version and content fingerprint


def read_synthetic(spec: str, split: str, registry: str | Path | None, project: Path) -> SyntheticSource:
    """The `split` split of a split-stage folder, or of a published version (NAME@VERSION, hf://ORG/NAME@VERSION)."""
    path = project / spec
    if (path / "stage.json").exists():
        from synthforge.stagedir import StageInput

        stage = StageInput.open(path)
        rows = [r for batch in stage.iter_rows() for r in batch if r["provenance"].get("split") == split]
        if not rows:
            raise BadInput(f"{path}: no samples in split {split!r} (is this the split stage's output?)")
        images, labels = [r["image"] for r in rows], [r["label"] for r in rows]
        return SyntheticSource(spec, rows, images, labels, {"stage": stage.stage, "fingerprint": stage.fingerprint})
    name, sep, version = spec.rpartition("@")
    if not sep or not name:
        raise BadInput(f"evaluate: synthetic source {spec!r} is neither a stage folder nor NAME@VERSION")
    from synthforge.versions import load

    dataset = load(name, version, registry)
    if split not in dataset:
        raise BadInput(f"{spec}: no split {split!r} (has {', '.join(dataset)})")
    ds = dataset[split]
    image_column = next((c for c, f in ds.features.items() if type(f).__name__ == "Image"), None)
    if image_column is None:
        raise BadInput(f"{spec}: no image column to train on")
    from datasets import Image

    raw = ds.cast_column(image_column, Image(decode=False))  # PNG bytes; workers decode them
    return SyntheticSource(
        spec,
        ds,
        [im["bytes"] for im in raw[image_column]],
        list(ds["label"]),
        {"version": f"{name}@{version}", "samples": len(ds)},
    )


def difficulty_tagger(params: dict[str, Any], classifier: Path):
    """The tag stage's image tagger over the reference classifier, with the thresholds of params `tag`."""
    from synthforge.stages.tag import ImageTagStage

    return ImageTagStage({**(params.get("tag") or {}), "classifier": str(classifier)}, params.get("__file__", "params.yaml"))


def _mixed_sampler(setting: SettingOptions, o: EvaluateOptions, real_labels, info, seed: int, params_file: str):
    """The setting's synthforge.torch sampler, given only the options its strategy reads."""
    from synthforge.torch import MixedSampler

    options: dict[str, Any] = {"weight_by": setting.weight_by, "weights": setting.weights}
    if setting.strategy == "curriculum":
        options["curriculum"] = setting.curriculum
        if setting.curriculum == "easy_to_hard":
            options["epochs"] = o.epochs
    if setting.synthetic_after:
        options["synthetic_after"] = setting.synthetic_after
    try:
        return MixedSampler(real_labels, info, setting.ratio, setting.strategy, seed=seed, **options)
    except BadInput as exc:
        raise BadInput(f"{params_file}: evaluate setting {setting.name!r}: {exc}") from None


def _train_one(setting: SettingOptions, o: EvaluateOptions, real, synthetic, sampler, shape, n_classes, seed) -> torch.nn.Module:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from synthforge.torch import ImageTable, MixedDataset
    from synthforge.vision.classifier import ClassifierOptions, build_model, fit

    channels, size = shape
    if sampler is not None:
        dataset = MixedDataset(real, ImageTable(synthetic.images, synthetic.labels, channels, size))
    else:
        dataset = real if setting.real else ImageTable(synthetic.images, synthetic.labels, channels, size)
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=o.batch_size, sampler=sampler, num_workers=o.workers)

    def batches(epoch: int):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch - 1)
        return iter(loader)

    torch.manual_seed(seed)  # seed i: the same initial weights in every setting, so settings pair by seed
    model = build_model(channels, n_classes, o.width)
    options = ClassifierOptions(epochs=o.epochs, batch_size=o.batch_size, lr=o.lr, width=o.width)
    fit(model, batches, options, desc=f"evaluate: {setting.name} (seed {seed})")
    return model


def run_evaluate(
    params: dict[str, Any],
    real: str | Path,
    classifier: str | Path,
    out: str | Path,
    registry: str | Path | None = None,
    project: Path = Path("."),
) -> dict[str, Any]:
    import torch

    from synthforge.metrics import compare, metrics_by_group
    from synthforge.plots import DIFFICULTY_ORDER
    from synthforge.torch import ImageTable, SyntheticInfo
    from synthforge.vision.images import to_tensor
    from synthforge.vision.real import read_real, real_info

    o, settings = parse_evaluate_options(params)
    real, classifier, out = Path(real), Path(classifier), Path(out)
    info = real_info(real)
    class_names = info["class_names"]
    tagger = difficulty_tagger(params, classifier)  # each real test image gets the difficulty the tag stage would give
    reference = tagger.classifier
    if reference.class_names != class_names:
        raise BadInput(f"{classifier}: trained on classes {reference.class_names}, but {real} has {class_names}")
    shape = (reference.channels, reference.image_size)
    train, test = read_real(real, "train"), read_real(real, "test")
    if not test.num_rows:
        raise BadInput(f"{real}: no real test images to evaluate on (real.test_fraction is 0)")
    real_train = ImageTable(train.column("image").to_pylist(), train.column("label").to_pylist(), *shape)
    test_images = test.column("image").to_pylist()
    y_test = np.asarray(test.column("label").to_pylist(), dtype=np.int64)
    x_test = to_tensor(test_images, *shape)
    difficulty = tagger.levels(reference.probabilities(test_images), y_test)

    sources: dict[str, SyntheticSource] = {}
    infos: dict[str, SyntheticInfo] = {}
    for s in settings:
        if s.synthetic and s.synthetic not in sources:
            sources[s.synthetic] = read_synthetic(s.synthetic, o.split, registry, project)
            _check_labels(sources[s.synthetic], len(class_names))
            infos[s.synthetic] = SyntheticInfo.from_rows(sources[s.synthetic].rows)

    seeds = [int(params["seed"]) + i for i in range(o.seeds)]
    params_file = params.get("__file__", "params.yaml")

    def sampler(s: SettingOptions, seed: int):
        mixed = s.real and s.synthetic
        return _mixed_sampler(s, o, real_train.labels, infos[s.synthetic], seed, params_file) if mixed else None

    for s in settings:  # a bad sampler setting fails now, not after the settings before it have trained
        sampler(s, seeds[0])
    runs: dict[str, list[dict]] = {s.name: [] for s in settings}
    for s in settings:
        for seed in seeds:
            model = _train_one(s, o, real_train, sources.get(s.synthetic), sampler(s, seed), shape, len(class_names), seed)
            with torch.no_grad():
                probs = torch.softmax(model(x_test), dim=1).numpy()
            runs[s.name].append(metrics_by_group(probs, y_test, difficulty, class_names))

    comparison = compare(runs, o.baseline, confidence=o.confidence, min_effect=o.min_effect)
    result = {
        "baseline": o.baseline,
        "seeds": seeds,
        "options": {k: v for k, v in dataclasses.asdict(o).items() if k != "settings"},
        "settings": [
            {**dataclasses.asdict(s), "source": sources[s.synthetic].identity if s.synthetic else None} for s in settings
        ],
        "real": {"digest": info["digest"], "train": train.num_rows, "test": test.num_rows},
        "test_difficulty": {level: difficulty.count(level) for level in DIFFICULTY_ORDER if level in difficulty},
        "runs": runs,
        "comparison": comparison,
    }
    _write(out, result, class_names)
    return result


def _check_labels(source: SyntheticSource, n_classes: int) -> None:
    bad = next((i for i, y in enumerate(source.labels) if not 0 <= int(y) < n_classes), None)
    if bad is not None:
        raise BadInput(f"{source.spec}: sample {bad} has label {source.labels[bad]}, not one of the {n_classes} real classes")


def dvc_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """Per setting: each metric's mean over seeds, and the verdict and delta against the baseline."""
    from synthforge.metrics import METRICS

    out = {}
    for name, summary in result["comparison"]["settings"].items():
        entry = {m: summary["overall"][m]["mean"] for m in METRICS}
        for m, v in (summary.get("verdicts") or {}).items():
            entry[f"{m}_delta"] = v["delta"]
            entry[f"{m}_verdict"] = v["verdict"]
        out[name] = entry
    return out


def _cell(summary: dict[str, Any], verdict: dict[str, Any] | None) -> str:
    """mean ± std over seeds, and against the baseline the mean paired difference and its verdict."""
    if summary["mean"] is None:
        return "n/a"
    text = f"{summary['mean']:.3f}" + (f" ± {summary['std']:.3f}" if summary["std"] is not None else "")
    if verdict is not None and verdict["delta"] is not None:
        text += f" ({verdict['delta']:+.3f}, {verdict['verdict']})"
    return text


def summary_markdown(result: dict[str, Any]) -> str:
    """The verdict table: each setting's mean ± std per metric, and against the baseline the delta and verdict;
    then top-1 per difficulty level of the real test images, where an overall number can hide a change."""
    from synthforge.metrics import METRICS

    comparison = result["comparison"]
    settings = comparison["settings"]
    levels = list(result["test_difficulty"])
    lines = [
        f"Classifiers trained under each setting over {len(result['seeds'])} seeds, scored on {result['real']['test']} "
        f"held-out real test images; the verdict compares each setting with **{comparison['baseline']}**, paired by "
        f"seed ({result['options']['confidence']:.0%} interval on the mean difference).",
        "",
        "| setting | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
        *(
            f"| {name} | " + " | ".join(_cell(s["overall"][m], (s.get("verdicts") or {}).get(m)) for m in METRICS) + " |"
            for name, s in settings.items()
        ),
        "",
        "Top-1 by difficulty of the real test image (the reference classifier's marginal score, as the tag stage tags samples):",
        "",
        "| setting | " + " | ".join(f"{lv} ({result['test_difficulty'][lv]})" for lv in levels) + " |",
        "|---|" + "---|" * len(levels),
        *(
            f"| {name} | "
            + " | ".join(
                _cell(s["by_difficulty"][lv]["top1"], ((s.get("verdicts_by_difficulty") or {}).get(lv) or {}).get("top1"))
                for lv in levels
            )
            + " |"
            for name, s in settings.items()
        ),
    ]
    return "\n".join(lines) + "\n"


def verdict_sentences(result: dict[str, Any]) -> list[str]:
    """One plain sentence per non-baseline setting: which metrics it helps, hurts, or leaves unchanged."""
    out = []
    for name, summary in result["comparison"]["settings"].items():
        verdicts = summary.get("verdicts")
        if not verdicts:
            continue
        by_kind: dict[str, list[str]] = {}
        for metric, v in verdicts.items():
            delta = "" if v["delta"] is None else f" ({v['delta']:+.3f})"
            by_kind.setdefault(v["verdict"], []).append(f"{metric}{delta}")
        parts = [f"{kind}: {', '.join(items)}" for kind, items in by_kind.items()]
        out.append(f"{name} vs {result['comparison']['baseline']}: " + "; ".join(parts))
    return out


def _write(out: Path, result: dict[str, Any], class_names: list[str]) -> None:
    from synthforge.plots import metrics_by_setting, per_class_accuracy_bars

    settings = result["comparison"]["settings"]
    with atomic_dir(out) as tmp:
        (tmp / "evaluation.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(dvc_metrics(result), indent=2, allow_nan=False) + "\n")
        (tmp / "summary.md").write_text(summary_markdown(result))
        (tmp / "per_class_accuracy.png").write_bytes(
            per_class_accuracy_bars({name: s["per_class_accuracy"] for name, s in settings.items()}, class_names)
        )
        (tmp / "metrics.png").write_bytes(metrics_by_setting(settings))
