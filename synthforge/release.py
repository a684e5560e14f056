"""A release: the files of one dataset version, built in a folder before any store (git registry, Hub) sees them.

    data/{split}-NNNNN-of-NNNNN.parquet   content + sample_id + provenance, with the `datasets` features in the
                                          schema metadata (an `image` column is a datasets.Image)
    README.md                             dataset card with Hub YAML, figures in images/
    provenance/manifest.parquet           sample_id, split, content_hash, label, text index, provenance
    advisories.json                       every quarantine advisory known when this version was published
    synthforge.json                       pipeline, params, dvc.lock, fingerprints, counts, changelog
    croissant.json                        Croissant 1.1 metadata with checksums and prov: annotations

The content of a release comes from the split stage (`from_split_stage`) or, for a quarantine release, from the
previous version minus the affected samples (`from_version`). Both give split-stage rows: image bytes, not the
datasets.Image struct of the published shards.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from synthforge.errors import BadInput
from synthforge.provenance import PROVENANCE_TYPE, canonical_json, now_iso, sha256_hex
from synthforge.stagedir import StageInput, code_revision, lineage

SHARD_ROWS = 100_000
MAX_CLASS_LABEL_ID = 100_000  # label ids beyond this are not class indices: the label stays a plain int
SHARD_NAME = re.compile(r"^(?P<split>.+)-\d{5}-of-\d{5}\.parquet$")
SPLIT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # the params schema's split.ratios names: never a path
Row = dict[str, Any]


def manifest_schema() -> pa.Schema:
    """provenance/manifest.parquet: one row per published sample, no heavy content. The text index columns let
    trace find a sample by its text without reading the data shards."""
    from synthforge.content_index import INDEX_FIELDS, INDEX_METADATA

    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("split", pa.string()),
            ("content_hash", pa.string()),
            ("label", pa.string()),
            *INDEX_FIELDS,
            ("provenance", PROVENANCE_TYPE),
        ],
        metadata=INDEX_METADATA,  # the index settings: a lookup recomputes when they change
    )


@dataclass
class ReleaseContent:
    """What a version holds and how it was made."""

    schema: pa.Schema  # split-stage schema: content columns (images as PNG bytes), sample_id, provenance
    by_split: dict[str, list[Row]]  # in the order the card lists splits
    lineage: list[dict]  # stage.json of every stage that made the samples, generate first
    stats: list[dict]  # stats.json of those stages (plus a `quarantine` entry for a quarantine release)
    pipeline: dict  # dvc.yaml, dvc.lock and params of the run
    where: str  # what the content was read from, for messages
    derived_from: dict | None = None  # {"version", "commit"} for a release made from an earlier version
    evaluation: dict | None = None  # `synthforge evaluate`'s result for exactly these samples, if it ran on them

    @property
    def params(self) -> dict:
        return self.pipeline.get("params") or {}

    @property
    def rows(self) -> list[Row]:
        return [r for rows in self.by_split.values() for r in rows]

    @property
    def counts(self) -> dict[str, int]:
        return {s: len(rows) for s, rows in self.by_split.items()}


@dataclass
class Release:
    """A release's content with its manifest, before it is written to a folder."""

    content: ReleaseContent
    manifest: pa.Table = field(repr=False)

    @classmethod
    def of(cls, content: ReleaseContent) -> Release:
        return cls(content, manifest_table(content))

    @property
    def fingerprint(self) -> str:
        """Identity of the records: ids, splits and content hashes (the card and metadata may differ)."""
        cols = self.manifest.select(["sample_id", "split", "content_hash"]).to_pylist()
        return sha256_hex(canonical_json(sorted((m["sample_id"], m["split"], m["content_hash"]) for m in cols)))


# -- reading content ---------------------------------------------------------------------------------------


