"""Generation methods that call an LLM: paraphrase (expression diversity) and source-grounded Q&A / citation cases.

Both build their prompts from versioned template files (`generate.prompts`), whose id, version and hash go into
provenance with the model and its revision. Every answer is kept: what parses becomes a sample; what does not, or
what breaks the method's rule (a paraphrase that drops a fact), goes to `rejected/` with the raw output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from synthforge.errors import BadInput
from synthforge.llm.backends import ChatRequest, Completion
from synthforge.llm.parsing import json_objects
from synthforge.provenance import sha256_hex
from synthforge.stages.generate import CONTENT_SCHEMA, GenerateContext, Planned, Row, Samples
from synthforge.text.passages import Passage, load_passages, passages_digest

_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_CHATTER = re.compile(r"^(?:sure|certainly|of course|okay|here(?:'s| is| are)|rewritten|paraphrase[ds]?)\b[^\n]*:\s*$", re.I)
_QUOTES = "\"'`“”‘’«»"


def request_seed(seed: int, key: str) -> int:
    """A sampling seed per sample: the same work asks the same question, so the response cache serves reruns."""
    return int(sha256_hex(f"{seed}:{key}")[:8], 16)


@functools.cache
def _strict_env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


@functools.cache
def _compiled(path: str, key: str, source: str):
    from jinja2 import TemplateError

    try:
        return _strict_env().from_string(source)
    except TemplateError as exc:
        raise BadInput(f"{path}: {key}: not a valid template: {exc}") from None


def _render(tpl, key: str, variables: dict[str, Any]) -> str:
    """A template's part rendered strictly: a misspelt variable is an error naming the file, never a prompt with a
    hole in it sent to a model."""
    from jinja2 import TemplateError

    try:
        return _compiled(tpl.path, key, tpl.body[key]).render(variables).strip()
    except TemplateError as exc:
        raise BadInput(f"{tpl.path}: {key}: {exc} (variables: {', '.join(sorted(variables))})") from None


def _messages(tpl, variables: dict[str, Any]) -> list[tuple[str, str]]:
    messages = [("system", _render(tpl, "system", variables))] if tpl.body.get("system") else []
    return messages + [("user", _render(tpl, "user", variables))]


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_rewrite(raw: str, original: str) -> tuple[str | None, str | None]:
    """(the rewritten text, None) or (None, why it is unusable). Strips code fences, a leading "Here is ...:"
    line and surrounding quotes; an empty answer or the original text unchanged is unusable."""
    text = _FENCE.sub("", raw.strip()).strip()
    lines = text.splitlines()
    if lines and _CHATTER.match(lines[0].strip()):
        text = "\n".join(lines[1:]).strip()
    if len(text) > 1 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    if not text:
        return None, "the model wrote no rewrite"
    if " ".join(text.lower().split()) == " ".join(original.lower().split()):
        return None, "the rewrite is the original text unchanged"
    return text, None


def reference_values(reference: str | None) -> list[str]:
    """The non-empty string and number values of a JSON reference object: the facts a rewrite must keep."""
    try:
        value = json.loads(reference or "")
    except json.JSONDecodeError:
        return []
    if not isinstance(value, dict):
        return []
    return [str(v) for v in value.values() if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip()]


def parse_question_answer(raw: str) -> tuple[tuple[str, str] | None, str | None]:
    """((question, answer), None) from a JSON object anywhere in the answer (fenced or not), else from
    "Question: ... Answer: ..." lines; (None, why) when neither is there."""
    for obj in json_objects(raw):
        if isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), (str, int, float)):
            question, answer = obj["question"].strip(), str(obj["answer"]).strip()
            if question and answer:
                return (question, answer), None
            return None, "the JSON answer has an empty question or answer"
    m = re.search(r"question\s*[:\-]\s*(.+?)\s*\n\s*answer\s*[:\-]\s*(.+)", raw, re.I | re.S)
    if m and m.group(1).strip() and m.group(2).strip():
        return (m.group(1).strip(), m.group(2).strip().split("\n\n")[0].strip()), None
    return None, "no JSON object with 'question' and 'answer', and no 'Question: ... Answer: ...' lines"


class LLMMethod:
    """What the two LLM methods share: the model, the template lookup, the fingerprint inputs, the calls."""

    name: str

    def __init__(self, options, where: str, params_file: str):
        from synthforge.llm.backends import shared_llm

        self.o = options
        self.where = where
        self.params_file = params_file
        self.llm = shared_llm(options.model, f"{where}.model", params_file)
        self.model, self.model_revision = self.llm.model_id, self.llm.model_revision
        self.metrics: dict[str, Any] = {"model": self.llm.identity, "cached_responses": 0}

    @property
    def inputs(self) -> dict[str, str]:
        return {f"model:{self.where}": self.llm.identity}

    def complete(self, requests: list[ChatRequest], desc: str) -> list[Completion]:
        completions = self.llm.complete(requests, desc=desc)
        self.metrics["cached_responses"] += sum(c.cached for c in completions)
        return completions

    def template(self, ctx: GenerateContext, *keys: str):
        if self.o.prompt not in ctx.prompts:
            raise BadInput(
                f"{self.params_file}: {self.where}.prompt: prompt template {self.o.prompt!r} not found "
                f"(have: {', '.join(sorted(ctx.prompts))})"
            )
        tpl = ctx.prompts[self.o.prompt]
        tpl.require(*keys)
        return tpl


@dataclass
class ParaphraseOptions:
    model: dict[str, Any]
    prompt: str = "paraphrase"  # template id; its `system` and `user` see the parent's fields and `text`
    field: str = "prompt"  # the field rewritten
    of_methods: list[str] = dataclasses.field(default_factory=lambda: ["template"])
    rate: float = 0.5  # fraction of the earlier samples of those methods that get a paraphrase
    keep_values_from: str | None = "reference"  # JSON field whose values the rewrite must keep verbatim


class Paraphrase(LLMMethod):
    """An LLM rewrites a field of an earlier sample; the expected answer stays, so every fact must survive.

    Paraphrases add expression diversity only (the seed guide warns that paraphrasing alone looks diverse and
    carries little information): use them beside template and grounded samples, not instead of them.
    """

    name = "paraphrase"
    Options = ParaphraseOptions

    def __init__(self, options: ParaphraseOptions, where: str, params_file: str):
        if not 0 < options.rate <= 1:
            raise BadInput(f"{params_file}: {where}.rate: must be in (0, 1], got {options.rate}")
        if options.field not in CONTENT_SCHEMA.names:
            raise BadInput(
                f"{params_file}: {where}.field: {options.field!r} is not a text field ({', '.join(CONTENT_SCHEMA.names)})"
            )
        super().__init__(options, where, params_file)

    def plan(self, ctx: GenerateContext, previous: Samples) -> Iterator[tuple[Row, ChatRequest]]:
        """(parent, request to rewrite it) for a seeded `rate` of the earlier samples of `of_methods`."""
        tpl = self.template(ctx, "user")
        rng = random.Random(ctx.seed + 2)
        for parent in previous:
            if parent["provenance"]["generation"]["method"] in self.o.of_methods and rng.random() < self.o.rate:
                variables = {**{k: parent.get(k) for k in CONTENT_SCHEMA.names}, "text": parent[self.o.field]}
                yield parent, self.llm.request(_messages(tpl, variables), seed=request_seed(ctx.seed, parent["sample_id"]))

    def make(self, ctx: GenerateContext, jobs: list[tuple[Row, ChatRequest]]) -> list[Planned]:
        tpl = self.template(ctx, "user")
        completions = self.complete([request for _, request in jobs], desc="paraphrase")
        planned = []
        for (parent, request), completion in zip(jobs, completions, strict=True):
            original = parent[self.o.field]
            text, problem = parse_rewrite(completion.text, original)
            rejection = ("generate.unparsed", f"{problem}: {_short(completion.text)!r}") if problem else None
            if text is not None and completion.finish_reason == "length":
                text, rejection = (
                    None,
                    ("generate.truncated", f"the rewrite stopped at max_new_tokens: {_short(completion.text)!r}"),
                )
            if text is not None and self.o.keep_values_from:
                lost = [v for v in reference_values(parent.get(self.o.keep_values_from)) if v not in text]
                if lost:
                    rejection = (
                        "generate.lost_fact",
                        f"the rewrite drops {', '.join(map(repr, lost))} from {self.o.keep_values_from}",
                    )
            content = {
                **{k: parent.get(k) for k in CONTENT_SCHEMA.names},
                self.o.field: text if text is not None else completion.text,
            }
            planned.append(
                Planned(
                    content=content,
                    origin={
                        "method": self.name,
                        "parent": parent["sample_id"],
                        "version": tpl.version,
                        "model": self.llm.identity,
                    },
                    source=parent["provenance"]["source"],
                    template=tpl,
                    params={"field": self.o.field, "rate": self.o.rate, "request_seed": request.seed},
                    parent_ids=[parent["sample_id"]],
                    raw_output=completion.text,
                    parsed=text is not None,
                    rejection=rejection,
                )
            )
        return planned


@dataclass
class GroundedOptions:
    docs: str  # folder of .txt / .md / .jsonl documents
    model: dict[str, Any]
    prompt: str = "grounded-qa"  # template id: `system`, `user` (to the LLM), and one eval prompt per kind
    kinds: list[str] = dataclasses.field(default_factory=lambda: ["qa", "citation"])
    per_passage: int = 1  # questions asked per passage
    distractors: int = 2  # other passages shown beside the source in a citation case
    max_passage_words: int = 180
    min_passage_words: int = 12


KIND_LABELS = {"qa": "grounded_qa", "citation": "grounded_citation"}


class GroundedJob(NamedTuple):
    passage: Passage
    copy: int
    kind: str
    shown: list[Passage]  # the passage and, in a citation case, its distractors, in the order the prompt shows them
    request: ChatRequest


class SourceGrounded(LLMMethod):
    """Q&A and citation cases written from passages of real documents; each sample keeps its passage.

    qa        the eval prompt shows the passage and the question; the reference is the answer
    citation  the eval prompt shows the source passage among `distractors` others, by id; the reference is the
              answer and the id of the passage that supports it
    The passage goes into the `context` column (the judge's faithfulness check compares the answer with it) and
    its id into `provenance.source.record_id`.
    """

    name = "grounded"
    Options = GroundedOptions

    def __init__(self, options: GroundedOptions, where: str, params_file: str):
        unknown = [k for k in options.kinds if k not in KIND_LABELS]
        if unknown or not options.kinds:
            raise BadInput(
                f"{params_file}: {where}.kinds: must be a non-empty list of {', '.join(KIND_LABELS)}, got {options.kinds}"
            )
        for key in ("per_passage", "max_passage_words", "min_passage_words"):
            if getattr(options, key) < 1:
                raise BadInput(f"{params_file}: {where}.{key}: must be >= 1, got {getattr(options, key)}")
        if options.distractors < 0:
            raise BadInput(f"{params_file}: {where}.distractors: must be >= 0, got {options.distractors}")
        self.passages = load_passages(options.docs, options.max_passage_words, options.min_passage_words)
        super().__init__(options, where, params_file)
        self.metrics["passages"] = len(self.passages)

    @property
    def inputs(self) -> dict[str, str]:
        return {**super().inputs, f"docs:{self.where}": passages_digest(self.passages)}

    def plan(self, ctx: GenerateContext, previous: Samples) -> Iterator[GroundedJob]:
        """Every passage `per_passage` times, each with a seeded kind and, for citations, the passages shown."""
        tpl = self.template(ctx, "user", *self.o.kinds)
        rng = random.Random(ctx.seed + 3)
        # Every job's kind is drawn before any citation's distractors: one seeded sequence, in this order.
        kinds = [self.o.kinds[rng.randrange(len(self.o.kinds))] for _ in range(len(self.passages) * self.o.per_passage)]
        for number, kind in enumerate(kinds):
            passage, copy = self.passages[number // self.o.per_passage], number % self.o.per_passage
            shown = [passage]
            if kind == "citation":
                others = [p for p in self.passages if p.id != passage.id]
                shown += rng.sample(others, min(self.o.distractors, len(others)))
                rng.shuffle(shown)
            request = self.llm.request(
                _messages(tpl, {"passage": passage.text, "passage_id": passage.id, "title": passage.title, "copy": copy}),
                seed=request_seed(ctx.seed, f"{passage.id}:{copy}"),
            )
            yield GroundedJob(passage, copy, kind, shown, request)

    def make(self, ctx: GenerateContext, jobs: list[GroundedJob]) -> list[Planned]:
        tpl = self.template(ctx, "user", *self.o.kinds)
        completions = self.complete([job.request for job in jobs], desc="grounded Q&A")
        planned = []
        for (passage, copy, kind, shown, request), completion in zip(jobs, completions, strict=True):
            qa, problem = parse_question_answer(completion.text)
            question, answer = qa or ("", "")
            reference = {"answer": answer} if kind == "qa" else {"answer": answer, "citation": passage.id}
            variables = {"passage": passage.text, "passage_id": passage.id, "title": passage.title, "question": question}
            variables["passages"] = [{"id": p.id, "title": p.title, "text": p.text} for p in shown]
            content = {
                "prompt": _render(tpl, kind, variables) if qa else completion.text,
                "reference": json.dumps(reference, ensure_ascii=False),
                "label": KIND_LABELS[kind],
                "constraints": [],
                "locale": "",
                "context": passage.text,
            }
            planned.append(
                Planned(
                    content=content,
                    origin={
                        "method": self.name,
                        "passage": passage.id,
                        "copy": copy,
                        "kind": kind,
                        "version": tpl.version,
                        "model": self.llm.identity,
                    },
                    source={"uri": passage.uri, "record_id": passage.id, "row": passage.index},
                    template=tpl,
                    params={"kind": kind, "copy": copy, "shown_passages": [p.id for p in shown], "request_seed": request.seed},
                    tags=[f"grounded:{kind}"],
                    raw_output=completion.text,
                    parsed=qa is not None,
                    rejection=("generate.unparsed", f"{problem}: {_short(completion.text)!r}") if problem else None,
                )
            )
        return planned
