"""judge: every check runs on every sample; each verdict and reason goes into provenance.judge.

A sample fails if any check fails; it goes to `rejected/` with the first failing check as `rejected_by`.
Checks are named in `params.yaml: judge.checks` and resolved by name (third parties: entry point group
`synthforge.checks`). A check is a class with `Options` (a dataclass) and `check(row) -> result | None`, or
`check_batch(rows)` when it calls a model; None means the check does not apply and is not recorded.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from synthforge.engine import ORDINAL, StageBase, align, engine_args, run_stage, struct_column
from synthforge.errors import BadInput
from synthforge.params import compile_patterns, parse_options
from synthforge.plugins import resolve
from synthforge.stagedir import Row, StageInput, reject, require_columns


def result(
    name: str,
    ok: bool,
    reason: str | None = None,
    score: float | None = None,
    raw: str | None = None,
    parsed: bool = True,
    judged_by: str | None = None,
    difficulty: str | None = None,
) -> dict:
    """One check's verdict as provenance records it. judged_by: model@revision or reviewer (None: a rule)."""
    return {
        "name": name,
        "verdict": "pass" if ok else "fail",
        "score": score,
        "reason": reason,
        "raw_output": raw,
        "parsed": parsed,
        "judged_by": judged_by,
        "difficulty": difficulty,
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
        self.where, self.columns = f"{where}.field", [options.field]

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
        self.where, self.columns = f"{where}.fields", list(options.fields)
        self.patterns = compile_patterns(options.patterns, f"{params_file}: {where}.patterns")

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


@dataclass
class ImageFormatOptions:
    min_size: int = 1  # smallest accepted width/height in pixels
    max_size: int | None = None
    channels: int | None = None  # 1 (grey) or 3 (RGB); None = either
    min_std: float = 1.0  # pixel standard deviation (0-255) below which an image is blank


class ImageFormatCheck:
    """The `image` column decodes, has an accepted size and channel count, and is not blank."""

    name = "image_format"
    Options = ImageFormatOptions

    def __init__(self, options: ImageFormatOptions, where: str, params_file: str):
        self.o = options

    def check(self, row: Row) -> dict:
        import numpy as np

        from synthforge.vision.images import decode_image

        try:
            img = decode_image(row.get("image") or b"")
        except ValueError as exc:
            return result(self.name, False, f"image: {exc}", parsed=False)
        w, h = img.size
        if min(w, h) < self.o.min_size or (self.o.max_size is not None and max(w, h) > self.o.max_size):
            return result(self.name, False, f"image is {w}x{h}, outside [{self.o.min_size}, {self.o.max_size or 'any'}] pixels")
        channels = len([b for b in img.getbands() if b != "A"]) if img.mode != "P" else 3  # alpha is not a channel
        if self.o.channels is not None and channels != self.o.channels:
            return result(self.name, False, f"image has {channels} channel(s), expected {self.o.channels} (mode {img.mode})")
        std = float(np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float64).std())
        if std < self.o.min_std:
            return result(self.name, False, f"image is blank: pixel std {std:.2f} < min_std {self.o.min_std}", score=std)
        return result(self.name, True, score=std)


@dataclass
class VogOptions:
    classifier: str = "models/classifier"  # the reference classifier folder (its checkpoints)
    checkpoints: list[str] | None = None  # checkpoint names; None = all it saved
    target: str = "logit"  # gradient of the true class's pre-softmax logit, or of its probability
    direction: str = "drop_lowest"  # GenDataAgent drops the lowest VoG per class; the VoG paper reads high VoG as atypical
    normalization: str = "per_class_zscore"  # or none
    drop_fraction: float = 0.25  # per class (GenDataAgent: 25 / 50 / 75%)
    batch_size: int = 256


