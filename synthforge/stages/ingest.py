"""ingest: samples made elsewhere (JSONL, CSV, Parquet, a saved or local HF dataset) -> a stage directory.

Each row becomes a sample with provenance method `imported` and source = the file and row, so judge, dedup,
tag, split and publish work on data a team already has.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import pyarrow as pa

from synthforge.errors import BadInput
from synthforge.provenance import make_sample_id, new_record
from synthforge.sources import PARQUET_ERRORS, arrow_rows, file_digest
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
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise BadInput(f"{path}:{line}: not UTF-8 text (save the file as UTF-8 CSV)") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
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
        except PARQUET_ERRORS as exc:
            raise BadInput(f"{path}: not a readable Parquet file: {exc}") from None
        return [(f"{path}: row {i + 1}", r) for i, r in enumerate(arrow_rows(table, lambda i: f"{path}: row {i + 1}"))]
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


# Columns every stage directory has: a source column of one of these names would be overwritten, not kept.
_RESERVED = ("sample_id", "provenance", "rejected_by", "reason")


def _check_fields(text_fields: list[str], label_field: str | None) -> None:
    if not text_fields:
        raise BadInput("--text-field: give at least one text column to keep")
    options = [("--text-field", f) for f in text_fields] + ([("--label-field", label_field)] if label_field else [])
    for option, field in options:
        if field in _RESERVED:
            raise BadInput(f"{option} {field}: every stage directory has its own {field!r} column; rename the source column")
    repeated = sorted({f for f in text_fields if text_fields.count(f) > 1})
    if repeated:
        raise BadInput(f"--text-field: {', '.join(map(repr, repeated))} given more than once")
    if label_field and "label" in text_fields:
        raise BadInput("--text-field label: the label column is written as `label`; with --label-field, name another column")


def _label(value: Any, field: str, where: str) -> str | None:
    """A class name, or a class index written as text: anything else is not a label."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = type(value).__name__
    raise BadInput(f"{where}: field {field!r} must be a class name or an integer class index, got {kind} {value!r:.40}")


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
    _check_fields(text_fields, label_field)
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
            content["label"] = _label(record[label_field], label_field, where)
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
