"""`synthforge evaluate`: settings over seeds, verdicts per metric, outputs DVC reads, and the card that says so."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from synthforge.errors import BadInput
from synthforge.evaluate import run_evaluate
from synthforge.metrics import METRICS
from synthforge.params import load_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"seeds": 3, "epochs": 15, "batch_size": 32}


def _params(project: Path, tmp_path: Path, evaluate: dict) -> dict:
    """The project's params with an `evaluate` section of our own, in a file of its own (the project stays as it is)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"] = {**FAST, **evaluate}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return load_params(path)


def _mislabelled_copy(project: Path, out: Path) -> Path:
    """A split-stage folder whose train split is every real training image labelled as the next class: synthetic data
    that looks right and is wrong, which must hurt."""
    from synthforge.vision.real import read_real

    split = project / "data" / "split"
    shutil.copytree(split, out)
    shards = sorted((out / "samples").glob("*.parquet"))
    template = pq.read_table(shards[0])
    provenance = template.column("provenance")[0].as_py()
    real = read_real(project / "data" / "real", "train").to_pylist()
    rows = []
    for r in real:
        label = (r["label"] + 1) % 10
        sid = hashlib.sha256(f"wrong-{r['real_id']}".encode()).hexdigest()  # a sample id of its own
        rows.append(
            {
                **template.slice(0, 1).to_pylist()[0],
                "sample_id": sid,
                "image": r["image"],
                "label": label,
                "label_name": str(label),
                "provenance": {**provenance, "sample_id": sid, "split": "train"},
            }
        )
    for shard in shards:
        shard.unlink()
    pq.write_table(pa.Table.from_pylist(rows, schema=template.schema), shards[0])
    return out


@pytest.fixture(scope="module")
def evaluation(digits, tmp_path_factory):
    project, _ = digits
    tmp = tmp_path_factory.mktemp("evaluate")
    bad = _mislabelled_copy(project, tmp / "mislabelled")
    params = _params(
        project,
        tmp,
        {
            "settings": [
                {"name": "real only"},
                {"name": "real + synthetic", "synthetic": "data/split", "ratio": 0.5},
                {"name": "real + mislabelled", "synthetic": str(bad), "ratio": 1.0},
                {"name": "synthetic only", "real": False, "synthetic": "data/split"},
            ]
        },
    )
    out = project / "data" / "evaluation"
    result = run_evaluate(params, project / "data" / "real", project / "models" / "classifier", out, project=project)
    return project, out, result


def test_every_setting_is_scored_per_seed_overall_and_per_difficulty(evaluation):
    project, out, result = evaluation
    assert result["seeds"] == [20261121, 20261122, 20261123]
    test_images = pq.read_metadata(project / "data" / "real" / "test.parquet").num_rows
    assert sum(result["test_difficulty"].values()) == test_images
    for name, runs in result["runs"].items():
        assert len(runs) == 3, name
        for run in runs:
            assert run["overall"]["n"] == test_images
            assert sum(level["n"] for level in run["by_difficulty"].values()) == test_images
            assert set(METRICS) <= set(run["overall"])
    # Seeds give different models: the spread across seeds is measured, not assumed.
    assert result["comparison"]["settings"]["real only"]["overall"]["top1"]["std"] > 0


def test_mislabelled_synthetic_data_is_reported_as_hurting(evaluation):
    _, _, result = evaluation
    verdicts = result["comparison"]["settings"]["real + mislabelled"]["verdicts"]
    assert verdicts["top1"]["verdict"] == "hurts"
    assert verdicts["top1"]["delta"] < 0
    assert verdicts["macro_f1"]["verdict"] == "hurts"
    # The baseline is not compared with itself.
    assert not result["comparison"]["settings"]["real only"].get("verdicts")


def test_outputs_are_dvc_metrics_a_table_and_plots(evaluation):
    _, out, result = evaluation
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"real only", "real + synthetic", "real + mislabelled", "synthetic only"}
    mean_top1 = result["comparison"]["settings"]["real + synthetic"]["overall"]["top1"]["mean"]
    assert metrics["real + synthetic"]["top1"] == mean_top1
    assert metrics["real + mislabelled"]["top1_verdict"] == "hurts"
    summary = (out / "summary.md").read_text()
    assert "| real + mislabelled |" in summary and "hurts" in summary
    for png in ("metrics.png", "per_class_accuracy.png"):
        with Image.open(out / png) as image:
            assert image.size[0] >= 400
    stored = json.loads((out / "evaluation.json").read_text())
    split_fp = json.loads((out.parent / "split" / "stage.json").read_text())["fingerprint"]
    assert stored["settings"][1]["source"]["fingerprint"] == split_fp


def test_the_published_card_says_whether_it_helped(evaluation, tmp_path):
    from synthforge.project import publish_and_describe

    project, _, result = evaluation
    params = load_params(project / "params.yaml")
    published = publish_and_describe(params, project / "data" / "split", "synth-eval", None, str(tmp_path / "reg"), project)
    tree = published.store.files(published.info)
    card = (tree / "README.md").read_text()
    assert "## Does the synthetic data help?" in card
    verdict_line = next(line for line in card.splitlines() if line.startswith("- real + mislabelled vs real only:"))
    assert "hurts: top1" in verdict_line
    assert "| real + mislabelled |" in card
    assert (tree / "images" / "evaluation_metrics.png").exists()
    meta = json.loads((tree / "synthforge.json").read_text())
    assert meta["evaluation"]["comparison"] == result["comparison"]


def test_an_evaluation_of_other_samples_is_left_out_of_the_card(evaluation, tmp_path):
    from synthforge.release import evaluation_of
    from synthforge.stagedir import StageInput

    project, out, _ = evaluation
    copy = tmp_path / "data"
    shutil.copytree(project / "data" / "split", copy / "split")
    shutil.copytree(out, copy / "evaluation")
    stale = json.loads((copy / "evaluation" / "evaluation.json").read_text())
    for setting in stale["settings"]:
        if setting["source"]:
            setting["source"]["fingerprint"] = "0" * 64
    (copy / "evaluation" / "evaluation.json").write_text(json.dumps(stale))
    assert evaluation_of(StageInput.open(copy / "split")) is None


@pytest.mark.parametrize(
    ("evaluate", "message"),
    [
        ({"settings": [{"name": "a"}], "baseline": "real only"}, "baseline: 'real only' is not one of the settings"),
        ({"settings": [{"name": "real only"}, {"name": "x", "real": False}]}, "(x): trains on nothing"),
        ({"settings": [{"name": "real only"}, {"name": "x", "synthetic": "nowhere@1.0.0"}]}, "nowhere"),
        ({"settings": [{"name": "real only"}, {"name": "x", "synthetic": "data/split", "ratio": -1}]}, "ratio: must be >= 0"),
        ({"settings": [{"name": "real only"}, {"name": "x", "synthetic": "data/split", "strategy": "best"}]}, "strategy"),
        ({"settings": [{"name": "real only"}, {"name": "real only"}]}, "names must be unique"),
        ({"settings": [{"name": "real only", "colour": "red"}]}, "colour"),
    ],
)
def test_bad_settings_are_named(digits, tmp_path, evaluate, message):
    project, _ = digits
    params = _params(project, tmp_path, {**evaluate, "epochs": 1, "seeds": 1})
    with pytest.raises(BadInput, match=None) as err:
        run_evaluate(params, project / "data" / "real", project / "models" / "classifier", tmp_path / "out", project=project)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()
