"""Publishing versions to the local git registry and loading them back by version."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess

import pytest
from conftest import cli, read_rows, run_pipeline

import synthforge
from synthforge.errors import BadInput, VersionExists
from synthforge.params import load_params
from synthforge.registry import Registry, resolve_registry


@pytest.fixture(scope="module")
def published(project, tmp_path_factory):
    """v1.0.0 from the session project, and v2.0.0 from a copy whose split ratios differ."""
    registry = Registry(tmp_path_factory.mktemp("registry"))
    params = load_params(project / "params.yaml")
    v1 = registry.publish(project / "data" / "split", "evalset", "1.0.0", params, project)
    other = tmp_path_factory.mktemp("other") / "proj"
    shutil.copytree(project, other, ignore=shutil.ignore_patterns(".git", ".dvc", "data"))
    (other / "params.yaml").write_text(
        (other / "params.yaml").read_text().replace("{train: 0.7, validation: 0.15, test: 0.15}", "{train: 0.5, test: 0.5}")
    )
    run_pipeline(other)
    v2 = registry.publish(other / "data" / "split", "evalset", "2.0.0", load_params(other / "params.yaml"), other)
    return registry, v1, v2, other


def _git(repo, *args):
    return subprocess.run(["git", "--git-dir", str(repo), *args], capture_output=True, text=True, check=True).stdout


def test_a_version_is_one_commit_and_one_annotated_tag_with_the_documented_layout(published):
    registry, v1, v2, _ = published
    repo = v1.repo
    assert _git(repo, "tag", "-l").split() == ["v1.0.0", "v2.0.0"]
    assert _git(repo, "cat-file", "-t", "v1.0.0").strip() == "tag"  # annotated
    assert _git(repo, "rev-list", "--count", "main").strip() == "2"
    files = _git(repo, "ls-tree", "-r", "--name-only", "v1.0.0").split()
    assert set(files) == {
        "README.md",
        "synthforge.json",
        "croissant.json",
        "advisories.json",
        "provenance/manifest.parquet",
        "images/difficulty_by_split.png",
        "images/labels_by_split.png",
        "images/judge_scores.png",
        "images/generators.png",
        "data/train-00000-of-00001.parquet",
        "data/validation-00000-of-00001.parquet",
        "data/test-00000-of-00001.parquet",
    }
    assert {f for f in _git(repo, "ls-tree", "-r", "--name-only", "v2.0.0").split() if f.startswith("data/")} == {
        "data/train-00000-of-00001.parquet",
        "data/test-00000-of-00001.parquet",
    }


def test_dataset_card_has_hub_yaml_and_the_provenance_summary(published):
    import yaml

    _, v1, _, _ = published
    card = _git(v1.repo, "show", "v1.0.0:README.md")
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert "synthetic" in meta["tags"] and meta["size_categories"] == ["n<1K"] and meta["source_datasets"] == ["original"]
    assert {f["split"] for f in meta["configs"][0]["data_files"]} == {"train", "validation", "test"}
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == v1.info.counts
    assert "provenance" in {f["name"] for f in meta["dataset_info"]["features"]}
    assert "refund-request" in body and "judge.banned_patterns" in body
    assert 'synthforge.load("evalset", version="1.0.0"' in body


def test_synthforge_json_records_pipeline_params_and_fingerprints(published, project):
    _, v1, _, _ = published
    meta = json.loads(_git(v1.repo, "show", "v1.0.0:synthforge.json"))
    assert meta["pipeline"]["params"]["dedup"]["near"]["threshold"] == 0.9
    assert meta["pipeline"]["dvc.yaml"] == (project / "dvc.yaml").read_text()
    assert [s["stage"] for s in meta["lineage"]] == ["generate", "judge", "dedup", "tag", "split"]
    assert (
        meta["lineage"][-1]["fingerprint"] == json.loads((project / "data" / "split" / "stage.json").read_text())["fingerprint"]
    )


def test_load_gives_each_version_its_own_rows_in_one_process(published, project):
    registry, v1, v2, other = published
    a = synthforge.load("evalset", version="1.0.0", registry=registry.root)
    b = synthforge.load("evalset", "v2.0.0", registry=registry.root)
    assert set(a) == {"train", "validation", "test"} and set(b) == {"train", "test"}
    expected_test = {r["sample_id"] for r in read_rows(project / "data" / "split") if r["provenance"]["split"] == "test"}
    assert set(a["test"]["sample_id"]) == expected_test
    assert set(b["test"]["sample_id"]) == {
        r["sample_id"] for r in read_rows(other / "data" / "split") if r["provenance"]["split"] == "test"
    }
    assert set(b["test"]["sample_id"]) != expected_test
    row = a["test"][0]
    assert row["provenance"]["split"] == "test" and row["provenance"]["generation"]["batch_id"]
    again = synthforge.load("evalset", version="1.0.0", registry=registry.root)
    assert again["test"]["sample_id"] == a["test"]["sample_id"]


def test_load_of_an_unknown_version_names_the_versions_there_are(published):
    registry, *_ = published
    with pytest.raises(BadInput, match=r"no version 9.9.9 .*have: 1.0.0, 2.0.0"):
        synthforge.load("evalset", version="9.9.9", registry=registry.root)


def test_republishing_the_same_content_is_a_no_op(published, project):
    registry, v1, _, _ = published
    again = registry.publish(project / "data" / "split", "evalset", "1.0.0", load_params(project / "params.yaml"), project)
    assert again.already_published and again.info.commit == v1.info.commit
    assert _git(v1.repo, "rev-list", "--count", "main").strip() == "2"


def test_other_content_under_an_existing_version_is_refused(published, project):
    registry, v1, v2, other = published
    with pytest.raises(VersionExists, match="1.0.0 already exists"):
        registry.publish(other / "data" / "split", "evalset", "1.0.0", load_params(other / "params.yaml"), other)
    result = cli("publish", "--name", "evalset", "--version", "2.0.0", "--registry", str(registry.root), cwd=project)
    assert result.returncode == 2 and "v2.0.0 already exists" in result.stderr
    assert _git(v1.repo, "tag", "-l").split() == ["v1.0.0", "v2.0.0"]


def test_versions_lists_counts_and_dates(published):
    registry, *_ = published
    out = cli("versions", "--registry", str(registry.root))
    assert out.returncode == 0, out.stderr
    assert "evalset" in out.stdout and "1.0.0" in out.stdout and "2.0.0" in out.stdout
    infos = registry.versions("evalset")
    assert [v.version for v in infos] == ["1.0.0", "2.0.0"] and infos[0].total == sum(infos[0].counts.values())


def test_registry_location_precedence(tmp_path, monkeypatch):
    params = {"publish": {"registry": "from-params"}}
    monkeypatch.delenv("SYNTHFORGE_REGISTRY", raising=False)
    assert resolve_registry(None, {}, tmp_path) == tmp_path / "registry"
    assert resolve_registry(None, params, tmp_path) == tmp_path / "from-params"
    monkeypatch.setenv("SYNTHFORGE_REGISTRY", str(tmp_path / "from-env"))
    assert resolve_registry(None, params, tmp_path) == tmp_path / "from-env"
    assert resolve_registry(str(tmp_path / "from-cli"), params, tmp_path) == tmp_path / "from-cli"


def test_publish_refuses_a_stage_that_is_not_split(project, tmp_path):
    with pytest.raises(BadInput, match="publish takes the output of the split stage"):
        Registry(tmp_path).publish(project / "data" / "tagged", "x", "1.0.0", {}, project)
    with pytest.raises(BadInput, match="not semantic"):
        Registry(tmp_path).publish(project / "data" / "split", "x", "1.0", {}, project)
    assert not list(tmp_path.glob("*.git"))


def test_a_concurrent_publish_is_detected_not_lost(project, tmp_path, monkeypatch):
    """If main moves between reading it and updating it, the publish fails and removes its tag."""
    import synthforge.registry as reg_mod

    registry = Registry(tmp_path)
    params = load_params(project / "params.yaml")
    first = registry.publish(project / "data" / "split", "evalset", "1.0.0", params, project)
    real_git = reg_mod.git

    def racing_git(*args, **kwargs):
        if "update-ref" in args:  # someone else's commit lands on main first
            real_git(
                "--git-dir",
                str(first.repo),
                "update-ref",
                "refs/heads/main",
                real_git(
                    "--git-dir",
                    str(first.repo),
                    "commit-tree",
                    f"{first.info.commit}^{{tree}}",
                    "-p",
                    first.info.commit,
                    "-m",
                    "other",
                ),
            )
        return real_git(*args, **kwargs)

    monkeypatch.setattr(reg_mod, "git", racing_git)
    with pytest.raises(reg_mod.ConcurrentPublish, match="concurrent publish"):
        with contextlib.chdir(project):
            registry.publish(project / "data" / "split", "evalset", "3.0.0", params, project)
    monkeypatch.setattr(reg_mod, "git", real_git)
    assert [v.version for v in registry.versions("evalset")] == ["1.0.0"]
