"""The on-the-fly loop (GenDataAgent Algorithm 1) on tiny models: 100 real digits, a tiny UNet, a tiny classifier;
3 warm-up iterations and 2 on-the-fly ones of 2 epochs each, online and offline (a pool made by seeds + generate)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import merge_params, read_manifest, read_rows

from synthforge.errors import BadInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = {
    "__file__": "params.yaml",
    "seed": 11,
    "real": {"source": "digits", "per_class": 10},
    "classifier": {"epochs": 2, "checkpoints": 2, "width": 8, "batch_size": 32},
    "generator": {"family": "unet", "unet": {"block_out_channels": [8, 16], "base_steps": 10, "lora_steps": 2, "batch_size": 32}},
    "seeds": {"caption_source": "class_name"},
    "generate": {"modality": "image", "batch_size": 32, "unet": {"sample_steps": 10}},
    "agent": {
        "iterations": 2,
        "warmup": 3,
        "epochs": 2,
        "fraction": 0.2,
        "images_per_seed": 2,
        "vog": {"checkpoints": 3, "drop_fraction": 0.25},
    },
}
K = 20  # 0.2 of the 100 real training images
ON_THE_FLY = [4, 5]  # Algorithm 1 numbers iterations from 1; the warm-up takes 1-3


def run(root: Path, name: str, extra: dict | None = None, pool: str | None = None) -> dict:
    from synthforge.onthefly import run_agent

    params = merge_params(PARAMS, extra or {})
    with contextlib.chdir(root):
        return run_agent(params, "data/real", "models/generator", f"data/{name}", f"models/{name}", pool)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Real digits (10 per class), a tiny adapted generator, and one online run of the loop."""
    from synthforge.stages.prepare import run_adapt, run_real

    root = tmp_path_factory.mktemp("onthefly")
    with contextlib.chdir(root):
        run_real(PARAMS, "data/real")
        run_adapt(PARAMS, "data/real", "models/generator")
    return root, run(root, "agent")


def iteration_of(row: dict) -> int:
    (tag,) = [t for t in row["provenance"]["tags"] if t.startswith("agent-iteration:")]
    return int(tag.split(":")[1])


def labels_of(stage: Path) -> dict[str, int]:
    return {r["sample_id"]: r["label"] for kind in ("samples", "rejected") for r in read_rows(stage, kind)}


def test_every_on_the_fly_iteration_is_one_batch_recording_its_iteration_and_mode(project):
    root, stats = project
    manifest = read_manifest(root / "data" / "agent")
    batches: dict[str, set] = {}
    for m in manifest:
        gen = m["provenance"]["generation"]
        params = json.loads(gen["params"])
        assert params["mode"] == "online" and params["iteration"] == iteration_of(m)
        assert "agent-mode:online" in m["provenance"]["tags"]
        batches.setdefault(gen["batch_id"], set()).add(params["iteration"])
    fp8 = json.loads((root / "data" / "agent" / "stage.json").read_text())["fingerprint"][:8]
    assert batches == {f"{fp8}-iter-{i:02d}": {i} for i in ON_THE_FLY}
    assert [r["stage"] for r in stats["iterations"]] == ["warmup"] * 3 + ["on-the-fly"] * 2
    for record in stats["iterations"][3:]:
        assert record["marginal"]["selected"] == K and record["images"] == 2 * K  # m = 2 images per marginal example
    assert stats["entered"] == len(manifest) == len(ON_THE_FLY) * 2 * K