def from_split_stage(split_dir: str | Path, params: dict, project: Path) -> ReleaseContent:
    source = StageInput.open(split_dir)
    if source.stage != "split":
        raise BadInput(f"{split_dir}: publish takes the output of the split stage, this is {source.stage!r}")
    by_split: dict[str, list[Row]] = {}
    for rows in source.iter_rows():
        for row in rows:
            split = row["provenance"]["split"]
            if not split:
                raise BadInput(f"{source.path}: sample {row['sample_id']} has no split; run the split stage")
            if not SPLIT_NAME.match(split):
                raise BadInput(
                    f"{source.path}: sample {row['sample_id']} has split {split!r}: a split is named by letters, digits and "
                    "'_' (as in params split.ratios), since the name becomes the name of the version's data files"
                )
            by_split.setdefault(split, []).append(row)
    if not by_split:
        raise BadInput(f"{source.path}: no samples to publish")
    order = list((params.get("split") or {}).get("ratios") or {})
    by_split = dict(sorted(by_split.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
    _check_leakage(source, by_split, params)
    chain = lineage(source)
    read = lambda p: (project / p).read_text() if (project / p).exists() else None  # noqa: E731
    pipeline = {
        "dvc.yaml": read("dvc.yaml"),
        "dvc.lock": read("dvc.lock"),
        "params": {k: v for k, v in params.items() if k != "__file__"},
    }
    return ReleaseContent(
        schema=source.schema,
        by_split=by_split,
        lineage=[s.info for s in chain],
        stats=[json.loads((s.path / "stats.json").read_text()) for s in chain],
        pipeline=pipeline,
        where=str(source.path),
        evaluation=evaluation_of(source),
    )


def evaluation_of(source: StageInput) -> dict | None:
    """The evaluation beside the split stage (data/evaluation), if one of its settings trained on exactly this output.

    An evaluation of an earlier run of the pipeline says nothing about these samples, so it is left out.
    """
    path = source.path.parent / "evaluation" / "evaluation.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    fingerprints = {(s.get("source") or {}).get("fingerprint") for s in result.get("settings", [])}
    return result if source.fingerprint in fingerprints else None


def from_version(folder: Path, version: str, commit: str, drop: set[str], reason: str) -> ReleaseContent:
    """A published version's samples minus `drop`, as split-stage rows, for a quarantine release."""
    meta = json.loads((folder / "synthforge.json").read_text())
    shards = sorted((folder / "data").glob("*.parquet"))
    by_split: dict[str, list[Row]] = {split: [] for split in meta["counts"]}
    schema = None
    for shard in shards:
        match = SHARD_NAME.match(shard.name)
        if not match:
            raise BadInput(f"{shard}: not a data shard name ({{split}}-NNNNN-of-NNNNN.parquet)")
        table = pq.read_table(shard)
        schema = schema or _stage_schema(table.schema)
        image = image_column(schema)
        for row in table.to_pylist():
            if row["sample_id"] in drop:
                continue
            if image and isinstance(row[image], dict):  # the datasets.Image struct back to its bytes
                row[image] = row[image]["bytes"]
            by_split.setdefault(match["split"], []).append(row)
    if schema is None:
        raise BadInput(f"{folder}: version {version} has no data shards")
    entered = sum(meta["counts"].values())
    removed = entered - sum(len(rows) for rows in by_split.values())
    quarantine_stats = {
        "stage": "quarantine",
        "entered": entered,
        "kept": entered - removed,
        "rejected": removed,
        "rejected_by": {"quarantine": removed} if removed else {},
        "reason": reason,
    }
    return ReleaseContent(
        schema=schema,
        by_split={s: rows for s, rows in by_split.items() if rows},
        lineage=meta["lineage"],
        stats=[*meta["stats"], quarantine_stats],
        pipeline=meta["pipeline"],
        where=f"{meta['name']} v{version}",
        derived_from={"version": version, "commit": commit},
    )


def _stage_schema(published: pa.Schema) -> pa.Schema:
    """The split-stage schema of a published shard: images back to bytes, labels back to plain ints."""
    fields = []
    for f in published:
        if f.name == "image" and pa.types.is_struct(f.type):
            f = pa.field("image", pa.binary())
        fields.append(f)
    return pa.schema(fields)  # without the `huggingface` metadata: published_features rebuilds it


# -- the manifest ----------------------------------------------------------------------------------------


def content_hash(row: Row) -> str:
    """Hash of a split-stage row's content. Binary values (PNG bytes) enter as their sha256, so the hash depends on
    the stored bytes only, never on how they are published or decoded (datasets.Image struct, PIL)."""
    content = {
        k: f"sha256:{sha256_hex(bytes(v))}" if isinstance(v, bytes | bytearray) else v
        for k, v in row.items()
        if k != "provenance"
    }
    return sha256_hex(canonical_json(content))


def _label(row: Row) -> str | None:
    label = row.get("label_name") if row.get("label_name") is not None else row.get("label")
    return None if label is None else str(label)


def manifest_table(content: ReleaseContent) -> pa.Table:
    from synthforge.content_index import index_columns, row_text, text_fields

    fields = text_fields(content.schema)
    rows = [(split, r) for split, rows in content.by_split.items() for r in rows]
    index = index_columns([row_text(r, fields) for _, r in rows])
    columns = {
        "sample_id": [r["sample_id"] for _, r in rows],
        "split": [s for s, _ in rows],
        "content_hash": [content_hash(r) for _, r in rows],
        "label": [_label(r) for _, r in rows],
        **index,
        "provenance": [r["provenance"] for _, r in rows],
    }
    return pa.table(columns, schema=manifest_schema())


# -- writing ---------------------------------------------------------------------------------------------


def image_column(schema: pa.Schema) -> str | None:
    """The column of image bytes by the content convention (synthforge.vision.images): a binary `image` column."""
    if "image" in schema.names and (
        pa.types.is_binary(schema.field("image").type) or pa.types.is_large_binary(schema.field("image").type)
    ):
        return "image"
    return None


def class_names(rows: list[Row], where: str | Path) -> list[str] | None:
    """Class names indexed by label id, from every row of the version (so a split that lacks a class still gets
    the full list), or None when rows carry no label/label_name pairs or ids are negative or huge.

    A label id missing from the whole version gets a placeholder name, so ids keep their meaning.
    """
    name_of: dict[int, tuple[str, str]] = {}  # label -> (name, first sample with it)
    label_of: dict[str, tuple[int, str]] = {}
    for row in rows:
        label, name, sid = row.get("label"), row.get("label_name"), row["sample_id"]
        if label is None or name is None:
            continue
        if label < 0:
            return None
        known_name, other = name_of.setdefault(label, (name, sid))
        if known_name != name:
            raise BadInput(f"{where}: label {label} is named {known_name!r} (sample {other}) and {name!r} (sample {sid})")
        known_label, other = label_of.setdefault(name, (label, sid))
        if known_label != label:
            raise BadInput(f"{where}: label name {name!r} has label {known_label} (sample {other}) and {label} (sample {sid})")
    if not name_of or max(name_of) >= MAX_CLASS_LABEL_ID:
        return None
    return [name_of[i][0] if i in name_of else f"<no samples: {i}>" for i in range(max(name_of) + 1)]


def published_features(schema: pa.Schema, rows: list[Row], where: str | Path):
    """The `datasets.Features` of the published shards: the split stage's columns, the image column as a
    datasets.Image and `label` as a ClassLabel when the rows name their classes."""
    from datasets import ClassLabel, Features, Image

    features = Features.from_arrow_schema(schema)
    if image := image_column(schema):
        features[image] = Image()
    if "label" in schema.names and "label_name" in schema.names and pa.types.is_integer(schema.field("label").type):
        names = class_names(rows, where)
        if names:
            features["label"] = ClassLabel(names=names)
    return features


def _published_row(row: Row, image: str | None) -> Row:
    """A split-stage row as stored in a shard: image bytes become the {bytes, path} struct of datasets.Image."""
    if image is None or row[image] is None:
        return row
    return {**row, image: {"bytes": row[image], "path": None}}


def write_release(
    release: Release,
    tree: Path,
    *,
    name: str,
    version: str,
    load_call: str,
    changelog: list[dict],
    advisories: list[dict],
    hub_repo: str | None = None,
    url: str | None = None,
) -> dict:
    """Write every file of the version into `tree` (which must not exist); returns synthforge.json's content."""
    from synthforge.card import card_figures, class_key, render_card
    from synthforge.croissant import write_croissant

    content = release.content
    (tree / "data").mkdir(parents=True)
    (tree / "provenance").mkdir()
    all_rows = content.rows
    features = published_features(content.schema, all_rows, content.where)
    schema = features.arrow_schema  # carries the features as `huggingface` metadata, read back by datasets loaders
    image = image_column(content.schema)
    split_files, split_bytes = {}, {}
    for split, rows in content.by_split.items():
        n_shards = max(1, -(-len(rows) // SHARD_ROWS))
        split_files[split] = f"data/{split}-*.parquet"
        split_bytes[split] = 0
        for k in range(n_shards):
            path = tree / "data" / f"{split}-{k:05d}-of-{n_shards:05d}.parquet"
            shard = [_published_row(r, image) for r in rows[k * SHARD_ROWS : (k + 1) * SHARD_ROWS]]
            pq.write_table(pa.Table.from_pylist(shard, schema=schema), path, compression="zstd")
            split_bytes[split] += path.stat().st_size
    pq.write_table(release.manifest, tree / "provenance" / "manifest.parquet", compression="zstd")
    meta = {
        "name": name,
        "version": version,
        "published_at": now_iso(),
        "counts": content.counts,
        "content_fingerprint": release.fingerprint,
        "synthforge_version": __import__("synthforge").__version__,
        "code_revision": code_revision(),
        "derived_from": content.derived_from,
        "lineage": content.lineage,
        "stats": content.stats,
        "pipeline": content.pipeline,
        "changelog": changelog,
        "evaluation": content.evaluation,
    }
    (tree / "synthforge.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    (tree / "advisories.json").write_text(json.dumps(advisories, indent=2, ensure_ascii=False) + "\n")
    classes = class_key(content.schema, all_rows)
    figures = card_figures(
        tree / "images",
        content.by_split,
        image_column=image,
        class_key=classes,
        stage_info=content.lineage,
        evaluation=content.evaluation,
    )
    publish = content.params.get("publish") or {}
    card = render_card(
        name=name,
        version=version,
        description=publish.get("description", f"Synthetic dataset {name}."),
        license=publish.get("license"),
        schema=schema,
        split_files=split_files,
        split_bytes=split_bytes,
        stage_stats=content.stats,
        stage_info=content.lineage,
        load_call=load_call,
        figures=figures,
        by_split=content.by_split,
        class_key=classes,
        changelog=changelog,
        advisories=advisories,
        hub_repo=hub_repo,
        evaluation=content.evaluation,
    )
    (tree / "README.md").write_text(card)
    write_croissant(tree, meta, release.manifest.column("provenance").to_pylist(), url=url)
    return meta


def _check_leakage(source: StageInput, by_split: dict[str, list[Row]], params: dict) -> None:
    """No source group and no content in two splits. Content is the text fields for text data; for image data it
    is the image bytes (class names and captions repeat across splits by design), plus any leakage_fields set."""
    from synthforge.stages.split import check_leakage, group_key, leakage_fields, text_key

    group_by = (params.get("split") or {}).get("group_by", "source")
    fields = leakage_fields(params)
    keys = []
    if image := image_column(source.schema):
        keys.append(lambda r: sha256_hex(r[image]) if r[image] is not None else r["sample_id"])
    if fields or not keys:
        fields = fields or [f.name for f in source.schema if pa.types.is_string(f.type) and f.name != "sample_id"]
        keys.append(lambda r: text_key(r, fields))
    for key in keys:
        check_leakage((r["sample_id"], s, group_key(r, group_by), key(r)) for s, rows in by_split.items() for r in rows)
