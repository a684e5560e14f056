"""Methods are picked by name from params.yaml: built-ins plus third-party entry points.

A package adds its own with an entry point in the group `synthforge.<kind>` (kinds: generators, checks),
pointing at a class with the same interface as the built-ins.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from synthforge.errors import BadInput


def resolve(kind: str, name: str, builtins: dict[str, type], where: str, params_file: str) -> type:
    if name in builtins:
        return builtins[name]
    for ep in entry_points(group=f"synthforge.{kind}"):
        if ep.name == name:
            return ep.load()
    known = sorted(set(builtins) | {ep.name for ep in entry_points(group=f"synthforge.{kind}")})
    raise BadInput(f"{params_file}: {where}.name: unknown {kind[:-1]} {name!r} (known: {', '.join(known)})")
