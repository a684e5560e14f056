"""generate: text samples from source records, documents and versioned prompts.

Methods are named in `params.yaml: generate.methods` and run in order; a method may derive samples from what
the earlier ones produced (adversarial variants and paraphrases take earlier samples as parents):

  template      source record x prompt template x constraint subsets (no model)
  adversarial   an injection, manipulation or format-breaking payload planted in an earlier sample (no model)
  paraphrase    an LLM rewrites an earlier sample, keeping its facts (synthforge.text.llm_methods)
  grounded      an LLM writes Q&A and citation cases from passages of real documents (synthforge.text.llm_methods)

What an LLM wrote that does not parse, or that breaks the method's own rule (a paraphrase that loses a fact), is
kept in `rejected/` with the reason and the raw output.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from synthforge.errors import BadInput
from synthforge.params import parse_options
from synthforge.plugins import resolve
from synthforge.provenance import make_sample_id, new_record
from synthforge.sources import PromptTemplate, SourceRecord, file_digest, load_prompts, load_sources
from synthforge.stagedir import StageWriter, stage_fingerprint

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
    _batches: itertools.count = field(default_factory=itertools.count)

    def emit(self, method: str, planned: list[Planned], model: str, model_revision: str | None) -> list[Row]:
        """Samples with provenance, cut into generation batches; each batch id is unique to this stage's work.

        A planned sample with a rejection comes back with `rejected_by` and `reason` set."""
        out = []
        for start in range(0, len(planned), self.batch_size):
            batch_id = f"{self.fingerprint[:8]}-{method}-{next(self._batches):04d}"
            for p in planned[start : start + self.batch_size]:
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
                row = {"sample_id": sid, **{"context": None, **p.content}, "provenance": prov}
                if p.rejection:
                    row["rejected_by"], row["reason"] = p.rejection
                out.append(row)
        return out


def jinja_env():
    from jinja2 import Undefined
    from jinja2.sandbox import SandboxedEnvironment

    class VisiblyMissing(Undefined):
        """A variable the source record lacks renders as a marker the judge's banned patterns catch."""

        def __str__(self) -> str:
            return f"<<missing:{self._undefined_name}>>"

    return SandboxedEnvironment(undefined=VisiblyMissing, autoescape=False, keep_trailing_newline=False)


@dataclass
class TemplateOptions:
    templates: list[str] | None = None  # template ids; None = every template with a `message`
    max_constraints: int = 3
    variants_per_record: int = 6


class TemplateExpansion:
    """Source record x template x a seeded choice of constraint subsets -> prompt + expected JSON answer."""

    name = "template"
    Options = TemplateOptions

    def __init__(self, options: TemplateOptions, where: str, params_file: str):
        self.options = options

    def generate(self, ctx: GenerateContext, previous: list[Row]) -> list[Row]:
        import jinja2

        env = jinja_env()
        templates = self._templates(ctx)
        rng = random.Random(ctx.seed)
        planned = []
        for tpl in templates:
            tpl.require("instruction", "message", "label", "fields")
            pool = list(tpl.body.get("constraints", []))
            subsets = [
                c
                for k in range(min(self.options.max_constraints, len(pool)) + 1)
                for c in itertools.combinations(range(len(pool)), k)
            ]
            for src in ctx.sources:
                chosen = sorted(rng.sample(subsets, min(self.options.variants_per_record, len(subsets))))
                variables = src.record
                message = env.from_string(tpl.body["message"]).render(variables)
                instruction = env.from_string(tpl.body["instruction"]).render(variables)
                reference = {f: str(env.from_string("{{ " + f + " }}").render(variables)) for f in tpl.body["fields"]}
                for subset in chosen:
                    constraints = [env.from_string(pool[i]).render(variables) for i in subset]
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
                    planned.append(
                        Planned(
                            content=content,
                            origin=origin,
                            source={"uri": src.uri, "record_id": src.id, "row": src.line - 1},
                            template=tpl,
                            params={"constraint_ids": list(subset), "max_constraints": self.options.max_constraints},
                        )
                    )
        return ctx.emit(self.name, planned, TEMPLATE_ENGINE, jinja2.__version__)

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

    def __init__(self, options: AdversarialOptions, where: str, params_file: str):
        self.options = options

    def generate(self, ctx: GenerateContext, previous: list[Row]) -> list[Row]:
        if self.options.payloads not in ctx.prompts:
            raise BadInput(
                f"{ctx.params_file}: generate.methods: adversarial payload file {self.options.payloads!r} not found in prompts"
            )
        tpl = ctx.prompts[self.options.payloads]
        tpl.require(*self.options.kinds)
        rng = random.Random(ctx.seed + 1)
        parents = [r for r in previous if rng.random() < self.options.rate]
        planned = []
        for parent in parents:
            kind = self.options.kinds[rng.randrange(len(self.options.kinds))]
            index = rng.randrange(len(tpl.body[kind]))
            payload = tpl.body[kind][index]
            # Payload goes inside the customer message, where untrusted text would really arrive.
            content = {**{k: parent[k] for k in CONTENT_SCHEMA.names}, "prompt": f"{parent['prompt']} {payload}"}
            origin = {"method": self.name, "parent": parent["sample_id"], "kind": kind, "payload": index, "version": tpl.version}
            planned.append(
                Planned(
                    content=content,
                    origin=origin,
                    source=parent["provenance"]["source"],
                    template=tpl,
                    params={"kind": kind, "payload_index": index, "rate": self.options.rate},
                    parent_ids=[parent["sample_id"]],
                    tags=[f"adversarial:{kind}"],
                )
            )
        return ctx.emit(self.name, planned, TEMPLATE_ENGINE, importlib.metadata.version("jinja2"))


def builtin_generators() -> dict[str, type]:
    from synthforge.text.llm_methods import Paraphrase, SourceGrounded

    return {g.name: g for g in (TemplateExpansion, AdversarialVariants, Paraphrase, SourceGrounded)}


def run_generate(params: dict[str, Any], out: str | Path, sources: str | None = None) -> dict[str, Any]:
    section = params["generate"]
    params_file = params.get("__file__", "params.yaml")
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
    produced: list[Row] = []
    rejected: list[Row] = []
    per_method: dict[str, dict[str, Any]] = {}
    for method in methods:
        rows = method.generate(ctx, produced)
        bad = [r for r in rows if "rejected_by" in r]
        per_method[method.name] = {"kept": len(rows) - len(bad), "rejected": len(bad), **getattr(method, "metrics", {})}
        produced += [r for r in rows if "rejected_by" not in r]
        rejected += bad
    with StageWriter(out, "generate", CONTENT_SCHEMA, fingerprint) as writer:
        writer.write(produced, rejected)
        writer.metrics = {"by_method": per_method, "sources": len(records), "prompt_templates": len(prompts)}
    return writer.stats
