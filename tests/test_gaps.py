"""synthforge gaps: thin and weak classes of the real data, and the per-class budget the seeds stage follows."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import tree_digest

from synthforge.errors import BadInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gaps(digits, one_torch_thread, tmp_path_factory):
    """find_gaps on the digits project's real data and classifier, with the project's params (read-only)."""
    from synthforge.gaps import find_gaps
    from synthforge.params import load_params

    root, stats = digits
    params = load_params(root / "params.yaml")
    out = tmp_path_factory.mktemp("gaps") / "gaps"
    result = find_gaps(params, root / "data" / "real", root / "models" / "classifier", out)
    return root, stats, params, out, result


def _with(params: dict, section: str, **values) -> dict:
    p = copy.deepcopy(params)
    p[section] = {**(p.get(section) or {}), **values}
    return p


def _cut_class(real: Path, dest: Path, label: int, keep: int) -> Path:
    """A copy of a real data folder whose training split keeps only `keep` images of class `label`."""
    shutil.copytree(real, dest)
    train = pq.read_table(dest / "train.parquet")
    of_class = pc.equal(train["label"], label)
    kept = pc.or_(pc.invert(of_class), pc.less(pc.cumulative_sum(pc.cast(of_class, "int64")), keep + 1))
    pq.write_table(train.filter(kept), dest / "train.parquet")
    return dest


def test_weak_classes_get_more_images_and_the_total_is_the_seeds_plan(gaps):
    from PIL import Image

    from synthforge.vision.classifier import classifier_digest
    from synthforge.vision.real import real_info

    root, stats, params, out, result = gaps
    accuracy = stats["classifier"]["per_class_accuracy"]  # the classifier's own, on the real test split
    per_class = result["per_class"]
    assert {name: c["test_accuracy"] for name, c in per_class.items()} == accuracy

    budget = json.loads((out / "budget.json").read_text())
    planned = stats["seeds"]["selected"] * params["seeds"].get("images_per_seed", 4)
    assert budget["total"] == sum(budget["per_class"].values()) == planned
    assert budget["per_class"] == {name: c["budget"] for name, c in per_class.items()}

    mean = np.mean(list(accuracy.values()))
    weak = [name for name, acc in accuracy.items() if acc < mean - 0.1]
    assert weak and result["weak"] == weak and result["thin"] == []
    for name in weak:
        assert "below the mean per-class accuracy" in per_class[name]["reasons"][0]
        assert budget["per_class"][name] > max(n for c, n in budget["per_class"].items() if c not in weak)
    for a in accuracy:
        for b in accuracy:
            if accuracy[a] < accuracy[b] - 0.05:  # a is clearly weaker than b
                assert budget["per_class"][a] >= budget["per_class"][b], (a, b)

    assert budget["classifier"] == classifier_digest(root / "models" / "classifier")
    assert budget["real"] == real_info(root / "data" / "real")["digest"]

    # Difficulty by the tag rules: a score of 0.5 or more is the top class, so easy and medium images are
    # always right and adversarial ones always wrong.
    levels = result["difficulty"]
    assert sum(lv["test"] for lv in levels.values()) == result["overall"]["test"]
    for c in per_class.values():
        assert sum(c["difficulty"].values()) == c["test"]
    for level in ("easy", "medium"):
        assert levels[level]["test_accuracy"] in (None, 1.0)
    assert levels["adversarial"]["test_accuracy"] in (None, 0.0)

    for figure in ("classes.png", "difficulty.png"):
        with Image.open(out / figure) as image:
            assert image.format == "PNG" and image.width > 400


def test_a_thin_class_is_flagged_and_gets_a_larger_share(gaps, tmp_path):
    from synthforge.gaps import find_gaps

    root, _, params, _, result = gaps
    real = _cut_class(root / "data" / "real", tmp_path / "real", label=3, keep=10)
    p = _with(params, "gaps", total=result["budget_total"])
    thin = find_gaps(p, real, root / "models" / "classifier", tmp_path / "gaps")

    assert thin["thin"] == ["3"]
    assert thin["per_class"]["3"]["train"] == 10
    assert thin["per_class"]["3"]["reasons"][0].startswith("10 real training images, fewer than 0.5 x the median class")
    before = {name: c["budget"] for name, c in result["per_class"].items()}
    after = {name: c["budget"] for name, c in thin["per_class"].items()}
    assert sum(after.values()) == sum(before.values())
    assert after["3"] > before["3"]
    assert all(after[name] <= before[name] for name in before if name != "3")


@pytest.mark.parametrize(("total", "min_per_class"), [(37, 2), (10, 1)])
def test_budget_adds_up_to_an_explicit_total_with_a_floor_per_class(gaps, tmp_path, total, min_per_class):
    from synthforge.gaps import find_gaps

    root, _, params, _, _ = gaps
    p = _with(params, "gaps", total=total, min_per_class=min_per_class)
    find_gaps(p, root / "data" / "real", root / "models" / "classifier", tmp_path / "gaps")
    budget = json.loads((tmp_path / "gaps" / "budget.json").read_text())
    assert budget["total"] == sum(budget["per_class"].values()) == total
    assert min(budget["per_class"].values()) >= min_per_class


def test_a_total_below_the_floor_is_refused_before_anything_is_written(gaps, tmp_path):
    from synthforge.gaps import find_gaps

    root, _, params, _, _ = gaps
    p = _with(params, "gaps", total=5, min_per_class=1)
    with pytest.raises(BadInput, match=r"gaps\.min_per_class: 1 images for each of 10 classes is more than the total 5"):
        find_gaps(p, root / "data" / "real", root / "models" / "classifier", tmp_path / "gaps")
    assert not any(tmp_path.iterdir())


def test_a_failed_run_leaves_the_previous_gaps_folder_as_it_was(gaps, tmp_path, monkeypatch):
    import synthforge.gaps
    from synthforge.gaps import find_gaps

    root, _, params, previous, _ = gaps
    out = tmp_path / "gaps"
    shutil.copytree(previous, out)
    before = tree_digest(out)

    def broken(gaps_json):
        raise OSError("disk full")

    monkeypatch.setattr(synthforge.gaps, "_difficulty_figure", broken)
    with pytest.raises(OSError, match="disk full"):
        find_gaps(_with(params, "gaps", total=10), root / "data" / "real", root / "models" / "classifier", out)
    assert tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["gaps"]  # no temporary folder left beside it


def test_seeds_follow_the_budget_file_exactly_per_class(gaps, tmp_path):
    """Every class gets exactly its budget, spread evenly over its lowest-scoring images; with k = 1 all but one
    class have no selected seed and take their lowest-scoring images instead."""
    from synthforge.provenance import sha256_hex
    from synthforge.stages.seeds import run_seeds

    root, _, params, out, _ = gaps
    budget_file = out / "budget.json"
    budget = json.loads(budget_file.read_text())["per_class"]
    m = 4
    p = _with(params, "seeds", k=1, fraction=None, images_per_seed=m, budget="file", budget_file=str(budget_file))
    stats = run_seeds(p, root / "data" / "real", root / "models" / "classifier", tmp_path / "seeds")

    assert {name: c["images"] for name, c in stats["per_class"].items()} == budget
    assert stats["images_planned"] == sum(budget.values())
    assert stats["budget_file"] == {"path": str(budget_file), "digest": sha256_hex(budget_file.read_bytes())}
    seeds = pq.read_table(tmp_path / "seeds" / "seeds.parquet").to_pylist()
    for name, images in budget.items():
        of_class = sorted((s for s in seeds if s["label_name"] == name), key=lambda s: s["rank"])
        chosen = [s for s in of_class if s["selected"]]
        assert all(s["n_images"] > 0 for s in chosen) and all(s["n_images"] == 0 for s in of_class if not s["selected"])
        assert chosen == of_class[: len(chosen)]  # the class's lowest marginal scores
        counts = [s["n_images"] for s in chosen]
        assert sum(counts) == images
        assert counts == sorted(counts, reverse=True) and counts[0] - counts[-1] <= 1 and counts[0] <= m


BUDGET_ERRORS = [
    pytest.param(None, "budget file not found", id="missing-file"),
    pytest.param("{not json", "not valid JSON", id="bad-json"),
    pytest.param("[1, 2]", "per_class: expected an object", id="not-an-object"),
    pytest.param({"11": 1}, r"per_class\.11: not a class of the real data", id="unknown-class"),
    pytest.param({"4": -1}, r"per_class\.4: expected a non-negative integer number of images, got -1", id="negative"),
    pytest.param({"4": 2.5}, r"per_class\.4: expected a non-negative integer number of images, got 2\.5", id="fraction"),
    pytest.param({"4": "3"}, r"per_class\.4: expected a non-negative integer number of images, got '3'", id="string"),
    pytest.param({"4": True}, r"per_class\.4: expected a non-negative integer number of images, got True", id="boolean"),
    pytest.param({"7": None}, r"per_class: no budget for class\(es\) 7", id="class-missing"),
]


@pytest.mark.parametrize(("content", "message"), BUDGET_ERRORS)
def test_a_bad_budget_file_is_refused_naming_the_file_and_key(digits, tmp_path, content, message):
    from synthforge.params import load_params
    from synthforge.stages.seeds import run_seeds

    root, _ = digits
    budget_file = tmp_path / "budget.json"
    if isinstance(content, str):
        budget_file.write_text(content)
    elif isinstance(content, dict):
        per_class = {str(d): 3 for d in range(10)} | content
        budget_file.write_text(json.dumps({"per_class": {k: v for k, v in per_class.items() if v is not None}}))
    p = _with(load_params(root / "params.yaml"), "seeds", budget="file", budget_file=str(budget_file))
    with pytest.raises(BadInput, match=message) as error:
        run_seeds(p, root / "data" / "real", root / "models" / "classifier", tmp_path / "seeds")
    assert str(error.value).startswith(str(budget_file))
    assert not (tmp_path / "seeds").exists()


def test_a_budget_for_a_class_without_real_images_is_refused(digits, tmp_path):
    from synthforge.params import load_params
    from synthforge.stages.seeds import run_seeds

    root, _ = digits
    real = _cut_class(root / "data" / "real", tmp_path / "real", label=3, keep=0)
    budget_file = tmp_path / "budget.json"
    budget_file.write_text(json.dumps({"per_class": {str(d): 5 for d in range(10)}}))
    p = _with(load_params(root / "params.yaml"), "seeds", budget="file", budget_file=str(budget_file))
    with pytest.raises(BadInput, match=r"per_class\.3: 5 images budgeted, but .* has no training image of the class"):
        run_seeds(p, real, root / "models" / "classifier", tmp_path / "seeds")


def test_budget_file_mode_needs_the_file_named(digits, tmp_path):
    from synthforge.params import load_params
    from synthforge.stages.seeds import run_seeds

    root, _ = digits
    p = _with(load_params(root / "params.yaml"), "seeds", budget="file", budget_file=None)
    with pytest.raises(BadInput, match=r"seeds\.budget_file: budget=file needs a budget file"):
        run_seeds(p, root / "data" / "real", root / "models" / "classifier", tmp_path / "seeds")