def test_vog_drops_a_quarter_of_each_class_in_each_iteration_with_its_reason(project):
    root, stats = project
    stage = root / "data" / "agent"
    label = labels_of(stage)
    manifest = read_manifest(stage)
    for i in ON_THE_FLY:
        by_class: dict[int, list] = {}
        for m in manifest:
            if iteration_of(m) == i:
                by_class.setdefault(label[m["sample_id"]], []).append(m)
        for entered in by_class.values():
            dropped = [m for m in entered if not m["kept"]]
            assert len(dropped) == math.floor(0.25 * len(entered) + 0.5)
            assert all(m["rejected_by"] == "agent.vog" and m["reason"].startswith("VoG outlier") for m in dropped)
            kept_z = [m["provenance"]["vog"]["normalized"] for m in entered if m["kept"]]
            assert max(m["provenance"]["vog"]["normalized"] for m in dropped) <= min(kept_z)  # the lowest VoG went
        record = stats["iterations"][i - 1]
        assert record["dropped"] == sum(len([m for m in e if not m["kept"]]) for e in by_class.values())
        assert record["trained_on"] == {"real": 100, "synthetic": record["kept"]}  # this iteration's kept images only


def test_every_image_comes_from_a_marginal_example_of_its_iteration_scored_by_the_current_classifier(project):
    from synthforge.vision.classifier import load_classifier, marginal_scores
    from synthforge.vision.real import read_real

    root, _ = project
    marginal = pq.read_table(root / "data" / "agent" / "marginal.parquet").to_pylist()
    real = read_real(root / "data" / "real", "train").to_pylist()
    clf = load_classifier(root / "models" / "agent")
    labels = np.array([r["label"] for r in real])
    for i in ON_THE_FLY:
        rows = {r["real_id"]: r for r in marginal if r["iteration"] == i}
        # Scored by the classifier as it stood at the end of the previous iteration (its checkpoint).
        (previous,) = clf.checkpoints([f"epoch-{2 * (i - 1):03d}"])
        probs = previous(clf.tensor([r["image"] for r in real])).softmax(1).detach().numpy()
        expected = marginal_scores(probs, labels)
        assert [rows[r["real_id"]]["marginal_score"] for r in real] == pytest.approx(expected.tolist(), abs=1e-6)
        chosen = [r for r in rows.values() if r["selected"]]
        assert len(chosen) == K and all(r["n_images"] == 2 for r in chosen)
        assert max(r["marginal_score"] for r in chosen) <= min(r["marginal_score"] for r in rows.values() if not r["selected"])
    by_iteration = {(r["iteration"], r["real_id"]): r for r in marginal}
    for m in read_manifest(root / "data" / "agent"):
        gen = m["provenance"]["generation"]
        (parent,) = gen["parent_ids"]
        seed = by_iteration[(iteration_of(m), parent)]
        assert seed["selected"] and gen["seed_marginal_score"] == pytest.approx(seed["marginal_score"])
        assert gen["caption"]["raw"] == seed["label_name"] and m["provenance"]["source"]["record_id"] == parent


def test_the_classifier_folder_loads_and_vog_compared_the_last_three_checkpoints(project):
    import torch

    from synthforge.vision.classifier import load_classifier
    from synthforge.vision.real import read_real
    from synthforge.vision.vog import vog_scores

    root, stats = project
    folder = root / "models" / "agent"
    clf = load_classifier(folder)
    assert clf.class_names == [str(d) for d in range(10)] and clf.image_size == 8
    assert clf.config["checkpoints"] == ["epoch-002", "epoch-004", "epoch-006", "epoch-008", "epoch-010"]
    rows = {r["sample_id"]: r for kind in ("samples", "rejected") for r in read_rows(root / "data" / "agent", kind)}
    for i in ON_THE_FLY:
        window = [f"epoch-{2 * j:03d}" for j in range(i - 3, i)]  # the checkpoints of the three iterations before
        members = [r for r in rows.values() if iteration_of(r) == i]
        assert all(r["provenance"]["vog"]["checkpoints"] == window for r in members)
        digest = hashlib.sha256(b"".join((folder / f"{n}.safetensors").read_bytes() for n in window)).hexdigest()
        assert {r["provenance"]["vog"]["classifier"] for r in members} == {digest}
        recomputed = vog_scores(
            clf.checkpoints(window), clf.tensor([r["image"] for r in members]), torch.tensor([r["label"] for r in members])
        )
        assert recomputed.tolist() == pytest.approx([r["provenance"]["vog"]["score"] for r in members])
    saved = json.loads((folder / "stats.json").read_text())
    assert [r["iteration"] for r in saved["iterations"]] == [1, 2, 3, 4, 5]
    assert all(set(r["per_class_accuracy"]) == set(clf.class_names) for r in saved["iterations"])
    assert [r["kept"] for r in saved["iterations"][3:]] == [stats["iterations"][i - 1]["kept"] for i in ON_THE_FLY]
    test = read_real(root / "data" / "real", "test").to_pylist()
    predicted = clf.probabilities([r["image"] for r in test]).argmax(1)
    assert saved["test_accuracy"] == round(float((predicted == np.array([r["label"] for r in test])).mean()), 4)


