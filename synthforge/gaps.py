"""gaps: where the real data is thin or the reference classifier weak, and a per-class generation budget.

From the real train and test splits and the reference classifier, written atomically:

    data/gaps/gaps.json       per class: real train and test counts, share, test accuracy, mean marginal score,
                              the test images' difficulty mix, flags (thin, weak) with their reasons, weight and
                              budget; per difficulty level: counts and test accuracy; the options and input digests
    data/gaps/budget.json     {"per_class": {class name: images}, "total", "basis", "classifier", "real"}: what the
                              seeds stage reads with `budget: file` (then generate makes exactly that many per class)
    data/gaps/classes.png     real training images, test accuracy and budget per class, flagged classes in red
    data/gaps/difficulty.png  the difficulty mix of each class's real test images

A class is thin when it has fewer real training images than thin_fraction x the median class, and weak when its
test accuracy is below the mean per-class accuracy by more than weak_margin (or below weak_accuracy, if set).

The budget follows the error on the real test split, as GenDataAgent saw weaker classes gain most from synthetic
data. A class's weight is its add-one smoothed error rate, (wrong + 1) / (test images + 2), so a class without
errors on a few test images still gets some (and one without test images weighs 1/2); a thin class's weight is
multiplied by thin_boost. Every class gets min_per_class images and the rest is shared in proportion to the
weights, rounded by largest remainder (ties to the earlier class), so the per-class numbers add up to the total
exactly. The total defaults to what the seeds stage would plan: its selected seeds x images_per_seed.

Difficulty levels are the tag stage's (ImageTagStage.classify) with the thresholds of params `tag`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from synthforge.errors import BadInput
from synthforge.params import parse_options
from synthforge.stagedir import atomic_dir

if TYPE_CHECKING:
    import pyarrow as pa

    from synthforge.stages.tag import ImageTagStage

LEVELS = ("easy", "medium", "hard", "adversarial")
TAG_THRESHOLDS = ("easy_min_score", "medium_min_score", "adversarial_min_confidence")
_BAR_COLOR, _FLAG_COLOR = "#1f77b4", "#d62728"


@dataclass
class GapsOptions:
    """params.yaml section `gaps`."""

    total: int | None = None  # images to budget; None = the seeds stage's selected seeds x images_per_seed
    thin_fraction: float = 0.5  # thin: fewer real training images than this x the median class
    weak_margin: float = 0.1  # weak: test accuracy below the mean per-class accuracy by more than this
    weak_accuracy: float | None = None  # weak as well: test accuracy below this
    min_per_class: int = 0  # every class gets at least this many images
    thin_boost: float = 2.0  # a thin class's weight is multiplied by this


def _validate(o: GapsOptions, params_file: str) -> None:
    where = f"{params_file}: gaps"
    if o.total is not None and o.total < 1:
        raise BadInput(f"{where}.total: must be at least 1 (or null for the seeds stage's plan), got {o.total}")
    if o.thin_fraction <= 0:
        raise BadInput(f"{where}.thin_fraction: must be above 0, got {o.thin_fraction}")
    if o.weak_margin < 0:
        raise BadInput(f"{where}.weak_margin: must be at least 0, got {o.weak_margin}")
    if o.weak_accuracy is not None and not 0 <= o.weak_accuracy <= 1:
        raise BadInput(f"{where}.weak_accuracy: must be in [0, 1], got {o.weak_accuracy}")
    if o.min_per_class < 0:
        raise BadInput(f"{where}.min_per_class: must be at least 0, got {o.min_per_class}")
    if o.thin_boost < 1:
        raise BadInput(f"{where}.thin_boost: must be at least 1 (it raises thin classes), got {o.thin_boost}")


@dataclass
class _Scored:
    """One real split as the reference classifier sees it, image by image."""

    labels: np.ndarray
    scores: np.ndarray  # marginal score: p(label | image)
    correct: np.ndarray
    levels: np.ndarray  # difficulty level names


def _score(tagger: ImageTagStage, table: pa.Table) -> _Scored:
    from synthforge.vision.classifier import marginal_scores

    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    probs = tagger.classifier.probabilities(table.column("image").to_pylist())
    levels = tagger.levels(probs, labels)
    return _Scored(labels, marginal_scores(probs, labels), probs.argmax(axis=1) == labels, np.asarray(levels, dtype=object))


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 4) if len(values) else None


def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Split total into integers proportional to weights (all positive), by largest remainder, ties to the lower index."""
    quotas = total * weights / weights.sum()
    shares = np.floor(quotas).astype(np.int64)
    remainders = quotas - shares
    order = np.lexsort((np.arange(len(weights)), -remainders))
    shares[order[: total - int(shares.sum())]] += 1
    return shares


