"""generate: text samples from source records, documents and versioned prompts.

Methods are named in `params.yaml: generate.methods` and run in order; a method may derive samples from what
the earlier ones produced (adversarial variants and paraphrases take earlier samples as parents):

  template      source record x prompt template x constraint subsets (no model)
  adversarial   an injection, manipulation or format-breaking payload planted in an earlier sample (no model)
  paraphrase    an LLM rewrites an earlier sample, keeping its facts (synthforge.text.llm_methods)
  grounded      an LLM writes Q&A and citation cases from passages of real documents (synthforge.text.llm_methods)

What an LLM wrote that does not parse, or that breaks the method's own rule (a paraphrase that loses a fact), is
kept in `rejected/` with the reason and the raw output.

A method (built in, or a third party's through the `synthforge.generators` entry point group) has a `name`, an
`Options` dataclass, `__init__(options, where, params_file)`, the `model` and `model_revision` its samples record,
and two steps:

  plan(ctx, previous) -> Iterable[job]      what to make, in order: cheap, seeded decisions only
  make(ctx, jobs) -> list[Planned]          the samples of one generation batch of jobs: the costly part

`previous` reads back the kept samples of the methods before it. Generation streams: every batch goes to a
journal on disk as it is made (synthforge.resume.Journal) and nothing holds every sample at once. A run killed
midway and run again with the same settings makes only the batches the journal lacks.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import random
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa

from synthforge.engine import get_engine
from synthforge.errors import BadInput
from synthforge.params import parse_options
from synthforge.plugins import resolve
from synthforge.provenance import make_sample_id, new_record
from synthforge.resume import Journal
from synthforge.sources import PromptTemplate, SourceRecord, file_digest, load_prompts, load_sources
from synthforge.stagedir import DEFAULT_BATCH_ROWS, StageWriter, rejected_schema, stage_fingerprint, with_provenance

if TYPE_CHECKING:
    from jinja2 import Template

CONTENT_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("label", pa.string()),
        ("constraints", pa.list_(pa.string())),
        ("locale", pa.string()),
        ("context", pa.string()),  # the source passage of a source-grounded sample; null otherwise
    ]
)

Row = dict[str, Any]
TEMPLATE_ENGINE = "jinja2-template-engine"  # the "generation model" of template-based methods


@dataclass
class Planned:
    """One sample a method decided to make, before it gets its id, batch and provenance."""

    content: dict[str, Any]
    origin: dict[str, Any]  # what makes it unique besides its content (method, template, record, variant)
    source: dict[str, Any]
    template: PromptTemplate
    params: dict[str, Any]
    parent_ids: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    raw_output: str | None = None  # what the LLM wrote (LLM methods only)
    parsed: bool | None = None
    rejection: tuple[str, str] | None = None  # (rejected_by, reason) when the output is unusable


@dataclass
class GenerateContext:
    sources: list[SourceRecord]
    prompts: dict[str, PromptTemplate]
    seed: int
    run_id: str
    fingerprint: str
    batch_size: int
    params_file: str

    def emit(self, method: str, batch_id: str, planned: list[Planned], model: str, model_revision: str | None) -> list[Row]:
        """One generation batch's samples with provenance. A planned sample with a rejection comes back with
        `rejected_by` and `reason` set, the others with both None."""
        out = []
        for p in planned:
            sid = make_sample_id(p.origin, p.content)
            prov = new_record(
                sample_id=sid,
                run_id=self.run_id,
                source=p.source,
                method=method,
                model=model,
                model_revision=model_revision,
                batch_id=batch_id,
                seed=self.seed,
                params=p.params,
                prompt_template_id=p.template.id,
                prompt_version=p.template.version,
                prompt_hash=p.template.hash,
                parent_ids=p.parent_ids,
                raw_output=p.raw_output,
                parsed=p.parsed,
            )
            prov["tags"] = list(p.tags)
            rejected_by, reason = p.rejection or (None, None)
            out.append(
                {
                    "sample_id": sid,
                    **{"context": None, **p.content},
                    "provenance": prov,
                    "rejected_by": rejected_by,
                    "reason": reason,
                }
            )
        return out


class Samples:
    """The kept (or the rejected) samples of finished generation batches, read back from the journal a batch at a time."""

    def __init__(self, journal: Journal, batch_ids: list[str], rejected: bool = False):
        self.journal = journal
        self.batch_ids = batch_ids
        self.rejected = rejected

    def __iter__(self) -> Iterator[Row]:
        for batch_id in self.batch_ids:
            for row in self.journal.read(batch_id):
                if (row["rejected_by"] is not None) == self.rejected:
                    yield row

    def __len__(self) -> int:
        return sum(
            (row["rejected_by"] is not None) == self.rejected
            for batch_id in self.batch_ids
            for row in self.journal.read(batch_id, ["rejected_by"])
        )


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def jinja_env():
    from jinja2 import Undefined
    from jinja2.sandbox import SandboxedEnvironment

    class VisiblyMissing(Undefined):
        """A variable the source record lacks renders as a marker the judge's banned patterns catch."""

        def __str__(self) -> str:
            return f"<<missing:{self._undefined_name}>>"

    return SandboxedEnvironment(undefined=VisiblyMissing, autoescape=False, keep_trailing_newline=False)


