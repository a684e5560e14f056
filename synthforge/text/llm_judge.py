"""llm_judge: a language model grades each sample against a versioned rubric (score, difficulty, rationale).

A rubric is a YAML file:

    id: answer-quality
    version: "2"                 # bump whenever the wording changes; id, version and hash go into the stats
    system: You are a strict judge of evaluation data.
    user: |                      # Jinja2 over the sample's fields (prompt, reference, context, label, ...) and method
      Question: {{ prompt }}
      Answer: {{ reference }}
      Score it from 1 to 5 and reply with JSON {"score": N, "difficulty": "easy|medium|hard", "rationale": "..."}.
    scale: {min: 1, max: 5}

The answer is read as a JSON object (anywhere in the text, fenced or not) with `score` and optional `difficulty`
and `rationale`, else as "Score: 4/5"-style lines. A score off the rubric's scale does not count as parsed.
A judge must not be the model that generated the samples (the seed guide's first misuse): `run_judge` refuses
it unless told otherwise, see `self_judge_conflicts`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthforge.errors import BadInput
from synthforge.llm.parsing import json_objects
from synthforge.provenance import sha256_hex
from synthforge.sources import load_template
from synthforge.stagedir import Row, StageInput

DIFFICULTIES = ("easy", "medium", "hard")
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_SCORE_LINE = re.compile(
    rf"\b(?:score|rating|grade)\b[*_\s]*[:=]?[*_\s]*{_NUMBER}(?:\s*(?:/|out of)\s*{_NUMBER})?", re.IGNORECASE
)
_SCORE_TEXT = re.compile(rf"^\s*{_NUMBER}\s*(?:/\s*{_NUMBER})?\s*$")
_DIFFICULTY_LINE = re.compile(r"\bdifficulty\b[*_\s]*[:=]?[*_\s]*(easy|medium|hard)\b", re.IGNORECASE)
_RATIONALE_LINE = re.compile(r"\b(?:rationale|reason(?:ing)?|explanation)\b[*_\s]*[:=][*_\s]*(.+)", re.IGNORECASE)


@dataclass(frozen=True)
class Rubric:
    path: str
    id: str
    version: str
    hash: str  # sha256 of the file's bytes
    system: str
    user: Any  # a compiled Jinja2 template
    low: float
    high: float

    def render(self, row: Row) -> str:
        from jinja2 import UndefinedError

        fields = {k: ("" if v is None else v) for k, v in row.items() if k != "provenance"}
        try:
            return self.user.render({"method": row["provenance"]["generation"]["method"], **fields})
        except UndefinedError as exc:
            raise BadInput(
                f"{self.path}: user: {exc.message} for sample {row['sample_id']} (fields: method, {', '.join(fields)})"
            ) from None


def load_rubric(path: str | Path, param: str) -> Rubric:
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import SandboxedEnvironment

    class MissingField(StrictUndefined):
        """A field the samples lack is an error where the rubric prints it (a typo must not become an empty
        string the judge grades), and false in `{% if context %}`, so one rubric serves stages with and without it."""

        def __bool__(self) -> bool:
            return False

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{param}: rubric file {path} not found")
    template = load_template(path, "a rubric (id, version, system, user and scale)")
    body = template.body
    for key in ("user", "scale"):
        if body.get(key) in (None, ""):
            raise BadInput(f"{path}: missing key {key!r}")
    scale = body["scale"]
    if not (isinstance(scale, dict) and all(isinstance(scale.get(k), (int, float)) for k in ("min", "max"))):
        raise BadInput(f"{path}: scale: expected {{min: N, max: M}}, got {scale!r}")
    if scale["min"] >= scale["max"]:
        raise BadInput(f"{path}: scale: min {scale['min']} must be below max {scale['max']}")
    env = SandboxedEnvironment(undefined=MissingField, autoescape=False, keep_trailing_newline=False)
    try:
        user = env.from_string(str(body["user"]))
    except TemplateSyntaxError as exc:
        raise BadInput(f"{path}: user: template syntax error on line {exc.lineno}: {exc.message}") from None
    return Rubric(
        template.path,
        template.id,
        template.version,
        template.hash,
        str(body.get("system") or ""),
        user,
        scale["min"],
        scale["max"],
    )


@dataclass
class Verdict:
    """What a judge's answer says; `error` says why it does not count when it does not parse."""

    score: float | None = None
    difficulty: str | None = None
    rationale: str | None = None
    error: str | None = None


def _number(value: Any) -> tuple[float | None, float | None]:
    """(score, denominator) from a JSON value: 4, 4.5, "4" or "4/5"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None
    m = _SCORE_TEXT.match(value) if isinstance(value, str) else None
    return (float(m[1]), float(m[2]) if m[2] else None) if m else (None, None)


def parse_verdict(text: str, low: float, high: float) -> Verdict:
    """Read a judge's answer: a JSON object with `score`, else "Score: N" / "Rating: N/M" lines."""
    found = next((obj for obj in json_objects(text) if "score" in obj), None)
    if found is not None:
        score, out_of = _number(found["score"])
        if score is None:
            return Verdict(error=f"score is not a number: {found['score']!r}")
        difficulty = str(found.get("difficulty") or "").strip().lower()
        rationale = found.get("rationale") or found.get("reason")
        verdict = Verdict(score, difficulty if difficulty in DIFFICULTIES else None, str(rationale) if rationale else None)
    else:
        m = _SCORE_LINE.search(text)
        if not m:
            return Verdict(error="no score in the answer")
        score, out_of = float(m[1]), float(m[2]) if m[2] else None
        difficulty, rationale = _DIFFICULTY_LINE.search(text), _RATIONALE_LINE.search(text)
        verdict = Verdict(score, difficulty[1].lower() if difficulty else None, rationale[1].strip() if rationale else None)
    if out_of is not None and out_of != high:
        return Verdict(error=f"score {score:g}/{out_of:g} is not on the rubric's scale {low:g}-{high:g}")
    if not low <= score <= high:
        return Verdict(error=f"score {score:g} is outside the rubric's scale {low:g}-{high:g}")
    return verdict


