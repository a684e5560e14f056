"""Does a dataset help? Classification metrics per run, their spread over seeds, and a verdict per metric.

A run is one classifier (one setting, one seed) scored on a test set: `classification_metrics` turns its N x K
probabilities into top-1, top-5, macro-F1, AUROC, AUPRC, per-class accuracy and worst-case disparity, and
`metrics_by_group` does the same per difficulty level. `compare` sets each setting's runs beside the baseline's,
seed by seed, and `verdict` says per metric whether the difference is measurable: synthetic data can raise one
metric and lower another (AUROC up, F1 down), so there is no single verdict for a setting.

Every metric here is higher-is-better, and every output is plain JSON (floats, None for undefined, never NaN),
so it can be written as DVC metrics as is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from synthforge.errors import BadInput
from synthforge.plots import DIFFICULTY_ORDER

METRICS = ("top1", "top5", "macro_f1", "auroc", "auprc", "worst_case_disparity")
TOP_K = 5


def _check_inputs(probabilities: Any, labels: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels)
    k = len(class_names)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] != k:
        raise BadInput(f"probabilities must be N x {k} (one column per class, N >= 1); got shape {probs.shape}")
    if k < 2 or len(set(class_names)) != k:
        raise BadInput(f"classification metrics need at least 2 classes, each named once; got {list(class_names)}")
    if y.shape != (probs.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise BadInput(f"labels must be {probs.shape[0]} integers, one per row of probabilities; got {y.dtype} {y.shape}")
    if y.min() < 0 or y.max() >= k:
        bad = int(np.flatnonzero((y < 0) | (y >= k))[0])
        raise BadInput(f"label {int(y[bad])} of row {bad} is outside 0..{k - 1} ({k} classes)")
    if not np.isfinite(probs).all() or probs.min() < 0 or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise BadInput("probabilities must be finite, non-negative and sum to 1 per row (softmax outputs, not logits)")
    return probs, y


def _ranked(probs: np.ndarray) -> np.ndarray:
    """Classes by descending probability, ties to the lower class index as np.argmax and torch.argmax break them.
    (scikit-learn's top_k_accuracy_score breaks ties the other way, which could put top-5 below top-1.)"""
    return np.argsort(-probs, axis=1, kind="stable")


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics of one classifier on one test set.

    probabilities: N x K, rows summing to 1, column k for class_names[k]; labels: N integers in 0..K-1.
    The predicted class is the most probable one (ties to the lower index). Returns:
      n: N.
      top1: share of samples whose label is the predicted class.
      top5: share whose label is among the 5 most probable classes; None when K <= 5, where it is always 1.
      macro_f1: F1 averaged over the classes in the labels or the predictions (scikit-learn's default set):
        a class predicted but absent from the test set counts with F1 = 0; one neither present nor predicted
        does not count.
      auroc: one-vs-rest ROC AUC averaged over the classes with both positives and negatives here; None if none.
      auprc: average precision averaged over the classes with positives here; None if none.
      per_class_accuracy: {class name: share of its samples predicted as it, None when it has no sample}.
      worst_case_disparity: min / max of the per-class accuracies of the classes present (GenDataAgent's
        min-max accuracy ratio; 1 = every class equally served); 0 when every present class is at accuracy 0.
    """
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    probs, y = _check_inputs(probabilities, labels, class_names)
    n, k = probs.shape
    ranked = _ranked(probs)
    predicted = ranked[:, 0]
    onehot = y[:, None] == np.arange(k)
    positives = onehot.sum(axis=0)

    f1_labels = np.union1d(y, predicted)
    both = np.flatnonzero((positives > 0) & (positives < n))
    present = np.flatnonzero(positives > 0)
    per_class = {name: float((predicted[y == c] == c).mean()) if positives[c] else None for c, name in enumerate(class_names)}
    accuracies = [per_class[class_names[c]] for c in present]
    best = max(accuracies)
    return {
        "n": int(n),
        "top1": float((predicted == y).mean()),
        "top5": float((ranked[:, :TOP_K] == y[:, None]).any(axis=1).mean()) if k > TOP_K else None,
        "macro_f1": float(f1_score(y, predicted, labels=f1_labels, average="macro")),
        "auroc": float(roc_auc_score(onehot[:, both], probs[:, both], average="macro")) if len(both) else None,
        "auprc": float(average_precision_score(onehot[:, present], probs[:, present], average="macro")),
        "per_class_accuracy": per_class,
        "worst_case_disparity": min(accuracies) / best if best > 0 else 0.0,
    }


def _ordered_levels(levels: Iterable[str]) -> list[str]:
    """Difficulty levels easy, medium, hard, adversarial first, then any others by name."""
    rank = {level: i for i, level in enumerate(DIFFICULTY_ORDER)}
    return sorted(set(levels), key=lambda level: (rank.get(level, len(rank)), level))


def metrics_by_group(
    probabilities: np.ndarray, labels: np.ndarray, groups: Sequence[str | None], class_names: Sequence[str]
) -> dict[str, Any]:
    """classification_metrics over all samples ("overall") and over the samples of each difficulty level
    ("by_difficulty", levels in the order easy, medium, hard, adversarial, then others by name).
    groups: the level of each sample (row); samples with None count in "overall" only."""
    probs, y = _check_inputs(probabilities, labels, class_names)
    groups = list(groups)
    if len(groups) != len(y):
        raise BadInput(f"groups must give one difficulty level per sample: {len(groups)} levels for {len(y)} samples")
    by_level = {}
    for level in _ordered_levels(g for g in groups if g is not None):
        rows = np.array([g == level for g in groups])
        by_level[level] = classification_metrics(probs[rows], y[rows], class_names)
    return {"overall": classification_metrics(probs, y, class_names), "by_difficulty": by_level}


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Spread of one metric over seeds: mean, sample standard deviation (ddof=1; None below 2 values), min, max,
    the number of defined values n, and the values themselves in seed order (None where undefined)."""
    given = [None if v is None else float(v) for v in values]
    defined = np.array([v for v in given if v is not None])
    if np.isnan(defined).any():
        raise BadInput(f"summarize: NaN among {given}; use None for an undefined value")
    n = len(defined)
    return {
        "mean": float(defined.mean()) if n else None,
        "std": float(defined.std(ddof=1)) if n > 1 else None,
        "min": float(defined.min()) if n else None,
        "max": float(defined.max()) if n else None,
        "n": n,
        "values": given,
    }


def verdict(
    baseline: Sequence[float | None], treatment: Sequence[float | None], confidence: float = 0.95, min_effect: float = 0.0
) -> dict[str, Any]:
    """Does the treatment change a higher-is-better metric, judged on runs paired by seed?

    baseline[i] and treatment[i] come from seed i; pairs where either is None are left out (n counts the rest).
    delta is the mean of treatment - baseline; ci is a Student-t interval at `confidence` on that mean. The verdict
    is "helps" when the whole interval lies above +min_effect, "hurts" when it lies below -min_effect, else
    "no measurable effect"; with fewer than 2 pairs there is no interval and the verdict is "not enough seeds".
    When every pair differs by the same amount the spread is 0 and the interval is that single point: each
    seed showed the same change, so the change is taken as measured.
    Each verdict is one test at 1 - confidence error; across many metrics and levels, expect some false ones.
    """
    from scipy import stats

    if not 0 < confidence < 1:
        raise BadInput(f"confidence must be between 0 and 1, exclusive; got {confidence}")
    if min_effect < 0:
        raise BadInput(f"min_effect must be >= 0; got {min_effect}")
    if len(baseline) != len(treatment):
        raise BadInput(f"verdict pairs runs by seed: {len(baseline)} baseline runs but {len(treatment)} treatment runs")
    differences = np.array([t - b for b, t in zip(baseline, treatment, strict=True) if b is not None and t is not None])
    n = len(differences)
    delta = float(differences.mean()) if n else None
    ci, outcome = None, "not enough seeds"
    if n >= 2:
        half = stats.t.ppf((1 + confidence) / 2, n - 1) * differences.std(ddof=1) / math.sqrt(n)
        ci = [delta - float(half), delta + float(half)]
        outcome = "helps" if ci[0] > min_effect else "hurts" if ci[1] < -min_effect else "no measurable effect"
    return {"verdict": outcome, "delta": delta, "ci": ci, "n": n, "confidence": confidence, "min_effect": min_effect}


def _levels_of(runs: Iterable[Mapping[str, Any]]) -> list[str]:
    return _ordered_levels(level for run in runs for level in run["by_difficulty"])


def _metric_values(runs: Sequence[Mapping[str, Any]], level: str | None, metric: str) -> list[float | None]:
    """One metric over seeds, overall (level None) or at one level; None for a seed without samples there."""
    scopes = (run["overall"] if level is None else run["by_difficulty"].get(level) for run in runs)
    return [None if scope is None else scope[metric] for scope in scopes]


def _verdicts(
    base_runs: Sequence[Mapping[str, Any]],
    runs: Sequence[Mapping[str, Any]],
    level: str | None,
    confidence: float,
    min_effect: float,
) -> dict[str, dict[str, Any]]:
    return {
        m: verdict(_metric_values(base_runs, level, m), _metric_values(runs, level, m), confidence, min_effect) for m in METRICS
    }


def compare(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], baseline: str, confidence: float = 0.95, min_effect: float = 0.0
) -> dict[str, Any]:
    """Every setting's metrics over seeds, and per metric a verdict against the baseline setting.

    runs: {setting: [metrics_by_group output of seed 0, seed 1, ...]}, every setting with the same seeds in the
    same order, scored on the same classes. Returns, JSON-ready:
      {"baseline": name, "confidence": ..., "min_effect": ...,
       "settings": {setting: {
           "seeds": number of runs,
           "overall": {metric: summarize(...)}, "by_difficulty": {level: {metric: summarize(...)}},
           "per_class_accuracy": {class: summarize(...)},
           "verdicts": {metric: verdict(...)}, "verdicts_by_difficulty": {level: {metric: verdict(...)}}}}}
    The baseline has no "verdicts" nor "verdicts_by_difficulty"; a level gets verdicts when both settings have it.
    """
    if baseline not in runs:
        raise BadInput(f"baseline setting {baseline!r} is not among the settings {sorted(runs)}")
    base_runs = runs[baseline]
    if not base_runs:
        raise BadInput(f"baseline setting {baseline!r} has no run")
    class_names = list(base_runs[0]["overall"]["per_class_accuracy"])
    for name, setting_runs in runs.items():
        if len(setting_runs) != len(base_runs):
            raise BadInput(
                f"setting {name!r} has {len(setting_runs)} runs but baseline {baseline!r} has {len(base_runs)}: "
                "settings are compared seed by seed, so each needs a run for every seed"
            )
        for seed, run in enumerate(setting_runs):
            if list(run["overall"]["per_class_accuracy"]) != class_names:
                raise BadInput(f"setting {name!r}, run {seed}: its classes differ from those of baseline {baseline!r}")

    base_levels = _levels_of(base_runs)
    settings = {}
    for name, setting_runs in runs.items():
        levels = _levels_of(setting_runs)
        summary = {
            "seeds": len(setting_runs),
            "overall": {m: summarize(_metric_values(setting_runs, None, m)) for m in METRICS},
            "by_difficulty": {lv: {m: summarize(_metric_values(setting_runs, lv, m)) for m in METRICS} for lv in levels},
            "per_class_accuracy": {
                c: summarize([run["overall"]["per_class_accuracy"][c] for run in setting_runs]) for c in class_names
            },
        }
        if name != baseline:
            summary["verdicts"] = _verdicts(base_runs, setting_runs, None, confidence, min_effect)
            summary["verdicts_by_difficulty"] = {
                lv: _verdicts(base_runs, setting_runs, lv, confidence, min_effect) for lv in levels if lv in base_levels
            }
        settings[name] = summary
    return {"baseline": baseline, "confidence": confidence, "min_effect": min_effect, "settings": settings}