class CompiledTemplate(NamedTuple):
    instruction: Template
    message: Template
    fields: dict[str, Template]  # reference field -> its value
    constraints: list[Template]


@dataclass
class TemplateOptions:
    templates: list[str] | None = None  # template ids; None = every template with a `message`
    max_constraints: int = 3
    variants_per_record: int = 6


class TemplateExpansion:
    """Source record x template x a seeded choice of constraint subsets -> prompt + expected JSON answer."""

    name = "template"
    Options = TemplateOptions
    model = TEMPLATE_ENGINE

    def __init__(self, options: TemplateOptions, where: str, params_file: str):
        import jinja2

        self.options = options
        self.model_revision = jinja2.__version__

    def plan(self, ctx: GenerateContext, previous: Samples) -> Iterator[Planned]:
        from jinja2 import TemplateError

        rng = random.Random(ctx.seed)
        # Every template compiles before the first sample is planned: a broken one is named before any work is done.
        compiled = [(tpl, self._compile(tpl)) for tpl in self._templates(ctx)]
        for tpl, parts in compiled:
            subsets = [
                c
                for k in range(min(self.options.max_constraints, len(parts.constraints)) + 1)
                for c in itertools.combinations(range(len(parts.constraints)), k)
            ]
            for src in ctx.sources:
                chosen = sorted(rng.sample(subsets, min(self.options.variants_per_record, len(subsets))))
                variables = src.record
                try:
                    message = parts.message.render(variables)
                    instruction = parts.instruction.render(variables)
                    reference = {name: str(value.render(variables)) for name, value in parts.fields.items()}
                    pool = [constraint.render(variables) for constraint in parts.constraints]
                except TemplateError as exc:
                    raise BadInput(f"{tpl.path}: {exc} (source record {src.id!r})") from None
                for subset in chosen:
                    constraints = [pool[i] for i in subset]
                    prompt = instruction
                    if constraints:
                        prompt += "\n" + "\n".join(f"- {c}" for c in constraints)
                    prompt += f"\n\nCustomer message:\n{message}"
                    content = {
                        "prompt": prompt,
                        "reference": json.dumps(reference, ensure_ascii=False),
                        "label": str(tpl.body["label"]),
                        "constraints": constraints,
                        "locale": str(variables.get("locale", "")),
                    }
                    origin = {
                        "method": self.name,
                        "template": tpl.id,
                        "version": tpl.version,
                        "record": src.id,
                        "constraints": subset,
                    }
                    yield Planned(
                        content=content,
                        origin=origin,
                        source={"uri": src.uri, "record_id": src.id, "row": src.line - 1},
                        template=tpl,
                        params={"constraint_ids": list(subset), "max_constraints": self.options.max_constraints},
                    )

    def make(self, ctx: GenerateContext, jobs: list[Planned]) -> list[Planned]:
        return jobs

    @staticmethod
    def _compile(tpl: PromptTemplate) -> CompiledTemplate:
        from jinja2 import TemplateError

        tpl.require("instruction", "message", "label", "fields")
        env = jinja_env()
        try:
            return CompiledTemplate(
                instruction=env.from_string(tpl.body["instruction"]),
                message=env.from_string(tpl.body["message"]),
                fields={f: env.from_string("{{ " + f + " }}") for f in tpl.body["fields"]},
                constraints=[env.from_string(c) for c in tpl.body.get("constraints", [])],
            )
        except TemplateError as exc:
            raise BadInput(f"{tpl.path}: not a valid template: {exc}") from None

    def _templates(self, ctx: GenerateContext) -> list[PromptTemplate]:
        if self.options.templates is None:
            return [t for t in ctx.prompts.values() if "message" in t.body]
        missing = [t for t in self.options.templates if t not in ctx.prompts]
        if missing:
            raise BadInput(f"{ctx.params_file}: generate.methods: unknown template id(s) {missing} (have: {sorted(ctx.prompts)})")
        return [ctx.prompts[t] for t in self.options.templates]


