"""synthforge: versioned synthetic datasets with per-sample provenance."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(name: str, version: str, registry: str | None = None, **kwargs):
    """Load a published version (a local registry name, or hf://ORG/NAME) as a `datasets.DatasetDict`, pinned to
    that version's commit. A version that a later quarantine marked as affected loads with a warning."""
    from synthforge.versions import load as _load

    return _load(name, version, registry=registry, **kwargs)
