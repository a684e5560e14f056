"""Reading what users give: JSONL records, rows of their Parquet files, versioned prompt templates.

A file that cannot be read is an error naming the file and the line or row, never a traceback."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from synthforge.errors import BadInput
from synthforge.provenance import sha256_hex

# What pyarrow raises on a damaged Parquet file: ArrowInvalid and its kin, OSError (a truncated file, a thrift
# footer that does not parse) and UnicodeDecodeError (a ValueError, from column names that are not UTF-8).
PARQUET_ERRORS = (pa.ArrowException, OSError, ValueError)
# JSON may spell a lone UTF-16 surrogate (\ud800) that no UTF-8 file, Arrow string or hash can hold.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs; a broken line is an error naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    records = []
    with path.open("rb") as fh:  # bytes, decoded line by line, so that bad UTF-8 is named by its line
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInput(f"{path}:{lineno}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(record, dict):
                raise BadInput(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if _SURROGATE_ESCAPE.search(line):
                _check_text(record, f"{path}:{lineno}")
            records.append((lineno, record))
    return records


def _check_text(value: Any, where: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate), naming where it is; other odd characters (NUL,
    direction marks, combining marks, emoji) are text like any other and stay as they are."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode()
        raise BadInput(f"{where}: not valid Unicode text: a lone surrogate {bad} (a broken UTF-16 escape)") from None


def arrow_rows(data: pa.Table | pa.RecordBatch, where: Callable[[int], str]) -> list[dict[str, Any]]:
    """The rows of a table read from a user's file, as Python dicts (see check_arrow)."""
    check_arrow(data, where)
    return data.to_pylist()


def check_arrow(data: pa.Table | pa.RecordBatch, where: Callable[[int], str]) -> None:
    """Parquet readers do not check that string columns hold UTF-8: a column that does not is named here, with its
    first bad row (`where(i)` names row i), instead of failing halfway through a conversion."""
    for name, column in zip(data.schema.names, data.columns, strict=True):
        offset = 0
        for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid as exc:
                what = "not UTF-8 text" if "UTF8" in str(exc) else f"damaged ({exc})"
                raise BadInput(f"{where(offset + _first_invalid(chunk))}: column {name!r} is {what}") from None
            offset += len(chunk)


def _first_invalid(chunk) -> int:
    """The first row of an array that fails validation: the shortest failing prefix, by bisection."""
    good, bad = 0, len(chunk)  # chunk[:good] validates, chunk[:bad] does not
    while bad - good > 1:
        middle = (good + bad) // 2
        try:
            chunk.slice(0, middle).validate(full=True)
            good = middle
        except pa.ArrowInvalid:
            bad = middle
    return bad - 1


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
