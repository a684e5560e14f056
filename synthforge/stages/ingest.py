"""ingest: samples made elsewhere (JSONL, CSV, Parquet, a saved or local HF dataset) -> a stage directory.

Each row becomes a sample with provenance method `imported` and source = the file and row, so judge, dedup,
tag, split and publish work on data a team already has.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa

from synthforge.errors import BadInput
from synthforge.provenance import make_sample_id, new_record
from synthforge.sources import file_digest
from synthforge.stagedir import StageWriter, stage_fingerprint


def _read_rows(path: Path, split: str | None) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) pairs; `where` names the file and line (JSONL, CSV) or row (Parquet, datasets)."""
    if path.is_dir():
        return [(f"{path}: row {i + 1}", r) for i, r in enumerate(_read_hf_dataset(path, split))]
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        from synthforge.sources import read_jsonl

        return [(f"{path}:{lineno}", record) for lineno, record in read_jsonl(path)]
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            try:
                rows = []
                for record in reader:
                    rows.append((f"{path}:{reader.line_num}", record))  # line_num: where the record ends
                return rows
            except csv.Error as exc:
                raise BadInput(f"{path}:{reader.line_num}: not valid CSV: {exc}") from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise BadInput(f"{path}: not a readable Parquet file: {exc}") from None
        return [(f"{path}: row {i + 1}", r) for i, r in enumerate(table.to_pylist())]
    raise BadInput(f"{path}: unsupported file type {suffix!r} (use .jsonl, .csv, .parquet or a HF dataset folder)")


def _read_hf_dataset(path: Path, split: str | None) -> list[dict[str, Any]]:
    """A folder written by `Dataset.save_to_disk`, or a local dataset `load_dataset` understands."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        try:
            ds = datasets.load_dataset(str(path))
        except Exception as exc:  # datasets raises many types for "not a dataset"
            raise BadInput(f"{path}: not a Hugging Face dataset folder: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise BadInput(f"{path}: dataset has splits {', '.join(ds)}; choose one with --split")
        ds = ds[split]
    elif split is not None:
        raise BadInput(f"{path}: dataset has no splits, --split {split} does not apply")
    return ds.to_list()


def _digest(path: Path) -> str:
    """Content hash of a file, or of every file in a dataset folder: the same data gets the same batch."""
    if path.is_file():
        return file_digest(path)
    parts = [f"{p.relative_to(path)}:{file_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def run_ingest(
    path: str | Path,
    out: str | Path,
    text_fields: list[str],
    label_field: str | None = None,
    model: str = "unknown",
    batch_id: str | None = None,
    split: str | None = None,
) -> dict:
    path = Path(path)
    rows = _read_rows(path, split)
    if not rows:
        raise BadInput(f"{path}: no rows to ingest")
    wanted = [*text_fields, *([label_field] if label_field else [])]
    content_fields = [(f, pa.string()) for f in text_fields]
    if label_field:
        content_fields.append(("label", pa.string()))
    digest = _digest(path)
    fingerprint = stage_fingerprint(
        "ingest", {"text_fields": text_fields, "label_field": label_field, "model": model}, {"file": digest}
    )
    batch_id = batch_id or f"import-{digest[:12]}"
    samples = []
    for i, (where, record) in enumerate(rows):
        for field in wanted:
            if field not in record:
                raise BadInput(f"{where}: missing field {field!r} (row has: {', '.join(map(str, record))})")
            value = record[field]
            if field in text_fields and not isinstance(value, str):
                raise BadInput(f"{where}: field {field!r} must be text, got {type(value).__name__} {value!r:.40}")
        content = {f: record[f] for f in text_fields}
        if label_field:
            content["label"] = None if record[label_field] is None else str(record[label_field])
        sid = make_sample_id({"method": "imported", "file": digest, "row": i}, content)
        prov = new_record(
            sample_id=sid,
            run_id=fingerprint["fingerprint"][:12],
            source={"uri": str(path), "record_id": None, "row": i},
            method="imported",
            model=model,
            batch_id=batch_id,
            params={"text_fields": text_fields, "label_field": label_field},
        )
        samples.append({"sample_id": sid, **content, "provenance": prov})
    with StageWriter(out, "ingest", pa.schema(content_fields), fingerprint) as writer:
        writer.write(samples)
        writer.metrics = {"source": str(path), "rows": len(rows), "batch_id": batch_id}
    return writer.stats
