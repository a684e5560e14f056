"""Evaluation metrics against scikit-learn on fixed predictions, verdicts over seeds, and their figures."""

from __future__ import annotations

import io
import json
import statistics

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score, top_k_accuracy_score

from synthforge import plots
from synthforge.errors import BadInput
from synthforge.metrics import METRICS, classification_metrics, compare, metrics_by_group, summarize, verdict

SIX = ["airplane", "bird", "cat", "dog", "frog", "ship"]
# Ten samples over six classes, no two scores tied in a row; "ship" (5) is in no label but is predicted for row 8.
SCORES = np.array(
    [
        [9, 3, 1, 2, 4, 5],
        [2, 8, 1, 3, 6, 4],
        [1, 7, 5, 2, 3, 4],
        [3, 2, 9, 1, 5, 4],
        [4, 1, 3, 8, 2, 6],
        [1, 2, 6, 7, 3, 5],
        [2, 3, 1, 4, 9, 5],
        [5, 1, 2, 3, 8, 4],
        [3, 2, 4, 1, 5, 9],
        [6, 5, 1, 2, 3, 4],
    ],
    dtype=np.float64,
)
PROBS = SCORES / SCORES.sum(axis=1, keepdims=True)
LABELS = np.array([0, 1, 2, 2, 3, 3, 4, 0, 4, 1])


def test_metrics_match_scikit_learn_with_a_class_absent_from_the_test_set():
    m = classification_metrics(PROBS, LABELS, SIX)
    predicted = PROBS.argmax(axis=1)
    present = [c for c in range(6) if (LABELS == c).any()]

    assert m["n"] == 10
    assert m["top1"] == pytest.approx(accuracy_score(LABELS, predicted))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(LABELS, PROBS, k=5, labels=range(6)))
    # The predicted-but-absent "ship" counts (F1 0), as in scikit-learn's default label set.
    assert m["macro_f1"] == pytest.approx(f1_score(LABELS, predicted, average="macro"))
    assert m["macro_f1"] < f1_score(LABELS, predicted, labels=present, average="macro")
    assert m["auroc"] == pytest.approx(np.mean([roc_auc_score(LABELS == c, PROBS[:, c]) for c in present]))
    assert m["auprc"] == pytest.approx(np.mean([average_precision_score(LABELS == c, PROBS[:, c]) for c in present]))
    assert m["per_class_accuracy"]["ship"] is None


def test_auroc_and_auprc_match_scikit_learn_multiclass_when_every_class_is_present():
    labels = np.array([0, 1, 2, 2, 3, 3, 4, 0, 5, 1])
    m = classification_metrics(PROBS, labels, SIX)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, PROBS, multi_class="ovr", average="macro"))
    assert m["auprc"] == pytest.approx(average_precision_score(labels, PROBS, average="macro"))


def test_top5_is_undefined_with_five_classes_or_fewer():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
    m = classification_metrics(probs, np.array([0, 0, 1]), ["a", "b", "c"])
    assert m["top5"] is None
    assert m["top1"] == pytest.approx(2 / 3)
    assert m["auroc"] is not None  # "a" and "b" have positives and negatives; "c" has no sample and is left out


def test_ties_go_to_the_lower_class_index_so_top5_never_falls_below_top1():
    uniform = np.full((3, 7), 1 / 7)
    m = classification_metrics(uniform, np.array([0, 4, 6]), list("abcdefg"))
    assert m["top1"] == pytest.approx(1 / 3)  # class 0 wins every tie, as np.argmax and torch.argmax decide
    assert m["top5"] == pytest.approx(2 / 3)  # classes 0-4 make the top five; 6 does not
    assert m["top5"] >= m["top1"]
    assert m["per_class_accuracy"] == {"a": 1.0, "b": None, "c": None, "d": None, "e": 0.0, "f": None, "g": 0.0}


def test_per_class_accuracy_and_worst_case_disparity_by_hand():
    probs = np.array(
        [
            [0.8, 0.1, 0.1],  # a right
            [0.6, 0.3, 0.1],  # a right
            [0.5, 0.2, 0.3],  # a right
            [0.2, 0.7, 0.1],  # a wrong
            [0.1, 0.8, 0.1],  # b right
            [0.1, 0.2, 0.7],  # b wrong
        ]
    )
    m = classification_metrics(probs, np.array([0, 0, 0, 0, 1, 1]), ["a", "b", "c"])
    assert m["per_class_accuracy"] == {"a": 0.75, "b": 0.5, "c": None}
    assert m["worst_case_disparity"] == pytest.approx(0.5 / 0.75)

    all_wrong = classification_metrics(probs[[3, 5]], np.array([0, 1]), ["a", "b", "c"])
    assert all_wrong["worst_case_disparity"] == 0.0


