"""Reading what generation starts from: JSONL source records and versioned prompt templates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthforge.errors import BadInput
from synthforge.provenance import sha256_hex


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs; a broken line is an error naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(record, dict):
                raise BadInput(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    return records


@dataclass(frozen=True)
class SourceRecord:
    uri: str
    line: int
    record: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.record["id"])


def load_sources(path: str | Path) -> list[SourceRecord]:
    seen: dict[str, int] = {}
    out = []
    for lineno, record in read_jsonl(path):
        rid = record.get("id")
        if not isinstance(rid, str) or not rid:
            raise BadInput(f"{path}:{lineno}: source record needs a non-empty string 'id'")
        if rid in seen:
            raise BadInput(f"{path}:{lineno}: duplicate source id {rid!r} (first on line {seen[rid]})")
        seen[rid] = lineno
        out.append(SourceRecord(uri=str(path), line=lineno, record=record))
    if not out:
        raise BadInput(f"{path}: no source records")
    return out


@dataclass(frozen=True)
class PromptTemplate:
    """One versioned prompt file. `hash` is over the file's bytes, so any edit is visible in provenance."""

    path: str
    id: str
    version: str
    hash: str
    body: dict[str, Any]

    def require(self, *keys: str) -> None:
        for key in keys:
            if key not in self.body:
                raise BadInput(f"{self.path}: missing key {key!r} (template {self.id!r})")


def load_template(path: Path, what: str = "a prompt template") -> PromptTemplate:
    """One versioned YAML file (a prompt template, a judge's rubric): a mapping with at least `id` and `version`."""
    import yaml

    raw = path.read_bytes()
    try:
        body = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise BadInput(f"{path}{':' + str(mark.line + 1) if mark else ''}: not valid YAML") from None
    if not isinstance(body, dict):
        raise BadInput(f"{path}: {what} is a YAML mapping")
    for key in ("id", "version"):
        if not body.get(key):
            raise BadInput(f"{path}: missing key {key!r}")
    return PromptTemplate(str(path), str(body["id"]), str(body["version"]), sha256_hex(raw), body)


def load_prompts(folder: str | Path) -> dict[str, PromptTemplate]:
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{folder}: prompt template folder not found")
    prompts: dict[str, PromptTemplate] = {}
    for path in sorted(folder.glob("*.y*ml")):
        template = load_template(path)
        if template.id in prompts:
            raise BadInput(f"{path}: duplicate template id {template.id!r} (also in {prompts[template.id].path})")
        prompts[template.id] = template
    if not prompts:
        raise BadInput(f"{folder}: no prompt templates (*.yaml)")
    return prompts


def file_digest(path: str | Path) -> str:
    return sha256_hex(Path(path).read_bytes())
