"""The embedded digits pipeline, stage by stage: real digits -> classifier -> adapt -> seeds -> generate -> judge
(format + VoG) -> dedup (phash, also against real) -> tag -> split -> publish. Small settings, one run per session.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import FAST, cli, merge_params, read_manifest, read_rows


def test_classifier_saves_the_vog_checkpoints_and_per_class_accuracy(digits):
    root, stats = digits
    model = root / "models" / "classifier"
    config = json.loads((model / "config.json").read_text())
    assert config["checkpoints"] == ["epoch-004", "epoch-008", "epoch-012"]
    for name in [*config["checkpoints"], "final"]:
        assert (model / f"{name}.safetensors").exists()
    per_class = stats["classifier"]["per_class_accuracy"]
    assert set(per_class) == {str(d) for d in range(10)}
    assert stats["classifier"]["test_accuracy"] > 0.6  # ten classes: chance is 0.1


def test_seeds_are_the_k_lowest_marginal_scores_and_weak_classes_get_more(digits):
    from synthforge.vision.classifier import load_classifier, marginal_scores
    from synthforge.vision.real import read_real

    root, stats = digits
    seeds = pq.read_table(root / "data" / "seeds" / "seeds.parquet").to_pylist()
    real = read_real(root / "data" / "real", "train").to_pylist()
    clf = load_classifier(root / "models" / "classifier")
    scores = marginal_scores(clf.probabilities([r["image"] for r in real]), np.array([r["label"] for r in real]))
    k = round(0.1 * len(real))
    chosen = {s["real_id"] for s in seeds if s["selected"]}
    assert len(chosen) == k
    assert chosen == {real[i]["real_id"] for i in np.argsort(scores, kind="stable")[:k]}
    assert max(s["marginal_score"] for s in seeds if s["selected"]) <= min(
        s["marginal_score"] for s in seeds if not s["selected"]
    )
    # budget: accuracy -> a seed of a less accurate class never gets fewer images than one of a more accurate class
    acc = stats["classifier"]["per_class_accuracy"]
    by_class = {s["label_name"]: s["n_images"] for s in seeds if s["selected"]}
    ranked = sorted(by_class, key=lambda c: acc[c])
    assert [by_class[c] for c in ranked] == sorted(by_class.values(), reverse=True)


def test_generated_images_carry_their_seed_caption_and_generator(digits):
    root, stats = digits
    rows = read_rows(root / "data" / "generated")
    seeds = {s["real_id"]: s for s in pq.read_table(root / "data" / "seeds" / "seeds.parquet").to_pylist()}
    adapter = json.loads((root / "models" / "generator" / "generator.json").read_text())["adapter_hash"]
    assert len(rows) == sum(s["n_images"] for s in seeds.values())
    for row in rows:
        gen = row["provenance"]["generation"]
        (parent,) = gen["parent_ids"]
        assert seeds[parent]["selected"] and seeds[parent]["label"] == row["label"]
        assert gen["seed_marginal_score"] == pytest.approx(seeds[parent]["marginal_score"])
        assert gen["adapter_hash"] == adapter and gen["method"] == "unet-img2img"
        assert gen["caption"]["raw"] == row["label_name"]
        assert json.loads(gen["params"])["strength"] == 0.9
    assert len({r["sample_id"] for r in rows}) == len(rows)


def test_vog_drops_a_quarter_of_each_class_with_reason_and_settings(digits):
    root, stats = digits
    manifest = read_manifest(root / "data" / "judged")
    labels = {r["sample_id"]: r["label"] for r in read_rows(root / "data" / "generated")}
    for label in set(labels.values()):
        entered = [m for m in manifest if labels[m["sample_id"]] == label]
        dropped = [m for m in entered if m["rejected_by"] == "judge.vog"]
        assert len(dropped) == int(np.floor(0.25 * len(entered) + 0.5))
    for m in manifest:
        vog = m["provenance"]["vog"]
        assert vog["direction"] == "drop_lowest" and vog["drop_fraction"] == 0.25 and len(vog["checkpoints"]) == 3
    by_class: dict[int, tuple[list, list]] = {}
    for m in manifest:
        kept, dropped = by_class.setdefault(labels[m["sample_id"]], ([], []))
        (kept if m["kept"] else dropped).append(m["provenance"]["vog"]["normalized"])
    for kept, dropped in by_class.values():
        if kept and dropped:
            assert max(dropped) <= min(kept)  # the lowest-VoG ones went
    rejected = read_rows(root / "data" / "judged", "rejected")
    assert rejected and all("VoG outlier" in r["reason"] for r in rejected)


def test_difficulty_follows_the_classifier_marginal_score(digits):
    root, stats = digits
    for row in read_rows(root / "data" / "tagged"):
        prov = row["provenance"]
        f = json.loads(prov["difficulty_features"])
        level = prov["difficulty"]
        if f["predicted"] != row["label_name"] and f["predicted_probability"] >= 0.8:
            assert level == "adversarial"
        elif f["marginal_score"] >= 0.9:
            assert level == "easy"
        elif f["marginal_score"] >= 0.5:
            assert level == "medium"
        else:
            assert level == "hard"
    assert stats["tag"]["recognised_fraction"] is not None


def test_split_keeps_every_child_of_a_seed_together(digits):
    root, stats = digits
    split_of_parent: dict[str, set] = {}
    for row in read_rows(root / "data" / "split"):
        split_of_parent.setdefault(row["provenance"]["generation"]["parent_ids"][0], set()).add(row["provenance"]["split"])
    assert all(len(s) == 1 for s in split_of_parent.values())
    assert stats["split"]["leakage_check"] == "passed"


def test_publish_carries_images_and_the_card_shows_grids(digits, tmp_path):
    import synthforge

    root, _ = digits
    registry = tmp_path / "registry"
    out = cli("publish", "--registry", str(registry), cwd=root)
    assert out.returncode == 0, out.stderr
    ds = synthforge.load("synth-digits", "1.0.0", registry=registry)
    first = ds["train"][0]
    assert first["image"].size == (8, 8) and isinstance(first["label"], int)
    assert ds["train"].features["label"].names == [str(d) for d in range(10)]


def _planted_project(digits, tmp_path) -> Path:
    """A copy of the judged stage with a real training image and a near-copy of a kept synthetic one planted."""
    import shutil

    from synthforge.stagedir import StageInput, StageWriter
    from synthforge.vision.images import encode_png, to_array
    from synthforge.vision.real import read_real

    root, _ = digits
    work = tmp_path / "proj"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("registry"))
    judged = StageInput.open(work / "data" / "judged")
    rows = [r for batch in judged.iter_rows() for r in batch]
    real = read_real(work / "data" / "real", "train").to_pylist()[0]
    copy_of_real = {**rows[0], "sample_id": "ab" * 12, "image": real["image"], "label": real["label"]}
    copy_of_real["provenance"] = {**rows[0]["provenance"], "sample_id": "ab" * 12, "stages": []}
    pixels = to_array(rows[1]["image"], 1)[:, :, 0].astype(int)
    pixels[0, 0] = min(255, pixels[0, 0] + 3)  # imperceptible change
    near = {**rows[1], "sample_id": "cd" * 12, "image": encode_png(pixels.astype(np.uint8))}
    near["provenance"] = {**rows[1]["provenance"], "sample_id": "cd" * 12, "stages": []}
    for r in rows:
        r["provenance"]["stages"] = r["provenance"]["stages"][:-1]  # StageWriter stamps them again
    with StageWriter(work / "data" / "judged", "judge", judged.schema, judged.info) as w:
        w.write([*rows, copy_of_real, near])
    return work, rows[1]["sample_id"], real["real_id"]


def test_image_dedup_rejects_memorised_copies_and_near_duplicates(digits, tmp_path):
    from synthforge.params import load_params
    from synthforge.stages.dedup import run_dedup

    work, original, real_id = _planted_project(digits, tmp_path)
    with contextlib.chdir(work):
        stats = run_dedup(load_params("params.yaml"), "data/judged", "data/deduped")
    rejected = {r["sample_id"]: r for r in read_rows(work / "data" / "deduped", "rejected")}
    memorised = rejected["ab" * 12]
    assert memorised["rejected_by"] == "dedup.memorised" and real_id in memorised["reason"]
    assert memorised["provenance"]["dedup"]["representative_is_real"] is True
    near = rejected["cd" * 12]
    assert near["rejected_by"] == "dedup.phash"
    assert near["provenance"]["dedup"]["representative_id"] == original
    assert near["provenance"]["dedup"]["distance"] <= 2
    assert stats["memorised_copies"] >= 1 and stats["imagehash_version"]


def test_dvc_repro_runs_the_default_pipeline_and_reruns_only_from_a_changed_stage(tmp_path):
    """The root dvc.yaml as a user runs it: every stage's command, deps and outputs wired right."""
    import subprocess
    import sys

    from synthforge.project import init_project

    root = init_project(tmp_path / "proj")
    tiny = merge_params(
        FAST,
        {
            "classifier": {"epochs": 3},
            "generator": {"unet": {"base_steps": 10, "lora_steps": 5}},
            "seeds": {"budget": "file"},  # the default pipeline's: seeds reads the gaps stage's budget
            "evaluate": {"seeds": 2, "epochs": 2},
        },
    )
    params = merge_params(yaml.safe_load((root / "params.yaml").read_text()), tiny)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def repro():
        out = subprocess.run(
            [sys.executable, "-m", "dvc", "repro"],
            cwd=root,
            capture_output=True,
            text=True,
            env=env,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    stages = ("real", "classifier", "adapt", "gaps", "seeds", "generate", "judge", "dedup", "tag", "split", "evaluate")
    first = repro()
    for stage in stages:
        assert f"Running stage '{stage}'" in first
    assert (root / "data" / "split" / "stats.json").exists()
    budget = json.loads((root / "data" / "gaps" / "budget.json").read_text())["per_class"]
    planned = json.loads((root / "data" / "seeds" / "stats.json").read_text())["per_class"]
    assert {name: c["images"] for name, c in planned.items()} == budget
    verdicts = json.loads((root / "data" / "evaluation" / "metrics.json").read_text())["real + synthetic"]
    assert verdicts["top1_verdict"] in ("helps", "no measurable effect", "hurts")
    params["judge"]["checks"][1]["drop_fraction"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = repro()
    ran = {s for s in stages if f"Running stage '{s}'" in second}
    assert ran == {"judge", "dedup", "tag", "split", "evaluate"}


def test_stable_diffusion_family_runs_from_params(digits, tmp_path):
    """Switching generator.family to stable_diffusion (a tiny random-weight SD 1.x pipeline here) needs only params."""
    import shutil

    from test_stable_diffusion import build_tiny_pipeline

    from synthforge.params import load_params
    from synthforge.stages.generate_images import run_generate_images
    from synthforge.stages.prepare import run_adapt
    from synthforge.stages.seeds import run_seeds
    from synthforge.vision.images import decode_image

    root, _ = digits
    work = tmp_path / "proj"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("registry", "generated", "judged", "deduped", "tagged", "split"))
    base = build_tiny_pipeline(tmp_path / "tiny-sd")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["generator"] = {
        "family": "stable_diffusion",
        "stable_diffusion": {"base": str(base), "resolution": 16, "lora_steps": 2, "train_batch_size": 2},
    }
    params["generate"] = {"modality": "image", "batch_size": 4, "stable_diffusion": {"num_inference_steps": 2, "strength": 0.75}}
    params["seeds"] = {"fraction": None, "k": 3, "images_per_seed": 2, "budget": "uniform"}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with contextlib.chdir(work):
        p = load_params("params.yaml")
        meta = run_adapt(p, "data/real", "models/generator")
        run_seeds(p, "data/real", "models/classifier", "data/seeds")
        stats = run_generate_images(p, "data/seeds", "data/real", "models/generator", "data/generated")
    rows = read_rows(work / "data" / "generated")
    assert stats["kept"] == len(rows) == 6
    for row in rows:
        img = decode_image(row["image"])
        assert img.size == (16, 16) and img.mode == "RGB"
        gen = row["provenance"]["generation"]
        assert gen["method"] == "stable_diffusion-img2img" and gen["model"] == str(base)
        assert gen["adapter_hash"] == meta["adapter_hash"]
        assert gen["prompt_template_id"] and gen["prompt_hash"]
        assert json.loads(gen["params"])["guidance_scale"] == 7.5
    assert len({r["provenance"]["generation"]["batch_id"] for r in rows}) == 2  # 6 images, batches of 4
