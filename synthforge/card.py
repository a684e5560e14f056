"""The dataset card (README.md with Hub YAML) of a published version."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import yaml


def size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return label
    return "1M<n<10M"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _samples_section(
    grids: dict[str, str] | None, class_counts: dict[str, dict[str, int]] | None, splits: list[str]
) -> list[str]:
    """Image grids and per-class counts by split, as card lines (none for a dataset without them)."""
    if not grids and not class_counts:
        return []
    lines = ["## Samples", ""]
    if grids:
        lines += ["A few images per class and per difficulty level (the first by sample id), with how many samples each has.", ""]
        lines += [line for alt, path in grids.items() for line in (f"![{alt}]({path})", "")]
    if class_counts:
        rows = [[name, *(by_split.get(s, 0) for s in splits), sum(by_split.values())] for name, by_split in class_counts.items()]
        lines += ["Samples per class and split:", "", _table(["class", *splits, "total"], rows), ""]
    return lines


def render_card(
    *,
    name: str,
    version: str,
    description: str,
    license: str | None,
    schema: pa.Schema,
    split_files: dict[str, list[str]],
    split_counts: dict[str, int],
    split_bytes: dict[str, int],
    provenance_rows: list[dict[str, Any]],
    stage_stats: list[dict[str, Any]],
    stage_info: list[dict[str, Any]],
    load_call: str,
    sample_grids: dict[str, str] | None = None,
    class_counts: dict[str, dict[str, int]] | None = None,
) -> str:
    """schema: the published shards' schema; its `huggingface` metadata (image and class-label features) is what
    the card's dataset_info shows. sample_grids: {alt text: image path in the version}; class_counts:
    {class: {split: samples}} in label order. Both only for image datasets: they make the Samples section."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo

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
    levels = ["easy", "medium", "hard", "adversarial"]
    generators = Counter(
        (
            p["generation"]["method"],
            p["generation"]["model"],
            p["generation"]["prompt_template_id"],
            p["generation"]["prompt_version"],
        )
        for p in provenance_rows
    )
    body = [
        f"# {name} {version}",
        "",
        description,
        "",
        "Made with synthforge: every sample carries its provenance (source, generator, "
        "prompt version, judge verdicts, dedup cluster, difficulty, split) in the `provenance` column and in "
        "`provenance/manifest.parquet`.",
        "",
        "## Splits",
        "",
        _table(
            ["split", "samples", *levels],
            [[s, split_counts[s], *(by_split_difficulty[(s, lv)] for lv in levels)] for s in split_counts],
        ),
        "",
        *_samples_section(sample_grids, class_counts, list(split_counts)),
        "## How it was made",
        "",
        _table(
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
        ),
        "",
        "## Generators and prompt versions",
        "",
        _table(
            ["method", "model", "prompt template", "prompt version", "samples"],
            [[*k, v] for k, v in sorted(generators.items(), key=str)],
        ),
        "",
        "## Lineage",
        "",
        _table(
            ["stage", "fingerprint", "params hash"],
            [[i["stage"], f"`{i['fingerprint'][:16]}`", f"`{i['params_hash'][:16]}`"] for i in stage_info],
        ),
        "",
        "The full pipeline (dvc.yaml, params, dvc.lock, fingerprints) is in `synthforge.json`.",
        "",
        "## Load this exact version",
        "",
        "```python",
        "import synthforge",
        f"ds = {load_call}",
        "```",
        "",
    ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body)
