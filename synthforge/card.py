"""The dataset card (README.md with Hub YAML) of a published version, and the figures it shows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from synthforge import plots

Row = dict[str, Any]
ClassKey = tuple[str, list]

# Options of judge checks that are a pass/fail boundary on the score the check records (judge.checks[] in params).
_THRESHOLD_OPTIONS = {
    "llm_judge": ("min_score",),
    "image_format": ("min_std",),
    "length": ("min_chars", "max_chars"),
    "safety": ("threshold",),
}


@dataclass(frozen=True)
class Figure:
    """A PNG the card shows: path relative to the version tree (e.g. images/difficulty_by_split.png)."""

    title: str
    path: str
    caption: str
    section: str  # the card section it goes in: splits, samples, labels, quality or generators


def size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return label
    return "1M<n<10M"


def class_key(schema: pa.Schema, rows: list[Row]) -> ClassKey | None:
    """The column naming a row's class (label_name, else label) and its values in label-id order, the order a
    classifier uses; None for data without labels."""
    column = next((c for c in ("label_name", "label") if c in schema.names), None)
    if column is None:
        return None

    def by_label(row: Row) -> tuple:
        label = row.get("label")
        return (not isinstance(label, int), label if isinstance(label, int) else 0, str(row[column]))

    return column, list(dict.fromkeys(r[column] for r in sorted(rows, key=by_label)))


def _class_counts(by_split: dict[str, list[Row]], classes: ClassKey) -> dict[str, dict[str, int]]:
    """{class: {split: samples}} in label order, for the card's per-class table."""
    column, order = classes
    counts: dict[Any, dict[str, int]] = {c: {} for c in order}
    for split, rows in by_split.items():
        for r in rows:
            counts[r[column]][split] = counts[r[column]].get(split, 0) + 1
    return {plots.NONE_LABEL if c is None else str(c): n for c, n in counts.items()}


def _difficulty(row: Row) -> str | None:
    return row["provenance"]["difficulty"]


def _generator_key(generation: dict[str, Any]) -> str:
    """method · model · template@version, the line a generator gets in the card's breakdown."""
    template = generation["prompt_template_id"]
    prompt = f"{template}@{generation['prompt_version']}" if template else "no prompt template"
    return f"{generation['method']} · {generation['model']} · {prompt}"