def find_gaps(params: dict[str, Any], real: str | Path, classifier: str | Path, out: str | Path = "data/gaps") -> dict[str, Any]:
    """Score the real splits with the classifier, flag thin and weak classes, budget images per class, and
    write gaps.json, budget.json and the figures into `out` atomically. Returns what gaps.json holds."""
    from synthforge.stages.seeds import seed_count, seeds_options
    from synthforge.stages.tag import ImageTagStage
    from synthforge.vision.classifier import classifier_digest
    from synthforge.vision.real import read_real, real_info

    params_file = params.get("__file__", "params.yaml")
    o = parse_options(GapsOptions, params.get("gaps") or {}, "gaps", params_file)
    _validate(o, params_file)
    real, classifier, out = Path(real), Path(classifier), Path(out)
    info = real_info(real)
    tag_section = params.get("tag") or {}
    thresholds = {k: tag_section[k] for k in TAG_THRESHOLDS if k in tag_section}
    tagger = ImageTagStage({**thresholds, "classifier": str(classifier)}, params_file)
    names = tagger.classifier.class_names
    if info["class_names"] != names:
        raise BadInput(f"{classifier}: trained on classes {names}, but {real} has {info['class_names']}; retrain the classifier")
    train_table = read_real(real, "train")
    if o.total is None:
        seeds = seeds_options(params)
        total = seed_count(seeds, train_table.num_rows) * seeds.images_per_seed
    else:
        total = o.total
    if total < o.min_per_class * len(names):
        raise BadInput(
            f"{params_file}: gaps.min_per_class: {o.min_per_class} images for each of {len(names)} classes is more "
            f"than the total {total}"
        )
    train, test = _score(tagger, train_table), _score(tagger, read_real(real, "test"))

    train_counts = np.bincount(train.labels, minlength=len(names))
    test_counts = np.bincount(test.labels, minlength=len(names))
    wrong = np.bincount(test.labels[~test.correct], minlength=len(names))
    accuracy = [1 - wrong[c] / test_counts[c] if test_counts[c] else None for c in range(len(names))]
    known = [a for a in accuracy if a is not None]
    mean_accuracy = float(np.mean(known)) if known else None
    median = float(np.median(train_counts))

    per_class, thin = {}, np.zeros(len(names), dtype=bool)
    for c, name in enumerate(names):
        acc, reasons = accuracy[c], []
        if train_counts[c] < o.thin_fraction * median:
            thin[c] = True
            reasons.append(
                f"{train_counts[c]} real training images, fewer than {o.thin_fraction:g} x the median class ({median:g})"
            )
        weak = False
        if acc is not None and acc < mean_accuracy - o.weak_margin:
            weak = True
            reasons.append(
                f"test accuracy {acc:.3f} is below the mean per-class accuracy {mean_accuracy:.3f} by more than {o.weak_margin:g}"
            )
        if acc is not None and o.weak_accuracy is not None and acc < o.weak_accuracy:
            weak = True
            reasons.append(f"test accuracy {acc:.3f} is below weak_accuracy {o.weak_accuracy:g}")
        in_train, in_test = train.labels == c, test.labels == c
        per_class[name] = {
            "train": int(train_counts[c]),
            "share": round(float(train_counts[c] / max(len(train.labels), 1)), 4),
            "test": int(test_counts[c]),
            "test_accuracy": None if acc is None else round(float(acc), 4),
            "mean_marginal_score": {"train": _mean(train.scores[in_train]), "test": _mean(test.scores[in_test])},
            "difficulty": {lv: int((test.levels[in_test] == lv).sum()) for lv in LEVELS},
            "thin": bool(thin[c]),
            "weak": weak,
            "reasons": reasons,
        }

    weights = (wrong + 1) / (test_counts + 2) * np.where(thin, o.thin_boost, 1.0)
    budget = o.min_per_class + apportion(total - o.min_per_class * len(names), weights)
    for c, name in enumerate(names):
        per_class[name]["weight"] = round(float(weights[c]), 6)
        per_class[name]["budget"] = int(budget[c])

    digests = {"classifier": classifier_digest(classifier), "real": info["digest"]}
    basis = (
        (f"{o.min_per_class} images per class, the rest " if o.min_per_class else "images ")
        + "in proportion to the smoothed error (wrong + 1) / (test images + 2) on the real test split"
        + (f", x {o.thin_boost:g} for thin classes" if thin.any() else "")
        + ", rounded by largest remainder"
    )
    gaps = {
        "classes": len(names),
        "overall": {
            "train": len(train.labels),
            "test": len(test.labels),
            "test_accuracy": _mean(test.correct),
            "mean_class_accuracy": None if mean_accuracy is None else round(mean_accuracy, 4),
            "median_class_train": median,
        },
        "thin": [n for n in names if per_class[n]["thin"]],
        "weak": [n for n in names if per_class[n]["weak"]],
        "per_class": per_class,
        "difficulty": {
            lv: {
                "train": int((train.levels == lv).sum()),
                "test": int((test.levels == lv).sum()),
                "test_accuracy": _mean(test.correct[test.levels == lv]),
            }
            for lv in LEVELS
        },
        "budget_total": total,
        "basis": basis,
        "options": {
            **dataclasses.asdict(o),
            "difficulty": {
                "easy_min_score": tagger.easy,
                "medium_min_score": tagger.medium,
                "adversarial_min_confidence": tagger.adversarial,
            },
        },
        "classifier": {"path": str(classifier), "digest": digests["classifier"]},
        "real": {"path": str(real), "digest": digests["real"]},
    }
    budget_file = {"per_class": {n: per_class[n]["budget"] for n in names}, "total": total, "basis": basis, **digests}
    with atomic_dir(out) as tmp:
        (tmp / "gaps.json").write_text(json.dumps(gaps, indent=2) + "\n")
        (tmp / "budget.json").write_text(json.dumps(budget_file, indent=2) + "\n")
        (tmp / "classes.png").write_bytes(_classes_figure(gaps, o))
        (tmp / "difficulty.png").write_bytes(_difficulty_figure(gaps))
    return gaps