def test_the_same_seed_gives_the_same_images_and_classifier(project):
    root, _ = project
    run(root, "again")
    first, again = read_manifest(root / "data" / "agent"), read_manifest(root / "data" / "again")
    assert [(m["sample_id"], m["kept"]) for m in first] == [(m["sample_id"], m["kept"]) for m in again]
    assert (root / "models" / "agent" / "final.safetensors").read_bytes() == (
        root / "models" / "again" / "final.safetensors"
    ).read_bytes()


def test_accumulate_trains_on_every_image_kept_so_far(project):
    root, _ = project
    stats = run(root, "accumulate", {"agent": {"accumulate": True}})
    fourth, fifth = stats["iterations"][3], stats["iterations"][4]
    assert fourth["trained_on"]["synthetic"] == fourth["kept"]
    assert fifth["trained_on"]["synthetic"] == fourth["kept"] + fifth["kept"]


@pytest.fixture(scope="module")
def offline(project):
    """A pool of 2 images for every real training image (seeds + generate), then 3 offline iterations taking one
    unused image from each of 60 marginal examples: 2 x 60 > 100, so some real image is marginal twice or more."""
    from synthforge.stages.generate_images import run_generate_images
    from synthforge.stages.prepare import run_classifier
    from synthforge.stages.seeds import run_seeds

    root, _ = project
    pool_params = merge_params(PARAMS, {"seeds": {"fraction": 1.0, "images_per_seed": 2, "budget": "uniform"}})
    with contextlib.chdir(root):
        run_classifier(pool_params, "data/real", "models/classifier")
        run_seeds(pool_params, "data/real", "models/classifier", "data/seeds")
        run_generate_images(pool_params, "data/seeds", "data/real", "models/generator", "data/pool")
    agent = {"mode": "offline", "iterations": 3, "fraction": 0.6, "images_per_seed": 1}
    stats = run(root, "offline", {"agent": agent}, pool="data/pool")
    return root, stats


def test_offline_mode_takes_unused_pool_images_of_the_marginal_examples(offline):
    root, stats = offline
    pool = {r["sample_id"]: r for r in read_rows(root / "data" / "pool")}
    manifest = read_manifest(root / "data" / "offline")
    assert stats["entered"] == len(manifest) == len(pool) == 200  # every pool image leaves the stage once
    taken = [m for m in manifest if m["rejected_by"] != "agent.unselected"]
    assert {m["sample_id"] for m in taken} <= set(pool) and len({m["sample_id"] for m in taken}) == len(taken)
    for m in taken:
        prov, original = m["provenance"], pool[m["sample_id"]]["provenance"]
        assert prov["generation"] == original["generation"]  # generated before the loop, not by it
        assert "agent-mode:offline" in prov["tags"] and prov["vog"] is not None
    marginal = pq.read_table(root / "data" / "offline" / "marginal.parquet").to_pylist()
    times_marginal: dict[str, int] = {}
    for r in marginal:
        times_marginal[r["real_id"]] = times_marginal.get(r["real_id"], 0) + r["selected"]
    per_parent: dict[str, int] = {}
    for m in taken:
        (parent,) = m["provenance"]["generation"]["parent_ids"]
        (seed,) = [r for r in marginal if r["iteration"] == iteration_of(m) and r["real_id"] == parent]
        assert seed["selected"]
        per_parent[parent] = per_parent.get(parent, 0) + 1
    # one new pool image each time a real image is marginal, until its two are used up
    assert per_parent == {p: min(n, 2) for p, n in times_marginal.items() if n}
    assert any(n > 1 for n in times_marginal.values())
    for r in marginal:
        before = sum(m["selected"] for m in marginal if m["real_id"] == r["real_id"] and m["iteration"] < r["iteration"])
        assert r["n_images"] == (1 if r["selected"] and before < 2 else 0)
    unselected = [m for m in manifest if m["rejected_by"] == "agent.unselected"]
    assert len(unselected) == 200 - len(taken) and all(m["reason"].startswith("not taken") for m in unselected)
    assert [r["images"] for r in stats["iterations"][3:]] == [sum(iteration_of(m) == i for m in taken) for i in (4, 5, 6)]