@dataclass
class LLMJudgeOptions:
    model: dict  # an LLM spec (synthforge.llm.backends.build_llm)
    rubric: str  # the rubric file
    min_score: float  # the lowest score that passes
    on_unparsed: str = "fail"  # or pass: what an answer without a readable score counts as


class LLMJudgeCheck:
    name = "llm_judge"
    Options = LLMJudgeOptions

    def __init__(self, options: LLMJudgeOptions, where: str, params_file: str):
        from synthforge.llm.backends import build_llm

        if options.on_unparsed not in ("fail", "pass"):
            raise BadInput(f"{params_file}: {where}.on_unparsed: must be fail or pass, got {options.on_unparsed!r}")
        self.rubric = load_rubric(options.rubric, f"{params_file}: {where}.rubric")
        if not self.rubric.low <= options.min_score <= self.rubric.high:
            raise BadInput(
                f"{params_file}: {where}.min_score: {options.min_score} is outside the scale "
                f"{self.rubric.low:g}-{self.rubric.high:g} of {self.rubric.path}"
            )
        self.o = options
        self.where = where
        self.llm = build_llm(options.model, f"{where}.model", params_file)
        self.self_judged = False  # set by run_judge when --allow-self-judge let the generator judge itself
        self._counts: Counter[str] = Counter()
        self._score_sum = 0.0

    def check_batch(self, rows: list[Row]) -> list[dict]:
        from synthforge.stages.judge import result  # judge.py imports this module to register the check

        system = [("system", self.rubric.system)] if self.rubric.system else []
        # The seed comes from the sample id: a rerun asks the same question and hits the response cache.
        requests = [
            self.llm.request([*system, ("user", self.rubric.render(row))], seed=int(sha256_hex(row["sample_id"])[:8], 16))
            for row in rows
        ]
        out = []
        for completion in self.llm.complete(requests, desc=self.name):
            v = parse_verdict(completion.text, self.rubric.low, self.rubric.high)
            if v.error:
                ok = self.o.on_unparsed == "pass"
                out.append(
                    result(
                        self.name,
                        ok,
                        f"unparsed judge answer: {v.error}",
                        raw=completion.text,
                        parsed=False,
                        judged_by=self.llm.identity,
                    )
                )
                continue
            ok = v.score >= self.o.min_score
            reason = (
                v.rationale
                if ok
                else f"score {v.score:g} < min_score {self.o.min_score:g}: {v.rationale or 'no rationale given'}"
            )
            out.append(
                result(
                    self.name,
                    ok,
                    reason,
                    score=v.score,
                    raw=completion.text,
                    judged_by=self.llm.identity,
                    difficulty=v.difficulty,
                )
            )
        return out

    def tally(self, results: list[dict]) -> None:
        """Count this check's verdicts (on the driver: the verdicts themselves may come from other processes)."""
        for r in results:
            self._counts["judged"] += 1
            if r["parsed"]:
                self._score_sum += r["score"]
            else:
                self._counts["unparsed"] += 1

    def metrics(self) -> dict[str, Any]:
        parsed = self._counts["judged"] - self._counts["unparsed"]
        return {
            "model": self.llm.identity,
            "rubric": {"id": self.rubric.id, "version": self.rubric.version, "hash": self.rubric.hash, "path": self.rubric.path},
            "self_judged": self.self_judged,
            "judged": self._counts["judged"],
            "unparsed": self._counts["unparsed"],
            "mean_score": round(self._score_sum / parsed, 4) if parsed else None,
        }


# -- the self-judge guard ----------------------------------------------------------------------------------------


def generator_models(source: StageInput) -> set[tuple[str, str | None]]:
    """The distinct (model, revision) pairs that generated the stage's samples, from their provenance."""
    import pyarrow.parquet as pq

    pairs = set()
    for shard in source.shards():
        table = pq.read_table(shard, columns=["provenance.generation.model", "provenance.generation.model_revision"])
        pairs |= set(zip(*(table.column(i).to_pylist() for i in range(2)), strict=True))
    return pairs


def _normalised(model: str) -> str:
    """A local folder by its absolute path (models/gen, ./models/gen/ and /abs/models/gen are one model)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model.rstrip("/")


def same_model(a: str, a_revision: str | None, b: str, b_revision: str | None) -> bool:
    """The same model: equal revisions (a content hash or a hub commit: the same weights under another path), or the
    same id (a hub model that moved to a new commit between generation and judging is still the same model)."""
    return bool(a_revision and b_revision and a_revision == b_revision) or _normalised(a) == _normalised(b)


def self_judge_conflicts(check: LLMJudgeCheck, generators: set[tuple[str, str | None]]) -> list[str]:
    """The generator models (model@revision) that `check`'s judge model is the same model as."""
    return sorted(
        f"{model}@{revision or 'unknown'}"
        for model, revision in generators
        if model and same_model(check.llm.model_id, check.llm.model_revision, model, revision)
    )