class VogFilter:
    """Variance of gradients over the classifier's checkpoints (GenDataAgent 2.4), a per-class drop fraction.

    A set-level check: every batch is scored in the summarize pass (batched, vectorised), per-class normalisation
    and thresholds are fixed in a reduce keyed by class, and `check` reads its sample's decision. The score and
    the settings also go into `provenance.vog`.
    """

    name = "vog"
    Options = VogOptions
    needs_reduce = True
    uses_model = True

    def __init__(self, options: VogOptions, where: str, params_file: str):
        from synthforge.vision import vog
        from synthforge.vision.classifier import classifier_digest, load_classifier

        for key, allowed in (("target", vog.TARGETS), ("direction", vog.DIRECTIONS), ("normalization", vog.NORMALIZATIONS)):
            if getattr(options, key) not in allowed:
                raise BadInput(
                    f"{params_file}: {where}.{key}: must be one of {', '.join(allowed)}, got {getattr(options, key)!r}"
                )
        if not 0 <= options.drop_fraction < 1:
            raise BadInput(f"{params_file}: {where}.drop_fraction: must be in [0, 1), got {options.drop_fraction}")
        self.o = options
        self.classifier = load_classifier(options.classifier)
        self.checkpoint_names = options.checkpoints or self.classifier.config["checkpoints"]
        if len(self.checkpoint_names) < 2:
            raise BadInput(f"{params_file}: {where}.checkpoints: VoG needs at least 2 checkpoints, got {self.checkpoint_names}")
        self.models = self.classifier.checkpoints(self.checkpoint_names)
        self.digest = classifier_digest(options.classifier)
        self._metrics: dict[str, Any] = {}

    def summarize(self, rows: list[Row], passing: list[bool]) -> pa.Table:
        """The VoG score of every passing row whose image decodes; null for the others."""
        import torch

        from synthforge.vision.vog import vog_scores

        images, labels, scored = [], [], []
        for i, row in enumerate(rows):
            if not passing[i]:
                continue
            try:
                images.append(self.classifier.tensor([row["image"]])[0])
            except ValueError:
                continue  # an unreadable image fails image_format; it gets no VoG score
            labels.append(int(row["label"]))
            scored.append(i)
        scores = np.full(len(rows), np.nan)
        if images:
            scores[scored] = vog_scores(self.models, torch.stack(images), torch.tensor(labels), self.o.target, self.o.batch_size)
        label_column: list[int | None] = [None] * len(rows)
        for i, label in zip(scored, labels, strict=True):
            label_column[i] = label
        return pa.table(
            {"label": pa.array(label_column, pa.int64()), "score": pa.array(scores, pa.float64(), mask=np.isnan(scores))}
        )

    def reduce(self, engine, summaries) -> pa.Table:
        """Per class (a keyed reduce): z-normalised scores and the drop decision of every scored sample."""
        scored = engine.map(summaries, lambda t: t.filter(pc.is_valid(t.column("score"))))
        per_class = functools.partial(
            vog_decisions, method=self.o.normalization, fraction=self.o.drop_fraction, direction=self.o.direction
        )
        decided = engine.collect(engine.reduce_by_key(scored, "label", per_class), VOG_DECISION).sort_by(ORDINAL)
        scores = decided.column("score").to_numpy()
        kept = decided.column("kept").to_numpy(zero_copy_only=False)
        thresholds = {
            int(c): t for c, t in zip(decided.column("label").to_pylist(), decided.column("threshold").to_pylist(), strict=True)
        }
        names = self.classifier.class_names
        self._metrics = {
            "scored": len(scores),
            "dropped": int((~kept).sum()),
            "mean_vog_kept": round(float(scores[kept].mean()), 6) if kept.any() else None,
            "mean_vog_dropped": round(float(scores[~kept].mean()), 6) if (~kept).any() else None,
            "class_threshold": {names[c]: t for c, t in sorted(thresholds.items())},
            "settings": self.settings(None),
        }
        return decided

    def settings(self, threshold: float | None) -> dict:
        return {
            "direction": self.o.direction,
            "target": self.o.target,
            "checkpoints": list(self.checkpoint_names),
            "normalization": self.o.normalization,
            "drop_fraction": self.o.drop_fraction,
            "class_threshold": threshold,
        }

    def metrics(self) -> dict:
        return self._metrics

    def check(self, row: Row, decision: dict[str, Any] | None) -> dict:
        if decision is None:
            return result(self.name, False, "not scored: the sample failed another check", parsed=False)
        score, z, kept, threshold = decision["score"], decision["normalized"], decision["kept"], decision["threshold"]
        row["provenance"]["vog"] = {"score": score, "normalized": z, **self.settings(threshold), "classifier": self.digest}
        raw = json.dumps({"vog": score, "normalized": z, "class_threshold": threshold})
        if kept:
            return result(self.name, True, score=z, raw=raw)
        side = "lowest" if self.o.direction == "drop_lowest" else "highest"
        return result(
            self.name,
            False,
            f"VoG outlier: normalised VoG {z:.3f} is among the {side} {self.o.drop_fraction:.0%} of class "
            f"{row.get('label_name', row.get('label'))} (boundary {threshold:.3f})",
            score=z,
            raw=raw,
        )


