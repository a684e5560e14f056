"""Load and validate `params.yaml`; parse a pluggable method's own options.

Every error names the file and the key path (`params.yaml: judge.checks[2].max_chars: ...`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

from synthforge.errors import BadInput
from synthforge.resources import schema_path


def key_path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


@functools.cache
def _params_validator():
    import jsonschema

    schema = json.loads(schema_path("params.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def load_params(path: str | Path) -> dict[str, Any]:
    """Read params.yaml and validate it against schemas/params.schema.json."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: params file not found")
    try:
        params = _parse(path.read_bytes(), path)
    except RecursionError:  # the YAML parser and the schema check recurse once per level of nesting
        raise BadInput(f"{path}: nested too deeply to be a params file") from None
    params["__file__"] = str(path)
    return params


def _parse(data: bytes, path: Path) -> dict[str, Any]:
    import yaml

    try:
        params = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadInput(f"{path}:{line}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise BadInput(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(params, dict):
        raise BadInput(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    _check_keys(params, [], path)
    errors = sorted(_params_validator().iter_errors(params), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        raise BadInput(f"{path}: {key_path(err.absolute_path)}: {_describe(err)}")
    return params


def _check_keys(value: Any, parts: list, path: Path, inside: tuple[int, ...] = ()) -> None:
    """YAML allows what JSON Schema cannot check: keys that are not strings (`1: 0.5`, `2024-01-01: x`, `null: x`)
    and a value that holds itself through an alias (`a: &x [*x]`)."""
    if id(value) in inside:
        raise BadInput(f"{path}: {key_path(parts)}: refers to itself (a recursive YAML alias)")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise BadInput(f"{path}: {key_path(parts)}: key {key!r} is not a string (quote it)")
            _check_keys(item, [*parts, key], path, (*inside, id(value)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_keys(item, [*parts, i], path, (*inside, id(value)))


def _describe(err) -> str:
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        return f"unknown key {', '.join(map(repr, extra))} (allowed: {', '.join(allowed)})"
    return err.message


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def parse_options(options_cls: type, raw: dict[str, Any], where: str, params_file: str):
    """Build a method's options dataclass from its params entry, refusing unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    values = {}
    for key, value in raw.items():
        if key == "name":
            continue
        if key not in fields:
            raise BadInput(
                f"{params_file}: {where}.{key}: unknown option for {raw.get('name')!r} "
                f"(known: {', '.join(sorted(fields)) or 'none'})"
            )
        if not _type_ok(value, hints[key]):
            raise BadInput(f"{params_file}: {where}.{key}: expected {_type_name(hints[key])}, got {value!r}")
        values[key] = value
    try:
        return options_cls(**values)
    except TypeError as exc:  # a required option is missing
        raise BadInput(f"{params_file}: {where}: {exc}") from None


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def compile_patterns(patterns: list, where: str) -> list[re.Pattern]:
    """Case-insensitive regular expressions from a params list; a bad one is named by its key path (`where[j]`)."""
    compiled = []
    for j, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(str(pattern), re.IGNORECASE))
        except re.error as exc:
            raise BadInput(f"{where}[{j}]: invalid regular expression {pattern!r}: {exc}") from None
    return compiled