def _classes_figure(gaps: dict[str, Any], o: GapsOptions) -> bytes:
    """Three panels, one row per class: real training images, test accuracy, images budgeted; flagged in red."""
    from synthforge.plots import _chart, _integer_ticks, _png

    per_class = gaps["per_class"]
    names = list(per_class)
    y = np.arange(len(names))
    overall = gaps["overall"]
    with _chart(1.2 + 0.28 * len(names)) as fig:
        counts, accuracy, budget = fig.subplots(1, 3, sharey=True)
        colors = [_FLAG_COLOR if per_class[n]["thin"] else _BAR_COLOR for n in names]
        counts.barh(y, [per_class[n]["train"] for n in names], height=0.6, color=colors)
        counts.axvline(o.thin_fraction * overall["median_class_train"], color="#7f7f7f", linestyle="--", linewidth=1)
        counts.set_title("real training images (red: thin)")
        _integer_ticks(counts.xaxis)
        colors = [_FLAG_COLOR if per_class[n]["weak"] else _BAR_COLOR for n in names]
        accuracy.barh(y, [per_class[n]["test_accuracy"] or 0 for n in names], height=0.6, color=colors)
        if overall["mean_class_accuracy"] is not None:
            weak_below = overall["mean_class_accuracy"] - o.weak_margin
            accuracy.axvline(weak_below, color="#7f7f7f", linestyle="--", linewidth=1)
        accuracy.set_xlim(0, 1)
        accuracy.set_title("test accuracy (red: weak)")
        colors = [_FLAG_COLOR if per_class[n]["thin"] or per_class[n]["weak"] else _BAR_COLOR for n in names]
        bars = budget.barh(y, [per_class[n]["budget"] for n in names], height=0.6, color=colors)
        budget.bar_label(bars, padding=3)
        budget.set_title(f"images budgeted (total {gaps['budget_total']})")
        _integer_ticks(budget.xaxis)
        counts.set_yticks(y, names)
        counts.invert_yaxis()
        for ax in (counts, accuracy, budget):
            ax.grid(axis="y", visible=False)
        return _png(fig)


def _difficulty_figure(gaps: dict[str, Any]) -> bytes:
    from synthforge.plots import difficulty_by_split

    return difficulty_by_split({name: c["difficulty"] for name, c in gaps["per_class"].items()})
