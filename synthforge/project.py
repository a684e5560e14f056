"""Project-level work: scaffold a project, run the main job, and the human-readable summaries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from synthforge.errors import BadInput, SynthforgeError
from synthforge.gitutil import git
from synthforge.registry import resolve_registry
from synthforge.resources import DEFAULT_PIPELINE, PIPELINE_FILES, pipeline_dir, recipe_dir

# .cache/ holds LLM responses (a rerun reads them instead of asking again): local, never versioned.
PROJECT_GITIGNORE = "/registry/\n.venv/\n__pycache__/\n/.cache/\n"


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run DVC from this interpreter's environment; `synthforge` stage commands must be on its PATH."""
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env)


def init_project(directory: str | Path, pipeline: str = DEFAULT_PIPELINE) -> Path:
    """A new git + DVC project holding a bundled pipeline: its dvc.yaml, params.yaml, own inputs, and schemas/."""
    target = Path(directory)
    source = pipeline_dir(pipeline)
    if target.exists() and any(target.iterdir()):
        raise BadInput(f"{target}: folder exists and is not empty")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(recipe_dir() / "schemas", target / "schemas")
    for name in PIPELINE_FILES:
        shutil.copy2(source / name, target / name)
    if pipeline != DEFAULT_PIPELINE:  # a named pipeline's folder may carry its own inputs (sources, prompts)
        for extra in sorted(source.iterdir()):
            if extra.is_dir():
                shutil.copytree(extra, target / extra.name)
    (target / ".gitignore").write_text(PROJECT_GITIGNORE)
    git("init", "--quiet", "--initial-branch=main", cwd=target)
    for args in (("init", "--quiet"), ("config", "core.analytics", "false")):
        if _dvc(*args, cwd=target).returncode != 0:
            raise SynthforgeError(f"{target}: dvc {' '.join(args)} failed")
    git("add", "-A", cwd=target)
    git("commit", "--quiet", "-m", "synthforge project scaffold", cwd=target)
    return target


def stage_stats(data_dir: Path) -> list[dict[str, Any]]:
    """stats.json of every stage directory, in pipeline order (by input fingerprints)."""
    from synthforge.stagedir import finished_stages

    return [json.loads((stage.path / "stats.json").read_text()) for stage, _ in finished_stages(data_dir)]


def publish_and_describe(
    params: dict,
    data: Path,
    name: str | None,
    version: str | None,
    registry: str | None,
    project: Path = Path("."),
    to: str | None = None,
    private: bool = False,
):
    """Publish the split stage to `to` (hf://ORG/NAME) or to `name` in the local registry, and say what happened."""
    from synthforge.hub import HUB_PREFIX
    from synthforge.release import from_split_stage
    from synthforge.versions import open_store, publish

    section = params.get("publish") or {}
    if to is not None and not to.startswith(HUB_PREFIX):
        raise BadInput(
            f"--to {to!r}: publish targets are {HUB_PREFIX}ORG/NAME (the Hub); the local registry is --name/--registry"
        )
    target = to or name or section.get("name")
    if not target:
        raise BadInput(f"{params.get('__file__', 'params.yaml')}: give --name (or publish.name), or --to {HUB_PREFIX}ORG/NAME")
    store = open_store(target, resolve_registry(registry, params, project), private=private)
    content = from_split_stage(data, params, project)
    result = publish(store, content, version or section.get("version"), project=project)
    info = result.info
    if result.already_published:
        commit = info.commit[:10]
        print(f"{store.label} v{info.version} is already published with this exact content (commit {commit}); nothing to do.")
    else:
        if result.proposed:
            print(f"no version given: {_why(result)} -> {info.version}")
        counts = ", ".join(f"{s}: {n}" for s, n in info.counts.items())
        where = getattr(store, "repo", None) or store.url
        print(f"published {store.label} v{info.version} ({counts}) -> {where} (tag v{info.version}, commit {info.commit[:10]})")
    print(f"load it with: {store.load_call(info.version, project)}")
    return result


def _why(result) -> str:
    from synthforge.versions import diff_counts

    diff = result.diff
    if diff.old is None:
        return "first version"
    return f"against {diff.old}: {diff_counts(diff)}, a {diff.bump.upper()} release"


def run_demo(project: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from synthforge.params import load_params

    project = project.resolve()
    params = load_params(project / "params.yaml")  # fail on a bad params file before DVC starts
    print(f"$ dvc repro  (in {project})", flush=True)
    if _dvc("repro", cwd=project).returncode != 0:
        raise SynthforgeError("dvc repro failed (see its output above)")
    table = Table("stage", "entered", "kept", "rejected", "rejected by", title="pipeline")
    for s in stage_stats(project / "data"):
        table.add_row(
            s["stage"],
            str(s["entered"]),
            str(s["kept"]),
            str(s["rejected"]),
            ", ".join(f"{k} {v}" for k, v in s["rejected_by"].items()) or "-",
        )
    console = Console()
    console.print(table)
    _print_image_summary(console, project)
    publish_and_describe(params, project / "data" / "split", None, None, None, project)


def _print_image_summary(console, project: Path) -> None:
    """For image pipelines: how good the reference classifier is, and how often it recognises the synthetic images."""
    classifier = project / "models" / "classifier" / "stats.json"
    tagged = project / "data" / "tagged" / "stats.json"
    if classifier.exists():
        stats = json.loads(classifier.read_text())
        console.print(f"reference classifier: {stats['test_accuracy']:.1%} on {stats['test_images']} real test images")
    if tagged.exists() and (fraction := json.loads(tagged.read_text()).get("recognised_fraction")) is not None:
        console.print(f"synthetic images the classifier reads as their intended class: {fraction:.1%}")
