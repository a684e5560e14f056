"""judge: every check runs on every sample; each verdict and reason goes into provenance.judge.

A sample fails if any check fails; it goes to `rejected/` with the first failing check as `rejected_by`.
Checks are named in `params.yaml: judge.checks` and resolved by name (third parties: entry point group
`synthforge.checks`). A check is a class with `Options` (a dataclass) and `check(row) -> CheckResult`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthforge.errors import BadInput
from synthforge.params import parse_options
from synthforge.plugins import resolve
from synthforge.stagedir import Row, StageBase, StageInput, reject, run_stage


def result(
    name: str, ok: bool, reason: str | None = None, score: float | None = None, raw: str | None = None, parsed: bool = True
) -> dict:
    return {
        "name": name,
        "verdict": "pass" if ok else "fail",
        "score": score,
        "reason": reason,
        "raw_output": raw,
        "parsed": parsed,
    }


@dataclass
class FormatOptions:
    schema: str = "schemas/eval_item.schema.json"
    json_fields: list[str] = field(default_factory=list)  # columns holding JSON text, parsed before validation


class FormatCheck:
    """Validate the sample's content against the task's JSON Schema."""

    name = "format"
    Options = FormatOptions

    def __init__(self, options: FormatOptions, where: str, params_file: str):
        import jsonschema

        path = Path(options.schema)
        try:
            schema = json.loads(path.read_text())
            jsonschema.Draft202012Validator.check_schema(schema)
        except FileNotFoundError:
            raise BadInput(f"{params_file}: {where}.schema: task schema {path} not found") from None
        except (json.JSONDecodeError, jsonschema.SchemaError) as exc:
            raise BadInput(f"{path}: not a valid JSON Schema: {getattr(exc, 'message', exc)}") from None
        self.json_fields = options.json_fields
        self.validator = jsonschema.Draft202012Validator(schema)

    def check(self, row: Row) -> dict:
        item = {k: v for k, v in row.items() if k not in ("sample_id", "provenance")}
        for key in self.json_fields:
            try:
                item[key] = json.loads(item[key])
            except (TypeError, json.JSONDecodeError) as exc:
                return result(self.name, False, f"{key} is not valid JSON: {exc}", raw=str(item.get(key)), parsed=False)
        errors = sorted(self.validator.iter_errors(item), key=lambda e: list(e.absolute_path))
        if errors:
            err = errors[0]
            where = ".".join(map(str, err.absolute_path)) or "(item)"
            return result(self.name, False, f"{where}: {err.message}")
        return result(self.name, True)


@dataclass
class RequiredFieldsOptions:
    fields: list[str]


class RequiredFieldsCheck:
    """Each listed field is present and not empty."""

    name = "required_fields"
    Options = RequiredFieldsOptions

    def __init__(self, options: RequiredFieldsOptions, where: str, params_file: str):
        self.fields = options.fields

    def check(self, row: Row) -> dict:
        for key in self.fields:
            value = row.get(key)
            if value is None or (isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value)):
                return result(self.name, False, f"field {key!r} is missing or empty")
        return result(self.name, True)


@dataclass
class LengthOptions:
    field: str
    min_chars: int = 1
    max_chars: int | None = None


class LengthCheck:
    """Length of a text field in characters within [min_chars, max_chars]; the length is the score."""

    name = "length"
    Options = LengthOptions

    def __init__(self, options: LengthOptions, where: str, params_file: str):
        self.o = options

    def check(self, row: Row) -> dict:
        n = len(row.get(self.o.field) or "")
        if n < self.o.min_chars:
            return result(
                self.name, False, f"{self.o.field} has {n} characters, fewer than min_chars={self.o.min_chars}", score=n
            )
        if self.o.max_chars is not None and n > self.o.max_chars:
            return result(self.name, False, f"{self.o.field} has {n} characters, more than max_chars={self.o.max_chars}", score=n)
        return result(self.name, True, score=n)


@dataclass
class BannedPatternsOptions:
    fields: list[str]
    patterns: list[str]  # regular expressions, matched case-insensitively


class BannedPatternsCheck:
    """No listed regular expression occurs in any listed field; the reason quotes the match."""

    name = "banned_patterns"
    Options = BannedPatternsOptions

    def __init__(self, options: BannedPatternsOptions, where: str, params_file: str):
        self.fields = options.fields
        self.patterns = []
        for i, pattern in enumerate(options.patterns):
            try:
                self.patterns.append(re.compile(pattern, re.IGNORECASE))
            except re.error as exc:
                raise BadInput(f"{params_file}: {where}.patterns[{i}]: invalid regular expression {pattern!r}: {exc}") from None

    def check(self, row: Row) -> dict:
        for key in self.fields:
            text = row.get(key) or ""
            for pattern in self.patterns:
                m = pattern.search(text)
                if m:
                    context = text[max(0, m.start() - 20) : m.end() + 20].replace("\n", " ")
                    return result(
                        self.name, False, f"banned pattern {pattern.pattern!r} in {key} at char {m.start()}: …{context}…"
                    )
        return result(self.name, True)


CHECKS: dict[str, type] = {c.name: c for c in (FormatCheck, RequiredFieldsCheck, LengthCheck, BannedPatternsCheck)}


def build_checks(params: dict[str, Any]) -> list:
    params_file = params.get("__file__", "params.yaml")
    checks = []
    for i, spec in enumerate(params["judge"]["checks"]):
        where = f"judge.checks[{i}]"
        cls = resolve("checks", spec["name"], CHECKS, where, params_file)
        checks.append(cls(parse_options(cls.Options, spec, where, params_file), where, params_file))
    return checks


class JudgeStage(StageBase):
    def __init__(self, checks: list):
        super().__init__(name="judge")
        self.checks = checks
        self._metrics = {"failed_by_check": {c.name: 0 for c in checks}}

    def apply(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        kept, rejected = [], []
        for row in rows:
            results = [check.check(row) for check in self.checks]
            failed = [r for r in results if r["verdict"] == "fail"]
            row["provenance"]["judge"] = {"verdict": "fail" if failed else "pass", "checks": results}
            for r in failed:
                self._metrics["failed_by_check"][r["name"]] += 1
            if failed:
                rejected.append(reject(row, f"judge.{failed[0]['name']}", failed[0]["reason"]))
            else:
                kept.append(row)
        return kept, rejected


def run_judge(params: dict[str, Any], src: str | Path, out: str | Path) -> dict:
    stage = JudgeStage(build_checks(params))
    return run_stage(stage, StageInput.open(src), out, {"judge": params["judge"]})