@dataclass
class AdversarialOptions:
    payloads: str = "adversarial-payloads"  # id of the prompt file holding the payload lists
    kinds: list[str] = field(default_factory=lambda: ["injection", "format_breaking"])
    rate: float = 0.3  # fraction of earlier samples that get an adversarial variant


class AdversarialVariants:
    """Plant an injection or a format-breaking payload into the customer message of an earlier sample.

    The expected answer stays the same: the variant tests whether a model ignores the payload. The parent's
    id goes into `parent_ids`, so tracing a bad parent finds its adversarial descendants too.
    """

    name = "adversarial"
    Options = AdversarialOptions
    model = TEMPLATE_ENGINE

    def __init__(self, options: AdversarialOptions, where: str, params_file: str):
        self.options = options
        self.model_revision = importlib.metadata.version("jinja2")

    def plan(self, ctx: GenerateContext, previous: Samples) -> Iterator[Planned]:
        if self.options.payloads not in ctx.prompts:
            raise BadInput(
                f"{ctx.params_file}: generate.methods: adversarial payload file {self.options.payloads!r} not found in prompts"
            )
        tpl = ctx.prompts[self.options.payloads]
        tpl.require(*self.options.kinds)
        select, draw = random.Random(ctx.seed + 1), random.Random(ctx.seed + 1)
        # One seeded sequence: a draw per earlier sample picks the parents, then two draws per parent pick its payload.
        for _ in range(len(previous)):
            draw.random()
        for parent in previous:
            if select.random() >= self.options.rate:
                continue
            kind = self.options.kinds[draw.randrange(len(self.options.kinds))]
            index = draw.randrange(len(tpl.body[kind]))
            payload = tpl.body[kind][index]
            # Payload goes inside the customer message, where untrusted text would really arrive.
            content = {**{k: parent[k] for k in CONTENT_SCHEMA.names}, "prompt": f"{parent['prompt']} {payload}"}
            origin = {"method": self.name, "parent": parent["sample_id"], "kind": kind, "payload": index, "version": tpl.version}
            yield Planned(
                content=content,
                origin=origin,
                source=parent["provenance"]["source"],
                template=tpl,
                params={"kind": kind, "payload_index": index, "rate": self.options.rate},
                parent_ids=[parent["sample_id"]],
                tags=[f"adversarial:{kind}"],
            )

    def make(self, ctx: GenerateContext, jobs: list[Planned]) -> list[Planned]:
        return jobs


def builtin_generators() -> dict[str, type]:
    from synthforge.text.llm_methods import Paraphrase, SourceGrounded

    return {g.name: g for g in (TemplateExpansion, AdversarialVariants, Paraphrase, SourceGrounded)}


@dataclass
class MethodWorker:
    """Makes one method's generation batches, (batch_id, jobs), as engine tasks: (batch_id, planned, counts).

    In this process it uses the driver's method. Pickled to a Ray actor it leaves the method (and its model)
    behind and builds its own on the first batch, so each actor loads the model once. `counts` are what make()
    added to the method's numeric metrics (cached responses): the driver sums them, wherever a batch ran.
    """

    project: str  # the folder params' paths are relative to
    spec: tuple  # (method class, options, where, params file)
    ctx: GenerateContext
    method: Any = None

    def __call__(self, task: tuple[str, list[Any]]) -> tuple[str, list[Planned], dict[str, float]]:
        batch_id, jobs = task
        if self.method is None:
            os.chdir(self.project)
            cls, options, where, params_file = self.spec
            self.method = cls(options, where, params_file)
        metrics = getattr(self.method, "metrics", {})
        before = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        planned = self.method.make(self.ctx, jobs)
        counts = {k: metrics[k] - v for k, v in before.items() if metrics[k] != v}
        metrics.update(before)  # counted once, by the driver
        return batch_id, planned, counts

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "method": None}