@pytest.mark.parametrize(
    ("probs", "labels", "names", "message"),
    [
        (PROBS, LABELS[:-1], SIX, "10 integers"),
        (PROBS, np.where(LABELS == 4, 6, LABELS), SIX, "label 6 of row 6 is outside 0..5"),
        (PROBS, LABELS.astype(float), SIX, "integers"),
        (SCORES, LABELS, SIX, "sum to 1"),
        (PROBS, LABELS, SIX[:5], "N x 5"),
        (PROBS[:, :2] / PROBS[:, :2].sum(1, keepdims=True), LABELS % 2, ["a", "a"], "each named once"),
    ],
)
def test_bad_predictions_are_refused_with_a_reason(probs, labels, names, message):
    with pytest.raises(BadInput, match=message):
        classification_metrics(probs, labels, names)


def test_metrics_by_difficulty_level_in_the_documented_order():
    groups = ["hard", "easy", "adversarial", None, "hard", "novel", "easy", "adversarial", "hard", None]
    result = metrics_by_group(PROBS, LABELS, groups, SIX)

    assert result["overall"] == classification_metrics(PROBS, LABELS, SIX)
    assert list(result["by_difficulty"]) == ["easy", "hard", "adversarial", "novel"]
    hard = [i for i, g in enumerate(groups) if g == "hard"]
    assert result["by_difficulty"]["hard"] == classification_metrics(PROBS[hard], LABELS[hard], SIX)
    assert sum(level["n"] for level in result["by_difficulty"].values()) == 8  # the two without a level only overall
    with pytest.raises(BadInput, match="9 levels for 10 samples"):
        metrics_by_group(PROBS, LABELS, groups[:-1], SIX)


def test_summarize_skips_undefined_values_but_keeps_their_seed_place():
    s = summarize([0.8, None, 0.6, 0.7])
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(statistics.stdev([0.8, 0.6, 0.7]))
    assert (s["min"], s["max"], s["values"]) == (0.6, 0.8, [0.8, None, 0.6, 0.7])
    assert summarize([0.5])["std"] is None
    assert summarize([None, None])["mean"] is None


def test_verdict_helps_when_every_seed_gains_and_its_interval_is_the_paired_t_interval():
    baseline, treatment = [0.70, 0.74, 0.68, 0.72], [0.80, 0.83, 0.79, 0.81]
    v = verdict(baseline, treatment)
    assert v["verdict"] == "helps"
    assert v["delta"] == pytest.approx(np.mean(np.subtract(treatment, baseline)))
    assert v["ci"] == pytest.approx(list(stats.ttest_rel(treatment, baseline).confidence_interval(0.95)))
    assert v["n"] == 4


def test_verdict_hurts_no_effect_and_too_few_seeds():
    assert verdict([0.80, 0.82, 0.81], [0.70, 0.71, 0.69])["verdict"] == "hurts"
    noise = verdict([0.80, 0.70, 0.75, 0.78], [0.76, 0.74, 0.79, 0.74])
    assert noise["verdict"] == "no measurable effect"
    assert noise["ci"][0] < 0 < noise["ci"][1]

    one = verdict([0.5, None, 0.6], [0.9, 0.7, None])  # only seed 0 has both values
    assert (one["verdict"], one["ci"], one["n"]) == ("not enough seeds", None, 1)
    assert one["delta"] == pytest.approx(0.4)


def test_verdict_with_a_constant_gain_and_with_a_minimum_effect():
    same = verdict([0.5, 0.6, 0.7], [0.55, 0.65, 0.75])
    assert same["verdict"] == "helps"
    assert same["ci"] == pytest.approx([0.05, 0.05])
    small = verdict([0.70, 0.74, 0.68, 0.72], [0.72, 0.755, 0.70, 0.74], min_effect=0.05)
    assert small["verdict"] == "no measurable effect"
    assert verdict([0.70, 0.74, 0.68, 0.72], [0.72, 0.755, 0.70, 0.74])["verdict"] == "helps"
    with pytest.raises(BadInput, match="pairs runs by seed"):
        verdict([0.5, 0.6], [0.5])