def test_mode_pool_and_vog_window_mistakes_are_named(project, tmp_path):
    from synthforge.onthefly import agent_options

    root, _ = project
    with pytest.raises(BadInput, match=r"agent.mode is offline: give the pre-generated pool"):
        run(root, "bad", {"agent": {"mode": "offline"}})
    with pytest.raises(BadInput, match=r"--pool data/pool: a pool is only read in offline mode"):
        run(root, "bad", pool="data/pool")
    with pytest.raises(BadInput, match=r"agent.vog.checkpoints: .* at most warmup \(3\)"):
        agent_options(merge_params(PARAMS, {"agent": {"vog": {"checkpoints": 4}}}))
    with pytest.raises(BadInput, match=r"agent.vog.direction: must be one of drop_lowest, drop_highest"):
        agent_options(merge_params(PARAMS, {"agent": {"vog": {"direction": "lowest"}}}))
    with pytest.raises(BadInput, match=r"agent.mode: must be one of online, offline, got 'offine'"):
        agent_options(merge_params(PARAMS, {"agent": {"mode": "offine"}}))
    assert not (root / "data" / "bad").exists() and not (root / "models" / "bad").exists()


def test_the_on_the_fly_pipeline_validates_and_its_later_stages_take_the_agent_output(project):
    from synthforge.evaluate import run_evaluate
    from synthforge.onthefly import agent_options
    from synthforge.params import load_params
    from synthforge.stages.dedup import run_dedup
    from synthforge.stages.judge import run_judge
    from synthforge.stages.split import run_split
    from synthforge.stages.tag import run_tag

    folder = Path(__file__).resolve().parent.parent / "pipelines" / "on-the-fly"
    params = load_params(folder / "params.yaml")
    options = agent_options(params)
    assert options.mode == "online" and options.warmup == 3 and options.vog.checkpoints == 3
    stages = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["real", "adapt", "agent", "judge", "dedup", "tag", "split", "evaluate"]
    assert (
        "--out data/agent --classifier-out models/agent" in stages["agent"]["cmd"] and "models/agent" in stages["agent"]["outs"]
    )
    assert "--in data/agent" in stages["judge"]["cmd"] and "models/agent" in stages["tag"]["deps"]

    root, stats = project
    with contextlib.chdir(root):
        run_judge(params, "data/agent", "data/judged")
        run_dedup(params, "data/judged", "data/deduped")
        tagged = run_tag(params, "data/deduped", "data/tagged")
        split = run_split(params, "data/tagged", "data/split")
        quick = {**params, "evaluate": {**params["evaluate"], "seeds": 2, "epochs": 1}}
        evaluation = run_evaluate(quick, "data/real", "models/agent", "data/evaluation")
    assert tagged["entered"] > 0 and split["leakage_check"] == "passed"
    split_fingerprint = json.loads((root / "data" / "split" / "stage.json").read_text())["fingerprint"]
    assert evaluation["settings"][1]["source"]["fingerprint"] == split_fingerprint
    assert set(evaluation["comparison"]["settings"]) == {"real only", "real + on-the-fly"}
    for row in read_rows(root / "data" / "split"):
        assert json.loads(row["provenance"]["difficulty_features"])["classifier"] == "models/agent"
        assert row["provenance"]["vog"]["checkpoints"] and iteration_of(row) in ON_THE_FLY