def _missing_batches(method, ctx: GenerateContext, previous: Samples, journal: Journal, batch_ids: list[str], advance):
    """The method's batches, numbered as they are planned (batch_ids grows), that the journal does not hold yet.
    Batch ids number the batches of the whole stage, so they are the same in every run of the same work."""
    for jobs in batched(method.plan(ctx, previous), ctx.batch_size):
        batch_id = f"{ctx.fingerprint[:8]}-{method.name}-{len(batch_ids):04d}"
        batch_ids.append(batch_id)
        if batch_id in journal:
            advance(len(jobs))
        else:
            yield batch_id, jobs


def run_generate(params: dict[str, Any], out: str | Path, sources: str | None = None) -> dict[str, Any]:
    from synthforge.progress import progress_bar

    section = params["generate"]
    params_file = params.get("__file__", "params.yaml")
    engine, _ = get_engine(params)  # first: a missing Ray fails before any model loads
    # Every method's name and options are checked before any method loads a model or reads documents.
    parsed = []
    for i, spec in enumerate(section["methods"]):
        where = f"generate.methods[{i}]"
        cls = resolve("generators", spec["name"], builtin_generators(), where, params_file)
        parsed.append((cls, parse_options(cls.Options, spec, where, params_file), where))
    methods = [cls(options, where, params_file) for cls, options, where in parsed]
    sources_path = sources or section["sources"]
    records = load_sources(sources_path)
    prompts = load_prompts(section["prompts"])
    inputs = {"sources": file_digest(sources_path), **{f"prompt:{p.id}": p.hash for p in prompts.values()}}
    for method in methods:
        inputs.update(getattr(method, "inputs", {}))  # documents read, model identities
    fingerprint = stage_fingerprint("generate", {"generate": {**section, "sources": None}, "seed": params["seed"]}, inputs)
    ctx = GenerateContext(
        sources=records,
        prompts=prompts,
        seed=int(params["seed"]),
        run_id=uuid.uuid4().hex[:12],
        fingerprint=fingerprint["fingerprint"],
        batch_size=int(section.get("batch_size", 256)),
        params_file=params_file,
    )
    with Journal.open(out, ctx.fingerprint, rejected_schema(with_provenance(CONTENT_SCHEMA))) as journal:
        batch_ids: list[str] = []  # in generation order
        made = 0
        for (cls, options, where), method in zip(parsed, methods, strict=True):
            previous = Samples(journal, list(batch_ids))  # the batches of the methods before this one
            worker = MethodWorker(os.getcwd(), (cls, options, where, params_file), ctx, method)
            with progress_bar(f"generate: {method.name}", None) as advance:
                todo = _missing_batches(method, ctx, previous, journal, batch_ids, advance)
                for batch_id, planned, counts in engine.run_tasks(worker, todo):
                    journal.write(batch_id, ctx.emit(method.name, batch_id, planned, method.model, method.model_revision))
                    for key, added in counts.items():
                        method.metrics[key] += added
                    made += 1
                    advance(len(planned))

        kept: Counter[str] = Counter()
        rejected: Counter[str] = Counter()
        with StageWriter(out, "generate", CONTENT_SCHEMA, fingerprint) as writer:
            # Every kept sample, then every rejected one, as the manifest has always listed them; a few thousand rows
            # at a time, so Parquet row groups are not as small as generation batches.
            for rows in batched(Samples(journal, batch_ids), DEFAULT_BATCH_ROWS):
                writer.write(rows)
                kept.update(r["provenance"]["generation"]["method"] for r in rows)
            for rows in batched(Samples(journal, batch_ids, rejected=True), DEFAULT_BATCH_ROWS):
                writer.write([], rows)
                rejected.update(r["provenance"]["generation"]["method"] for r in rows)
            writer.metrics = {
                "by_method": {
                    m.name: {"kept": kept[m.name], "rejected": rejected[m.name], **getattr(m, "metrics", {})} for m in methods
                },
                "sources": len(records),
                "prompt_templates": len(prompts),
                "resumed_batches": len(batch_ids) - made,
                "made_batches": made,
            }
    return writer.stats