def _runs(shift: float, seeds: range, classes: int = 6, levels: tuple = ("easy", "medium", "hard", None)) -> list[dict]:
    """Seeded predictions on 60 samples whose true class gets `shift` more logit: more shift, better classifier."""
    n = 60
    labels = np.arange(n) % classes
    groups = [levels[i % len(levels)] for i in range(n)]
    out = []
    for seed in seeds:
        logits = np.random.default_rng(seed).normal(size=(n, classes))
        logits[np.arange(n), labels] += shift
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        out.append(metrics_by_group(probs, labels, groups, [f"c{k}" for k in range(classes)]))
    return out


@pytest.fixture(scope="module")
def runs() -> dict[str, list[dict]]:
    return {
        "real": _runs(1.0, range(3)),
        "real+synthetic": _runs(3.0, range(10, 13), levels=("easy", "medium", "hard", "adversarial")),
        "synthetic": _runs(0.2, range(20, 23)),
    }


@pytest.fixture(scope="module")
def compared(runs) -> dict:
    return compare(runs, "real")


def test_compare_reports_spread_and_verdicts_as_plain_json(runs, compared):
    text = json.dumps(compared, allow_nan=False)
    assert json.loads(text) == compared

    real, mixed, synthetic = (compared["settings"][s] for s in ("real", "real+synthetic", "synthetic"))
    assert "verdicts" not in real
    assert set(mixed["verdicts"]) == set(METRICS)
    assert mixed["verdicts"]["top1"]["verdict"] == "helps"
    assert synthetic["verdicts"]["top1"]["verdict"] == "hurts"
    assert mixed["overall"]["top1"]["n"] == 3
    assert list(mixed["per_class_accuracy"]) == [f"c{k}" for k in range(6)]
    # The baseline has no adversarial sample: that level is summarised but has nothing to be judged against.
    assert list(mixed["by_difficulty"]) == ["easy", "medium", "hard", "adversarial"]
    assert list(mixed["verdicts_by_difficulty"]) == ["easy", "medium", "hard"]
    assert mixed["by_difficulty"]["hard"]["top1"]["values"] == [
        run["by_difficulty"]["hard"]["top1"] for run in runs["real+synthetic"]
    ]


def test_compare_refuses_unpaired_seeds_and_an_unknown_baseline():
    runs = {"real": _runs(1.0, range(3)), "mixed": _runs(2.0, range(2))}
    with pytest.raises(BadInput, match="'mixed' has 2 runs"):
        compare(runs, "real")
    with pytest.raises(BadInput, match="'base' is not among"):
        compare(runs, "base")


def test_top5_with_few_classes_stays_null_through_compare():
    result = compare({"a": _runs(1.0, range(2), classes=4), "b": _runs(2.0, range(2, 4), classes=4)}, "a")
    json.dumps(result, allow_nan=False)
    assert result["settings"]["b"]["overall"]["top5"]["mean"] is None
    assert result["settings"]["b"]["verdicts"]["top5"]["verdict"] == "not enough seeds"


def _decodes_to_png(png: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_per_class_accuracy_bars_are_a_stable_png(compared):
    per_class = {name: s["per_class_accuracy"] for name, s in compared["settings"].items()}
    png = plots.per_class_accuracy_bars(per_class, [f"c{k}" for k in range(6)])
    width, height = _decodes_to_png(png)
    assert width == 800 and height > 300
    assert plots.per_class_accuracy_bars(per_class, [f"c{k}" for k in range(6)]) == png


def test_metrics_by_setting_is_a_stable_png_overall_and_per_level(compared):
    png = plots.metrics_by_setting(compared["settings"])
    assert _decodes_to_png(png)[0] == 800
    assert plots.metrics_by_setting(compared["settings"]) == png
    hard = plots.metrics_by_setting(compared["settings"], level="hard")
    assert _decodes_to_png(hard)[0] == 800 and hard != png
    with pytest.raises(BadInput, match="none of the metrics"):
        plots.metrics_by_setting(compare({"a": _runs(1.0, range(2), classes=4)}, "a")["settings"], metrics=["top5"])
