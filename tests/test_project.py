"""The project as a user meets it: init, dvc repro, the demo, the command line's start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import cli


def _dvc(*args, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_help_does_not_import_the_heavy_libraries():
    heavy = ("pyarrow", "datasets", "duckdb", "torch", "jsonschema", "numpy")
    code = f"import sys, synthforge.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert cli("--help").returncode == 0


def test_init_scaffolds_a_git_and_dvc_project(tmp_path):
    from synthforge.project import init_project

    fresh_project = init_project(tmp_path / "evalset", pipeline="text-eval")
    for name in (
        "dvc.yaml",
        "params.yaml",
        "schemas/provenance.schema.json",
        "schemas/params.schema.json",
        "sources",
        "prompts",
        "docs",
        "protected",
        "rubrics",
        "reviews",
        ".dvc/config",
    ):
        assert (fresh_project / name).exists(), name
    assert "analytics = false" in (fresh_project / ".dvc" / "config").read_text()
    log = subprocess.run(["git", "log", "--oneline"], cwd=fresh_project, capture_output=True, text=True, check=True).stdout
    assert len(log.splitlines()) == 1
    refused = cli("init", str(fresh_project))
    assert refused.returncode == 2 and "not empty" in refused.stderr


def test_dvc_repro_reruns_only_what_changed_and_the_demo_publishes_once(fresh_project):
    first = _dvc("repro", cwd=fresh_project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert all(f"Running stage '{s}'" in first.stdout for s in ("generate", "judge", "dedup", "tag", "split"))

    second = _dvc("repro", cwd=fresh_project)
    assert "Running stage" not in second.stdout and second.stdout.count("didn't change") == 5

    params = fresh_project / "params.yaml"
    params.write_text(params.read_text().replace("max_chars: 4000", "max_chars: 400"))
    third = _dvc("repro", cwd=fresh_project)
    assert third.returncode == 0, third.stdout + third.stderr
    ran = [s for s in ("generate", "judge", "dedup", "tag", "split") if f"Running stage '{s}'" in third.stdout]
    assert ran == ["judge", "dedup", "tag", "split"]
    assert "judge.length" in (fresh_project / "data" / "judged" / "stats.json").read_text()

    demo = cli("demo", cwd=fresh_project)
    assert demo.returncode == 0, demo.stderr
    assert "published synth-support-eval v1.0.0" in demo.stdout and "synthforge.load(" in demo.stdout
    for stage in ("generate", "judge", "dedup", "tag", "split"):
        assert stage in demo.stdout
    again = cli("demo", cwd=fresh_project)
    assert again.returncode == 0, again.stderr
    assert "already published" in again.stdout and "v1.0.0" in again.stdout
    assert (fresh_project / "registry" / "synth-support-eval.git").is_dir()


def test_init_scaffolds_the_digits_pipeline_by_default_and_names_unknown_ones(tmp_path):
    out = cli("init", str(tmp_path / "digits"))
    assert out.returncode == 0, out.stderr
    dvc_yaml = (tmp_path / "digits" / "dvc.yaml").read_text()
    for stage in ("real", "classifier", "adapt", "seeds", "generate", "judge", "dedup", "tag", "split"):
        assert f"  {stage}:" in dvc_yaml
    assert not (tmp_path / "digits" / "sources").exists()
    bad = cli("init", str(tmp_path / "other"), "--pipeline", "nope")
    assert bad.returncode == 2 and "no bundled pipeline 'nope'" in bad.stderr and "text-eval" in bad.stderr
    assert not (tmp_path / "other").exists()
