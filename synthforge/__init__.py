"""synthforge: versioned synthetic datasets with per-sample provenance."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(name: str, version: str, registry: str | None = None, **kwargs):
    """Load a published version as a `datasets.DatasetDict`, pinned to that version's commit."""
    from synthforge.registry import load as _load

    return _load(name, version, registry=registry, **kwargs)
