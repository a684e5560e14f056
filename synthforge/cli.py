"""The `synthforge` command line. Commands are thin: each parses options and calls the library.

Heavy imports (pyarrow, datasets, duckdb) happen inside the commands so that `synthforge --help` is fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from synthforge.errors import BadInput, SynthforgeError

app = typer.Typer(
    help="Versioned synthetic datasets with per-sample provenance.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml of the pipeline.")]
InOpt = Annotated[Path, typer.Option("--in", help="Input stage directory.")]
RegistryOpt = Annotated[
    str | None, typer.Option("--registry", help="Registry folder (default: $SYNTHFORGE_REGISTRY, params.yaml, ./registry).")
]


def _params(path: Path, engine: str | None = None) -> dict:
    """params.yaml, validated; `--engine` replaces its `engine.name`."""
    from synthforge.params import load_params

    params = load_params(path)
    if engine is not None:
        from synthforge.engine import engine_options

        engine_options(params, override=engine)  # an unknown name fails now, before a stage loads its models
        params["engine"] = {**(params.get("engine") or {}), "name": engine}
    return params


def _report(stats: dict, out: Path) -> None:
    rejected = ", ".join(f"{k}: {v}" for k, v in stats["rejected_by"].items()) or "none"
    typer.echo(
        f"{stats['stage']}: {stats['entered']} in, {stats['kept']} kept, {stats['rejected']} rejected ({rejected}) -> {out}"
    )


EngineOpt = Annotated[
    str | None,
    typer.Option("--engine", help="Where the stage runs: local, or ray (extra synthforge[ray]); default: params engine.name."),
]
RealOpt = Annotated[Path, typer.Option("--real", help="Real data folder (written by `synthforge real`).")]
ClassifierOpt = Annotated[Path, typer.Option("--classifier", help="Reference classifier folder.")]


@app.command()
def real(
    out: Annotated[Path, typer.Option("--out", help="Real data folder.")] = Path("data/real"),
    params: ParamsOpt = Path("params.yaml"),
):
    """Read the real image dataset in params `real` into train/test Parquet with PNG images."""
    from synthforge.stages.prepare import run_real

    info = run_real(_params(params), out)
    counts = info["counts"]
    typer.echo(f"real: {counts['train']} train, {counts['test']} test images, {len(info['class_names'])} classes -> {out}")


@app.command()
def classifier(
    real: RealOpt = Path("data/real"),
    out: Annotated[Path, typer.Option("--out", help="Classifier folder.")] = Path("models/classifier"),
    params: ParamsOpt = Path("params.yaml"),
):
    """Train the reference classifier on the real training split, saving the checkpoints VoG needs."""
    from synthforge.stages.prepare import run_classifier

    stats = run_classifier(_params(params), real, out)
    typer.echo(f"classifier: test accuracy {stats['test_accuracy']}, checkpoints {', '.join(stats['checkpoints'])} -> {out}")


@app.command()
def adapt(
    real: RealOpt = Path("data/real"),
    out: Annotated[Path, typer.Option("--out", help="Generator folder.")] = Path("models/generator"),
    params: ParamsOpt = Path("params.yaml"),
):
    """Adapt the generator family in params `generator` to the real training images (LoRA)."""
    from synthforge.stages.prepare import run_adapt

    meta = run_adapt(_params(params), real, out)
    typer.echo(f"adapt: {meta['family']} adapter {meta['adapter_hash'][:12]} -> {out}")


@app.command()
def seeds(
    real: RealOpt = Path("data/real"),
    classifier: ClassifierOpt = Path("models/classifier"),
    out: Annotated[Path, typer.Option("--out", help="Seeds folder.")] = Path("data/seeds"),
    params: ParamsOpt = Path("params.yaml"),
):
    """Marginal sampling: the real images the classifier finds hardest, with budgets and caption variants."""
    from synthforge.stages.seeds import run_seeds

    stats = run_seeds(_params(params), real, classifier, out)
    typer.echo(
        f"seeds: {stats['selected']} of {stats['real_train']} real images, {stats['images_planned']} images planned -> {out}"
    )


@app.command()
def gaps(
    real: RealOpt = Path("data/real"),
    classifier: ClassifierOpt = Path("models/classifier"),
    out: Annotated[Path, typer.Option("--out", help="Gaps folder: gaps.json, budget.json, figures.")] = Path("data/gaps"),
    params: ParamsOpt = Path("params.yaml"),
):
    """Where the real data is thin or the classifier weak, by class and difficulty, and a per-class image budget."""
    from rich.console import Console
    from rich.table import Table

    from synthforge.gaps import find_gaps

    result = find_gaps(_params(params), real, classifier, out)
    table = Table("class", "train", "test accuracy", "hard + adversarial (test)", "flags", "budget")
    for name, c in result["per_class"].items():
        accuracy = "-" if c["test_accuracy"] is None else f"{c['test_accuracy']:.3f}"
        hard = c["difficulty"]["hard"] + c["difficulty"]["adversarial"]
        flags = ", ".join(flag for flag in ("thin", "weak") if c[flag]) or "-"
        table.add_row(name, str(c["train"]), accuracy, f"{hard} of {c['test']}", flags, str(c["budget"]))
    Console().print(table)
    for name, c in result["per_class"].items():
        for reason in c["reasons"]:
            typer.echo(f"  {name}: {reason}")
    levels = ", ".join(f"{level} {d['test']} (accuracy {d['test_accuracy']})" for level, d in result["difficulty"].items())
    typer.echo(f"real test images by difficulty: {levels}")
    typer.echo(
        f"gaps: test accuracy {result['overall']['test_accuracy']}, {len(result['thin'])} thin and {len(result['weak'])} weak "
        f"classes, {result['budget_total']} images budgeted -> {out}/budget.json"
    )


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="Output stage directory.")] = Path("data/generated"),
    params: ParamsOpt = Path("params.yaml"),
    sources: Annotated[str | None, typer.Option("--in", help="Source records (text; default: params generate.sources).")] = None,
    seeds_dir: Annotated[Path, typer.Option("--seeds", help="Seeds folder (images).")] = Path("data/seeds"),
    real: RealOpt = Path("data/real"),
    generator: Annotated[Path, typer.Option("--generator", help="Adapted generator folder (images).")] = Path("models/generator"),
    engine: EngineOpt = None,
):
    """Generate samples: text from sources and versioned prompts, or images from seeds and the adapted generator.

    On Ray, generation batches are made by an actor pool (engine.ray.actors, gpus_per_actor GPUs each) that loads
    the generator (diffusion model or LLM) once per actor."""
    p = _params(params, engine)
    if p["generate"].get("modality") == "image":
        from synthforge.stages.generate_images import run_generate_images

        _report(run_generate_images(p, seeds_dir, real, generator, out), out)
    else:
        from synthforge.stages.generate import run_generate

        _report(run_generate(p, out, sources), out)


@app.command()
def judge(
    src: InOpt = Path("data/generated"),
    out: Annotated[Path, typer.Option("--out", help="Output stage directory.")] = Path("data/judged"),
    params: ParamsOpt = Path("params.yaml"),
    allow_self_judge: Annotated[
        bool, typer.Option("--allow-self-judge", help="Let an LLM judge grade samples it generated itself (recorded).")
    ] = False,
    engine: EngineOpt = None,
):
    """Run every judge check; failures go to rejected/ with the check and its reason."""
    from synthforge.stages.judge import run_judge

    _report(run_judge(_params(params, engine), src, out, allow_self_judge=allow_self_judge), out)


# The stages that read one stage directory and write the next: (command, runner, default in, default out, help)
_STAGE_COMMANDS = [
    (
        "dedup",
        "synthforge.stages.dedup:run_dedup",
        "judged",
        "deduped",
        "Dedup (text: exact + MinHash LSH; images: perceptual hash, also against real images) with cluster and representative.",
    ),
    (
        "tag",
        "synthforge.stages.tag:run_tag",
        "deduped",
        "tagged",
        "Tag difficulty (easy / medium / hard / adversarial) with the rule that fired and its features.",
    ),
    (
        "split",
        "synthforge.stages.split:run_split",
        "tagged",
        "split",
        "Deterministic split grouped by source or parent and stratified, with a leakage check.",
    ),
]


def _add_stage_command(name: str, runner: str, default_in: str, default_out: str, doc: str) -> None:
    def command(
        src: InOpt = Path("data") / default_in,
        out: Annotated[Path, typer.Option("--out", help="Output stage directory.")] = Path("data") / default_out,
        params: ParamsOpt = Path("params.yaml"),
        engine: EngineOpt = None,
    ):
        module, func = runner.split(":")
        run = getattr(importlib.import_module(module), func)
        _report(run(_params(params, engine), src, out), out)

    command.__doc__ = doc
    app.command(name)(command)


for _spec in _STAGE_COMMANDS:
    _add_stage_command(*_spec)


review_app = typer.Typer(
    help="Manual spot check: export samples for a person to review, import the verdicts.", no_args_is_help=True
)
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(
    out: Annotated[Path, typer.Option("--out", help="review.csv, or review.html (a page with pass/fail buttons).")],
    src: InOpt = Path("data/tagged"),
    n: Annotated[int, typer.Option("--n", help="How many samples (at least one per stratum).")] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample.")] = 0,
    reviewer_fields: Annotated[
        str | None,
        typer.Option("--reviewer-fields", help="Comma-separated content fields to show (default: prompt,reference,context)."),
    ] = None,
):
    """Write a sample stratified by generation method, difficulty and judge score for a person to review."""
    from synthforge.text.review import export_review

    fields = [f.strip() for f in reviewer_fields.split(",") if f.strip()] if reviewer_fields else None
    info = export_review(src, out, n=n, seed=seed, fields=fields)
    more = f" (more than --n {n}: every stratum gets one)" if info["samples"] > n else ""
    typer.echo(f"review: {info['samples']} samples from {info['strata']} strata{more} -> {out}")
    typer.echo(f"fill in verdict (pass/fail) and notes, then: synthforge review import FILE --reviewer NAME --in {src}")


@review_app.command("import")
def review_import(
    filled: Annotated[Path, typer.Argument(help="The filled review CSV.")],
    reviewer: Annotated[str, typer.Option("--reviewer", help="Who reviewed (recorded as judged_by).")],
    ledger: Annotated[Path, typer.Option("--ledger", help="The verdict ledger the `review` check reads.")] = Path(
        "reviews/verdicts.jsonl"
    ),
    src: Annotated[Path | None, typer.Option("--in", help="Stage directory the sample ids must come from.")] = None,
):
    """Record a filled review file's verdicts in the ledger; `synthforge judge` (or `dvc repro`) applies them."""
    from synthforge.text.review import import_review

    info = import_review(filled, reviewer, ledger, src)
    replaced = f", {info['replaced']} replacing earlier verdicts" if info["replaced"] else ""
    typer.echo(
        f"review: recorded {info['recorded']} verdicts by {reviewer.strip()} ({info['pass']} pass, {info['fail']} fail"
        f"{replaced}; {info['blank']} blank rows skipped) -> {ledger}"
    )
    typer.echo("`dvc repro` (or `synthforge judge`) applies them through the `review` judge check")