# The text checks import `result` from here when they run, so they can be registered at the end of this module.
from synthforge.text.faithfulness import FaithfulnessCheck  # noqa: E402
from synthforge.text.llm_judge import LLMJudgeCheck, generator_models, self_judge_conflicts  # noqa: E402
from synthforge.text.review import ReviewCheck  # noqa: E402
from synthforge.text.safety import SafetyCheck  # noqa: E402

CHECKS: dict[str, type] = {
    c.name: c
    for c in (
        FormatCheck,
        RequiredFieldsCheck,
        LengthCheck,
        BannedPatternsCheck,
        ImageFormatCheck,
        VogFilter,
        LLMJudgeCheck,
        FaithfulnessCheck,
        SafetyCheck,
        ReviewCheck,
    )
}


def build_checks(params: dict[str, Any]) -> list:
    params_file = params.get("__file__", "params.yaml")
    # Every entry's name and options are checked before any check loads a model: a typo fails in a second.
    parsed = []
    for i, spec in enumerate(params["judge"]["checks"]):
        where = f"judge.checks[{i}]"
        cls = resolve("checks", spec["name"], CHECKS, where, params_file)
        parsed.append((cls, parse_options(cls.Options, spec, where, params_file), where))
    return [cls(options, where, params_file) for cls, options, where in parsed]


def check_rows(check, rows: list[Row]) -> list[dict | None]:
    """One result per row, None where the check does not apply (faithfulness of a sample without a source
    passage, review of a sample nobody reviewed). Checks that call a model batch their rows (`check_batch`)."""
    if hasattr(check, "check_batch"):
        return check.check_batch(rows)
    return [check.check(row) for row in rows]


VOG_DECISION = pa.schema(
    [
        (ORDINAL, pa.int64()),
        ("label", pa.int64()),
        ("score", pa.float64()),
        ("normalized", pa.float64()),
        ("kept", pa.bool_()),
        ("threshold", pa.float64()),
    ]
)


def vog_decisions(table: pa.Table, method: str, fraction: float, direction: str) -> pa.Table:
    """VoG's global step over whole classes: per-class normalisation and the per-class drop, ties by input order."""
    from synthforge.vision.vog import normalize_per_class, select_kept

    table = table.sort_by(ORDINAL)
    scores = table.column("score").to_numpy()
    labels = table.column("label").to_numpy()
    normalized = normalize_per_class(scores, labels, method)
    kept, thresholds = select_kept(normalized, labels, fraction, direction)
    return (
        table.select([ORDINAL, "label", "score"])
        .append_column("normalized", pa.array(normalized))
        .append_column("kept", pa.array(kept))
        .append_column("threshold", pa.array([thresholds.get(int(c)) for c in labels], pa.float64()))
    )