def _judge_thresholds(stage_info: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{check name: {option: value}} for the checks whose pass boundary the judge stage recorded in its params (what
    it ran with, which params.yaml may no longer say); a check configured twice (two LLM judges) is left out,
    since its scores cannot be told apart by name."""
    params = next((info["params"] for info in stage_info if info["stage"] == "judge"), None) or {}
    specs = (params.get("judge") or {}).get("checks") or []
    names = Counter(spec["name"] for spec in specs)
    return {
        spec["name"]: {
            key: spec[key] for key in _THRESHOLD_OPTIONS.get(spec["name"], ()) if isinstance(spec.get(key), int | float)
        }
        for spec in specs
        if names[spec["name"]] == 1
    }


def _judge_panels(rows: list[Row], stage_info: Sequence[dict[str, Any]]) -> list[tuple[str, list[float], dict[str, float]]]:
    """(check, scores, thresholds) for every judge check that recorded numeric scores, in the judge's order.
    The vog check is left out: its score is the normalised VoG, which the VoG figure shows per class."""
    scores: dict[str, list[float]] = {}
    for row in rows:
        for check in (row["provenance"]["judge"] or {}).get("checks") or []:
            if check["name"] != "vog" and check.get("score") is not None:
                scores.setdefault(check["name"], []).append(check["score"])
    thresholds = _judge_thresholds(stage_info)
    return [(name, values, thresholds.get(name, {})) for name, values in scores.items()]


def _vog_by_class(rows: list[Row], class_key: ClassKey | None) -> list[tuple[Any, list[float], float | None]]:
    """(class, normalised VoG scores, the class's drop boundary) in label order, the most populous MAX_BARS
    classes and then "other"; a single "all" entry for data without classes."""
    if class_key is None:
        return [("all", [r["provenance"]["vog"]["normalized"] for r in rows], None)]
    column, order = class_key
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[column], []).append(row["provenance"]["vog"])
    shown, rest = plots.top_values({c: len(v) for c, v in groups.items()}, [c for c in order if c in groups], plots.MAX_BARS)
    # Every sample of a class carries its class's boundary.
    entries = [(c, [v["normalized"] for v in groups[c]], groups[c][0]["class_threshold"]) for c in shown]
    if rest:
        entries.append(("other", [v["normalized"] for c in rest for v in groups[c]], None))
    return entries


def card_figures(
    folder: Path,
    by_split: dict[str, list[Row]],
    *,
    image_column: str | None,
    class_key: ClassKey | None,
    stage_info: Sequence[dict[str, Any]] = (),
    evaluation: dict[str, Any] | None = None,
) -> list[Figure]:
    """Draw the card's figures into `folder` (the version's images/) and return them, in card order.

    by_split: {split: rows with sample_id, content columns and provenance}, in split order. image_column: the
    column of PNG bytes for image data. class_key: (column, classes in label order) from `class_key`.
    stage_info: the stage.json of each stage that made the samples; the judge stage's params give the pass
    thresholds drawn on the judge score histograms. Only figures with data are drawn: no judge histogram for a
    dataset without scores, no VoG or image grids for text. evaluation: `synthforge evaluate`'s result for these
    samples, drawn as its metric and per-class accuracy figures.
    """
    rows = [r for split_rows in by_split.values() for r in split_rows]
    figures: list[Figure] = []

    def add(file: str, png: bytes, title: str, caption: str, section: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / file).write_bytes(png)
        figures.append(Figure(title, f"{folder.name}/{file}", caption, section))

    if evaluation:
        settings = evaluation["comparison"]["settings"]
        per_class = {name: s["per_class_accuracy"] for name, s in settings.items()}
        add(
            "evaluation_metrics.png",
            plots.metrics_by_setting(settings),
            "Metrics per training setting",
            f"Each dot is one seed; the verdict compares the setting with {evaluation['baseline']!r}, paired by seed.",
            "evaluation",
        )
        add(
            "evaluation_per_class_accuracy.png",
            plots.per_class_accuracy_bars(per_class, list(next(iter(per_class.values())))),
            "Per-class accuracy per training setting",
            "Accuracy on the real test images of each class, mean over seeds with the spread across seeds.",
            "evaluation",
        )

    by_difficulty = {s: Counter(map(_difficulty, split_rows)) for s, split_rows in by_split.items()}
    add(
        "difficulty_by_split.png",
        plots.difficulty_by_split(by_difficulty),
        "Samples per split and difficulty",
        "Samples in each split, stacked by difficulty level (provenance.difficulty, set by the tag stage).",
        "splits",
    )
    if image_column is not None:
        if class_key is not None:
            column, order = class_key
            title = "Samples per class"
            png = plots.image_grid_by(rows, column, order=order, title=title, image_column=image_column)
            add("grid_by_class.png", png, title, "The first images of each class by sample id, with its sample count.", "samples")
        if any(_difficulty(r) for r in rows):
            title = "Samples per difficulty"
            png = plots.image_grid_by(rows, _difficulty, order=plots.DIFFICULTY_ORDER, title=title, image_column=image_column)
            add("grid_by_difficulty.png", png, title, "The first images of each difficulty level by sample id.", "samples")
    if class_key is not None and any(r[class_key[0]] is not None for r in rows):
        column, order = class_key
        counts = {s: Counter(r[column] for r in split_rows) for s, split_rows in by_split.items()}
        caption = f"Share of each `{column}` value within each split"
        if len(order) > plots.MAX_BARS:
            caption += f" (the {plots.MAX_BARS} most frequent values; the others together as other)"
        add(
            "labels_by_split.png",
            plots.label_shares_by_split(counts, order),
            "Label distribution per split",
            caption + ".",
            "labels",
        )
    if panels := _judge_panels(rows, stage_info):
        add(
            "judge_scores.png",
            plots.histograms(panels),
            "Judge scores",
            "Scores the judge checks recorded for the published samples (provenance.judge.checks[].score); "
            "dashed lines are the pass thresholds the judge stage ran with.",
            "quality",
        )
    if with_vog := [r for r in rows if r["provenance"].get("vog")]:
        direction = with_vog[0]["provenance"]["vog"]["direction"]
        side = "at or above" if direction == "drop_lowest" else "at or below"
        add(
            "vog.png",
            plots.vog_distributions([r["provenance"]["vog"]["score"] for r in with_vog], _vog_by_class(with_vog, class_key)),
            "Variance of gradients (VoG)",
            f"VoG of the published samples, all of which the VoG filter kept ({direction}): each lies {side} its "
            "class's drop boundary on the normalised score.",
            "quality",
        )
    generators = Counter(_generator_key(r["provenance"]["generation"]) for r in rows)
    add(
        "generators.png",
        plots.count_bars(generators, "samples"),
        "Samples per generator and prompt version",
        "Generation method · model · prompt template@version of the published samples.",
        "generators",
    )
    return figures


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _section(heading: str, lines: list[str], figures: list[Figure], key: str) -> list[str]:
    """A card section: its lines, then the figures that belong to it (each with its caption); none when empty."""
    lines = lines + [line for f in figures if f.section == key for line in (f"![{f.title}]({f.path})", "", f"*{f.caption}*", "")]
    return [f"## {heading}", "", *lines] if lines else []


def _evaluation_lines(evaluation: dict[str, Any] | None) -> list[str]:
    from synthforge.evaluate import summary_markdown, verdict_sentences

    if evaluation is None:
        return []
    return [*(f"- {line}" for line in verdict_sentences(evaluation)), "", summary_markdown(evaluation)]


def _load_lines(load_call: str, hub_repo: str | None, version: str) -> list[str]:
    lines = ["## Load this exact version", "", "```python", "import synthforge", "", f"ds = {load_call}", "```", ""]
    if hub_repo:
        hub_call = f'datasets.load_dataset("{hub_repo}", revision="v{version}")'
        lines += ["From the Hugging Face Hub:", "", "```python", "import datasets", "", f"ds = {hub_call}", "```", ""]
    return lines


def _selector_text(selector: dict[str, Any]) -> str:
    """`batch=b1` for what a quarantine selected by."""
    return ", ".join(f"{k}={v}" for k, v in selector.items() if v)


def _advisory_lines(advisories: list[dict[str, Any]], version: str) -> list[str]:
    """Quarantines known when this version was published. A card never changes after publishing, so it can only
    speak of earlier versions; `synthforge versions` and `load` report later advisories."""
    if not advisories:
        return []
    lines = ["## Quarantined versions", ""]
    for a in advisories:
        held = ", ".join(f"{v} ({n} samples)" for v, n in a["samples"].items())
        clean = "this version" if a["clean_version"] == version else a["clean_version"]
        lines += [f"- **{a['reason']}** ({_selector_text(a['selector'])}, {a['date']}): affects {held}; clean: {clean}."]
    return [*lines, ""]


def _changelog_lines(changelog: list[dict[str, Any]]) -> list[str]:
    if not changelog:
        return []
    rows = []
    for entry in changelog:
        summary = entry["summary"]
        if q := entry.get("quarantine"):
            summary += f" (quarantine: {q['reason']})"
        diff = entry["diff"]
        rows.append([entry["version"], entry["date"], summary, *(diff[k] for k in ("added", "removed", "changed", "moved"))])
    return ["## Changelog", "", _table(["version", "date", "summary", "added", "removed", "changed", "moved"], rows), ""]


def _lineage_lines(stage_info: list[dict[str, Any]]) -> list[str]:
    """Stage, fingerprint and params hash as a table, then each stage's params: the ones its fingerprint covers."""
    lines = [
        "## Lineage",
        "",
        _table(
            ["stage", "fingerprint", "params hash"],
            [[i["stage"], f"`{i['fingerprint'][:16]}`", f"`{i['params_hash'][:16]}`"] for i in stage_info],
        ),
        "",
    ]
    for info in stage_info:
        params = yaml.safe_dump(info["params"], sort_keys=False, allow_unicode=True).strip() if info["params"] else "{}"
        lines += [f"<details><summary>{info['stage']} params</summary>", "", "```yaml", params, "```", "", "</details>", ""]
    lines += ["The full pipeline (dvc.yaml, params, dvc.lock, fingerprints) is in `synthforge.json`.", ""]
    return lines


def render_card(
    *,
    name: str,
    version: str,
    description: str,
    license: str | None,
    schema: pa.Schema,
    split_files: dict[str, str],
    split_bytes: dict[str, int],
    by_split: dict[str, list[Row]],
    stage_stats: list[dict[str, Any]],
    stage_info: list[dict[str, Any]],
    load_call: str,
    figures: Sequence[Figure] = (),
    class_key: ClassKey | None = None,
    changelog: Sequence[dict[str, Any]] = (),
    advisories: Sequence[dict[str, Any]] = (),
    hub_repo: str | None = None,
    evaluation: dict[str, Any] | None = None,
) -> str:
    """The card as README.md text: Hub YAML front matter, then the body in markdown.

    schema: the published shards' schema; its `huggingface` metadata (image and class-label features) is what the
    card's dataset_info shows. by_split and class_key: as `card_figures` takes them; class_key adds the per-class
    table. figures: from `card_figures`. stage_info: each stage's stage.json (stage, fingerprint, params_hash,
    params). changelog: entries {version, date, summary, diff {added, removed, changed, moved: counts},
    quarantine: advisory or None}. advisories: every quarantine known at publishing, each {affects, reason,
    clean_version, selector, samples {version: n}, date}. hub_repo: ORG/NAME on the Hugging Face Hub, for the
    `datasets.load_dataset` line. evaluation: `synthforge evaluate`'s result for these samples, or None.
    """
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo

    split_counts = {s: len(rows) for s, rows in by_split.items()}
    provenance_rows = [r["provenance"] for rows in by_split.values() for r in rows]
    splits = SplitDict()
    for split, count in split_counts.items():
        splits.add(SplitInfo(name=split, num_examples=count, num_bytes=split_bytes[split]))
    info = DatasetInfo(features=Features.from_arrow_schema(schema), splits=splits)
    total = sum(split_counts.values())
    meta = {
        "pretty_name": name,
        "license": license,
        "tags": ["synthetic", "synthforge", "provenance"],
        "size_categories": [size_category(total)],
        "source_datasets": ["original"],
        "configs": [{"config_name": "default", "data_files": [{"split": s, "path": f} for s, f in split_files.items()]}],
        "dataset_info": info._to_yaml_dict(),
    }
    meta = {k: v for k, v in meta.items() if v is not None}

    by_split_difficulty = Counter((p["split"], p["difficulty"]) for p in provenance_rows)
    splits_order = list(split_counts)
    generators = Counter(
        tuple(p["generation"][k] for k in ("method", "model", "prompt_template_id", "prompt_version")) for p in provenance_rows
    )
    figures = list(figures)
    split_table = _table(
        ["split", "samples", *plots.DIFFICULTY_ORDER],
        [[s, split_counts[s], *(by_split_difficulty[(s, lv)] for lv in plots.DIFFICULTY_ORDER)] for s in split_counts],
    )
    class_lines = []
    if class_key:
        class_table = [
            [c, *(n.get(s, 0) for s in splits_order), sum(n.values())] for c, n in _class_counts(by_split, class_key).items()
        ]
        class_lines = ["Samples per class and split:", "", _table(["class", *splits_order, "total"], class_table), ""]
    stage_table = _table(
        ["stage", "entered", "kept", "rejected", "rejected by"],
        [
            [
                s["stage"],
                s["entered"],
                s["kept"],
                s["rejected"],
                ", ".join(f"{k}: {v}" for k, v in s["rejected_by"].items()) or "-",
            ]
            for s in stage_stats
        ],
    )
    generator_table = _table(
        ["method", "model", "prompt template", "prompt version", "samples"],
        [[*k, v] for k, v in sorted(generators.items(), key=str)],
    )
    body = [
        f"# {name} {version}",
        "",
        *_advisory_lines(list(advisories), version),
        description,
        "",
        "Made with synthforge: every sample carries its provenance (source, generator, "
        "prompt version, judge verdicts, dedup cluster, difficulty, split) in the `provenance` column and in "
        "`provenance/manifest.parquet`.",
        "",
        *_section("Does the synthetic data help?", _evaluation_lines(evaluation), figures, "evaluation"),
        *_section("Splits", [split_table, ""], figures, "splits"),
        *_section("Samples", [], figures, "samples"),
        *_section("Labels", class_lines, figures, "labels"),
        *_section("Quality scores", [], figures, "quality"),
        "## How it was made",
        "",
        stage_table,
        "",
        *_section("Generators and prompt versions", [generator_table, ""], figures, "generators"),
        *_lineage_lines(stage_info),
        *_changelog_lines(list(changelog)),
        *_load_lines(load_call, hub_repo, version),
    ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body)
