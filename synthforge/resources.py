"""Where the bundled pipelines live.

The repository root holds the default pipeline (dvc.yaml, params.yaml) and the JSON Schemas once; more ready
pipelines live in `pipelines/<name>/`. The wheel ships the same files inside the package as
`synthforge/_recipe/` (see pyproject.toml); an editable install reads them from the checkout.
"""

from __future__ import annotations

from pathlib import Path

from synthforge.errors import BadInput

DEFAULT_PIPELINE = "digits"  # the root dvc.yaml: GenDataAgent on scikit-learn's digits
PIPELINE_FILES = ("dvc.yaml", "params.yaml")

_PACKAGE_DIR = Path(__file__).resolve().parent


def recipe_dir() -> Path:
    packaged = _PACKAGE_DIR / "_recipe"
    if packaged.is_dir():
        return packaged
    return _PACKAGE_DIR.parent


def pipeline_names() -> list[str]:
    extra = recipe_dir() / "pipelines"
    return (
        [DEFAULT_PIPELINE, *sorted(p.name for p in extra.iterdir() if (p / "dvc.yaml").exists())]
        if extra.is_dir()
        else [DEFAULT_PIPELINE]
    )


def pipeline_dir(name: str) -> Path:
    """The folder holding a bundled pipeline's dvc.yaml, params.yaml and its own inputs (sources, prompts)."""
    if name == DEFAULT_PIPELINE:
        return recipe_dir()
    path = recipe_dir() / "pipelines" / name
    if not (path / "dvc.yaml").exists():
        raise BadInput(f"no bundled pipeline {name!r} (have: {', '.join(pipeline_names())})")
    return path


def schema_path(name: str) -> Path:
    """A schema synthforge itself owns (provenance, params), independent of the project's own copies."""
    return recipe_dir() / "schemas" / name