class JudgeStage(StageBase):
    def __init__(self, checks: list):
        super().__init__(name="judge")
        self.set_checks = [c for c in checks if getattr(c, "needs_reduce", False)]
        self.needs_reduce = bool(self.set_checks)
        self.uses_model = any(getattr(c, "uses_model", False) for c in checks)
        self.checks = checks
        self._metrics = {"failed_by_check": {c.name: 0 for c in checks}}

    def summarize(self, rows: list[Row]) -> pa.Table:
        # Set-level checks (VoG) see only samples every per-sample check passes: a blank image must not take
        # the place of a real outlier in a per-class drop quota.
        row_checks = [c for c in self.checks if c not in self.set_checks]
        verdicts = [check_rows(c, rows) for c in row_checks]
        passing = [all(v[i] is None or v[i]["verdict"] == "pass" for v in verdicts) for i in range(len(rows))]
        summaries = [c.summarize(rows, passing) for c in self.set_checks]
        return pa.table({f"set{k}": struct_column(t) for k, t in enumerate(summaries)})

    def reduce(self, engine, summaries, total: int) -> pa.Table | None:
        if summaries is None:
            return None
        columns = {}
        for k, check in enumerate(self.set_checks):

            def own(t: pa.Table, k: int = k) -> pa.Table:
                flat = pa.Table.from_struct_array(t.column(f"set{k}").combine_chunks())
                return flat.append_column(ORDINAL, t.column(ORDINAL))

            decided = align(check.reduce(engine, engine.map(summaries, own)), total)
            columns[f"set{k}"] = struct_column(decided)
        return pa.table(columns)

    def metrics(self) -> dict[str, Any]:
        return {**self._metrics, **{c.name: c.metrics() for c in self.checks if hasattr(c, "metrics")}}

    def apply(self, rows: list[Row], decisions: pa.Table | None) -> tuple[list[Row], list[Row]]:
        per_check = []
        for c in self.checks:
            if c in self.set_checks:
                k = self.set_checks.index(c)
                decided = decisions.column(f"set{k}").to_pylist() if decisions is not None else [None] * len(rows)
                per_check.append([c.check(row, d) for row, d in zip(rows, decided, strict=True)])
            else:
                per_check.append(check_rows(c, rows))
        kept, rejected = [], []
        for i, row in enumerate(rows):
            results = [verdicts[i] for verdicts in per_check if verdicts[i] is not None]
            failed = [r for r in results if r["verdict"] == "fail"]
            row["provenance"]["judge"] = {"verdict": "fail" if failed else "pass", "checks": results}
            if failed:
                rejected.append(reject(row, f"judge.{failed[0]['name']}", failed[0]["reason"]))
            else:
                kept.append(row)
        return kept, rejected

    def tally(self, kept: list[Row], rejected: list[Row]) -> None:
        results = [r for row in kept + rejected for r in row["provenance"]["judge"]["checks"]]
        for r in results:
            if r["verdict"] == "fail":
                self._metrics["failed_by_check"][r["name"]] += 1
        for c in self.checks:
            if hasattr(c, "tally"):
                c.tally([r for r in results if r["name"] == c.name])


def run_judge(params: dict[str, Any], src: str | Path, out: str | Path, allow_self_judge: bool = False) -> dict:
    """Judge the samples in `src` into `out`. An LLM judge that is the model which generated samples in `src` is
    refused (BadInput) before anything is judged, unless `allow_self_judge`; then the stats say `self_judged`."""
    import logging

    from synthforge.vision.classifier import classifier_digest

    params_file = params.get("__file__", "params.yaml")
    checks = build_checks(params)
    source = StageInput.open(src)
    # What else decides the verdicts goes into the fingerprint: models, the rubric's wording, reviewers' verdicts.
    extra = {f"classifier:{c.o.classifier}": classifier_digest(c.o.classifier) for c in checks if isinstance(c, VogFilter)}
    extra |= {f"review:{c.ledger}": c.digest for c in checks if isinstance(c, ReviewCheck)}
    for c in checks:
        extra |= getattr(c, "inputs", {})  # the models a check runs (encoders, classifiers)
        require_columns(source, getattr(c, "columns", ()), f"{params_file}: {getattr(c, 'where', 'judge.checks')}", text=True)
    judges = [c for c in checks if isinstance(c, LLMJudgeCheck)]
    generators = generator_models(source) if judges else set()
    for c in judges:
        extra[f"judge_model:{c.where}"] = c.llm.identity
        extra[f"rubric:{c.rubric.path}"] = c.rubric.hash
        same = self_judge_conflicts(c, generators)
        if same and not allow_self_judge:
            raise BadInput(
                f"{params_file}: {c.where}: the judge model {c.llm.identity} is the model that generated samples in "
                f"{source.path} ({', '.join(same)}); a model grading its own output is easy to fool. Judge with another "
                "model, or pass --allow-self-judge to run it anyway (the stats will record self_judged: true)."
            )
        if same:
            c.self_judged = True
            logging.getLogger(__name__).warning(
                "%s: the judge model %s also generated the samples it judges (--allow-self-judge)", c.where, c.llm.identity
            )
    stage = JudgeStage(checks).rebuilt_by(_judge_stage, params)
    return run_stage(stage, source, out, {"judge": params["judge"]}, extra_inputs=extra, **engine_args(params))


def _judge_stage(params: dict[str, Any]) -> JudgeStage:
    return JudgeStage(build_checks(params))
