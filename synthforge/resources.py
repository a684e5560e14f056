"""Where the bundled recipe files live.

The repository root holds the default recipe (dvc.yaml, params.yaml, schemas/, sources/, prompts/) once, and
the wheel ships the same files inside the package as `synthforge/_recipe/` (see pyproject.toml). An editable
install reads them from the checkout.
"""

from __future__ import annotations

from pathlib import Path

RECIPE_FILES = ("dvc.yaml", "params.yaml", "schemas", "sources", "prompts")

_PACKAGE_DIR = Path(__file__).resolve().parent


def recipe_dir() -> Path:
    packaged = _PACKAGE_DIR / "_recipe"
    if packaged.is_dir():
        return packaged
    return _PACKAGE_DIR.parent


def schema_path(name: str) -> Path:
    """A schema synthforge itself owns (provenance, params), independent of the project's own copies."""
    return recipe_dir() / "schemas" / name