@app.command()
def agent(
    real: RealOpt = Path("data/real"),
    generator: Annotated[Path, typer.Option("--generator", help="Adapted generator folder (online mode).")] = Path(
        "models/generator"
    ),
    out: Annotated[Path, typer.Option("--out", help="Output stage directory: every image the loop made or took.")] = Path(
        "data/agent"
    ),
    classifier_out: Annotated[Path, typer.Option("--classifier-out", help="Folder for the fine-tuned classifier.")] = Path(
        "models/agent"
    ),
    pool: Annotated[
        Path | None, typer.Option("--pool", help="Pre-generated images (a `synthforge generate` output) for agent.mode: offline.")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """GenDataAgent's on-the-fly loop: warm-up, then per iteration marginal sampling, generation (or a pool), VoG, fine-tuning."""
    from synthforge.onthefly import run_agent

    stats = run_agent(_params(params), real, generator, out, classifier_out, pool)
    _report(stats, out)
    iterations = len(stats["iterations"])
    typer.echo(f"agent: classifier test accuracy {stats['test_accuracy']} after {iterations} iterations -> {classifier_out}")


@app.command()
def evaluate(
    real: RealOpt = Path("data/real"),
    classifier: ClassifierOpt = Path("models/classifier"),
    out: Annotated[Path, typer.Option("--out", help="Evaluation folder.")] = Path("data/evaluation"),
    params: ParamsOpt = Path("params.yaml"),
    registry: RegistryOpt = None,
):
    """Does the synthetic data help? Train under the settings in params `evaluate` over several seeds and compare
    every metric with the baseline on the real test images: helps / no measurable effect / hurts."""
    from rich.console import Console
    from rich.table import Table

    from synthforge.evaluate import run_evaluate, verdict_sentences
    from synthforge.metrics import METRICS
    from synthforge.registry import resolve_registry

    p = _params(params)
    result = run_evaluate(p, real, classifier, out, resolve_registry(registry, p, Path(".")))
    marks = {"helps": "[green]▲ helps[/]", "hurts": "[red]▼ hurts[/]", "no measurable effect": "[dim]= no effect[/]"}
    table = Table("setting", *METRICS, title=f"real test images: mean over {len(result['seeds'])} seeds, vs the baseline")
    for name, summary in result["comparison"]["settings"].items():
        cells = []
        for m in METRICS:
            s, v = summary["overall"][m], (summary.get("verdicts") or {}).get(m)
            text = "n/a" if s["mean"] is None else f"{s['mean']:.3f}"
            if v and v["delta"] is not None:
                text += f" {v['delta']:+.3f}\n{marks.get(v['verdict'], v['verdict'])}"
            cells.append(text)
        table.add_row(name, *cells)
    console = Console()
    console.print(table)
    for line in verdict_sentences(result):
        console.print(line)
    console.print(f"-> {out}/metrics.json, evaluation.json, summary.md, metrics.png, per_class_accuracy.png")


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(help="JSONL, CSV, Parquet file or a Hugging Face dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="Output stage directory.")],
    text_field: Annotated[list[str], typer.Option("--text-field", help="A text column to keep (repeatable).")],
    label_field: Annotated[str | None, typer.Option("--label-field", help="Column holding the label.")] = None,
    model: Annotated[str, typer.Option("--model", help="The model that made these samples, if known.")] = "unknown",
    batch_id: Annotated[str | None, typer.Option("--batch-id", help="Batch id to record (default: from the file hash).")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Which split of a multi-split dataset folder.")] = None,
):
    """Turn samples made elsewhere into a stage directory with provenance (method `imported`)."""
    from synthforge.stages.ingest import run_ingest

    _report(run_ingest(file, out, text_field, label_field, model, batch_id, split), out)


@app.command()
def publish(
    name: Annotated[
        str | None, typer.Option("--name", help="Dataset name in the local registry (default: params publish.name).")
    ] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", help="Semantic version, e.g. 1.2.0 (default: what the diff against the latest calls for)."),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="Publish to the Hugging Face Hub instead: hf://ORG/NAME (token: HF_TOKEN or hf auth login)."),
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the Hub repository as private.")] = False,
    data: Annotated[Path, typer.Option("--data", help="The split stage directory.")] = Path("data/split"),
    params: ParamsOpt = Path("params.yaml"),
    registry: RegistryOpt = None,
):
    """Publish the split stage as an immutable version (local registry, or the Hub with --to)."""
    from synthforge.project import publish_and_describe

    publish_and_describe(_params(params), data, name, version, registry, to=to, private=private)


DatasetArg = Annotated[str, typer.Argument(help="Dataset: a name in the local registry, or hf://ORG/NAME.")]


def _store(name: str, registry: str | None):
    from synthforge.registry import resolve_registry
    from synthforge.versions import open_store

    return open_store(name, resolve_registry(registry, _optional_params()))


@app.command()
def diff(
    name: DatasetArg,
    old: Annotated[str, typer.Argument(help="The earlier version.")],
    new: Annotated[str, typer.Argument(help="The later version.")],
    registry: RegistryOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """Samples added, removed, changed and moved between splits, and how the distributions shifted."""
    import json

    from synthforge.diff import diff_manifests, print_diff
    from synthforge.versions import manifest

    store = _store(name, registry)
    a, b = store.version(old), store.version(new)
    result = diff_manifests(manifest(store, a), manifest(store, b), old_label=a.version, new_label=b.version)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_diff(result)


@app.command()
def report(
    name: DatasetArg,
    version: Annotated[str, typer.Argument(help="The version.")],
    out: Annotated[Path | None, typer.Option("--out", help="HTML file (default: NAME-VERSION.html).")] = None,
    registry: RegistryOpt = None,
):
    """Write a version's dataset card, figures included, as one standalone HTML page."""
    from synthforge.report import write_report

    store = _store(name, registry)
    info = store.version(version)
    out = out or Path(f"{store.label.rsplit('/', 1)[-1]}-{info.version}.html")
    write_report(store.files(info), out)
    typer.echo(f"report: {store.label} {info.version} -> {out}")


@app.command()
def versions(
    name: Annotated[str | None, typer.Argument(help="Dataset: a local name or hf://ORG/NAME (default: all local ones).")] = None,
    registry: RegistryOpt = None,
):
    """List datasets and their versions with counts, dates, and which versions a quarantine marked as affected."""
    from rich.console import Console
    from rich.table import Table

    from synthforge.registry import Registry, resolve_registry
    from synthforge.versions import advisories

    reg = Registry(resolve_registry(registry, _optional_params()))
    table = Table("dataset", "version", "published", "samples", "splits", "commit", "status")
    for store in [_store(name, registry)] if name else [reg.dataset(n) for n in reg.names()]:
        known = advisories(store)
        for v in store.versions():
            splits = ", ".join(f"{s} {n}" for s, n in v.counts.items())
            status = "; ".join(
                f"quarantined: {a['reason']} (use {a['clean_version']})" for a in known if v.version in a["affects"]
            )
            table.add_row(store.label, v.version, v.date, str(v.total), splits, v.commit[:10], status or "ok")
    if not table.rows:
        typer.echo(f"no published datasets in {name or reg.root}")
        return
    Console().print(table)


@app.command()
def trace(
    batch: Annotated[str | None, typer.Option("--batch", help="A generation batch id.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="A generation model.")] = None,
    prompt_version: Annotated[str | None, typer.Option("--prompt-version", help="VERSION or TEMPLATE_ID@VERSION.")] = None,
    sample: Annotated[str | None, typer.Option("--sample", help="A sample id (or a unique prefix).")] = None,
    text: Annotated[
        list[str] | None, typer.Option("--text", help="A text to find: a contaminated or suspicious item (repeatable).")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Items to find: .jsonl (one object per line, optional `id`) or .txt (one per line)."),
    ] = None,
    field: Annotated[str, typer.Option("--field", help="The field of a .jsonl item that holds its text.")] = "text",
    methods: Annotated[
        str, typer.Option("--methods", help="Text matches, comma-separated: exact, ngram (13 words), minhash.")
    ] = "exact,ngram,minhash",
    data: Annotated[Path, typer.Option("--data", help="Folder of stage directories.")] = Path("data"),
    registry: RegistryOpt = None,
    hub: Annotated[
        list[str] | None, typer.Option("--hub", help="Also search every version of a Hub dataset: hf://ORG/NAME (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """Which samples came from a batch/model/prompt version or match a text, what became of each, which versions hold them."""
    from synthforge.registry import resolve_registry
    from synthforge.trace import print_trace, read_items
    from synthforge.trace import trace as run_trace

    if text and file:
        raise BadInput("trace takes --text or --file, not both")
    hub_stores = [_store(target, None) for target in hub or []]
    result = run_trace(
        data,
        resolve_registry(registry, _optional_params()),
        batch=batch,
        model=model,
        prompt_version=prompt_version,
        sample=sample,
        texts=read_items(file, field) if file else text,
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        versions=[(f"{s.label} v{v.version}", s.files(v)) for s in hub_stores for v in s.versions()],
    )
    if as_json:
        typer.echo(result.to_json())
    else:
        print_trace(result)


@app.command()
def quarantine(
    name: DatasetArg,
    reason: Annotated[str, typer.Option("--reason", help="Why: goes into the changelog, the card and every warning.")],
    batch: Annotated[str | None, typer.Option("--batch", help="A generation batch id.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="A generation model.")] = None,
    prompt_version: Annotated[str | None, typer.Option("--prompt-version", help="VERSION or TEMPLATE_ID@VERSION.")] = None,
    samples: Annotated[
        Path | None, typer.Option("--samples", help="File of sample ids: one per line, or JSONL with a sample_id field.")
    ] = None,
    data: Annotated[Path, typer.Option("--data", help="Folder of stage directories (finds descendants).")] = Path("data"),
    registry: RegistryOpt = None,
):
    """Publish the next MAJOR version without the affected samples and their descendants; mark earlier versions."""
    from synthforge.versions import affected_samples, read_sample_ids
    from synthforge.versions import quarantine as run_quarantine

    store = _store(name, registry)
    given = {"batch": batch, "model": model, "prompt_version": prompt_version, "samples": str(samples) if samples else None}
    selector = {k: v for k, v in given.items() if v}
    if len(selector) != 1:
        raise BadInput("quarantine needs exactly one of --batch, --model, --prompt-version, --samples")
    ids = read_sample_ids(samples) if samples else None
    affected = affected_samples(store, data, selector, ids)
    result = run_quarantine(store, affected, reason=reason, selector=selector, project=Path("."))
    advisory = result.advisory
    affects = ", ".join(f"{v} ({n} samples)" for v, n in advisory["samples"].items())
    typer.echo(f"quarantine: {len(affected)} samples selected (with descendants); affected versions: {affects}")
    if result.published:
        info = result.published.info
        counts = ", ".join(f"{s}: {n}" for s, n in info.counts.items())
        typer.echo(f"published {store.label} v{info.version} without {result.removed} samples ({counts})")
    typer.echo(f"clean version: {advisory['clean_version']}; loading an affected version now warns and names it")


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="New project folder.")],
    pipeline: Annotated[
        str, typer.Option("--pipeline", help="Bundled pipeline: digits (default) or one in pipelines/.")
    ] = "digits",
):
    """Scaffold a project: git + DVC (analytics off), a bundled pipeline's dvc.yaml and params.yaml, schemas/."""
    from synthforge.project import init_project

    init_project(directory, pipeline)
    typer.echo(f"initialised {directory}: cd {directory} && dvc repro && synthforge publish")


@app.command()
def demo(project: Annotated[Path, typer.Option("--project", help="Project folder.")] = Path(".")):
    """The main job: `dvc repro` of the pipeline, publish the version in params.yaml, print a summary."""
    from synthforge.project import run_demo

    run_demo(project)


def _optional_params() -> dict | None:
    return _params(Path("params.yaml")) if Path("params.yaml").exists() else None


def main() -> None:
    # Our own progress bars show long work; the libraries' weight-loading bars and advisories would bury an
    # error message under lines of noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except SynthforgeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
