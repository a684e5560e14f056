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


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_hf_dataset(path)
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    if suffix in (".jsonl", ".ndjson"):
        from synthforge.sources import read_jsonl

        return [record for _, record in read_jsonl(path)]
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            try:
                return list(csv.DictReader(fh))
            except csv.Error as exc:
                raise BadInput(f"{path}: not valid CSV: {exc}") from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise BadInput(f"{path}: not a readable Parquet file: {exc}") from None
    raise BadInput(f"{path}: unsupported file type {suffix!r} (use .jsonl, .csv, .parquet or a HF dataset folder)")


def _read_hf_dataset(path: Path) -> list[dict[str, Any]]:
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
        if "train" not in ds and len(ds) != 1:
            raise BadInput(f"{path}: dataset has splits {list(ds)}; ingest one split at a time")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds.to_list()


def run_ingest(
    path: str | Path,
    out: str | Path,
    text_fields: list[str],
    label_field: str | None = None,
    model: str = "unknown",
    batch_id: str | None = None,
) -> dict:
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise BadInput(f"{path}: no rows to ingest")
    wanted = [*text_fields, *([label_field] if label_field else [])]
    content_fields = [(f, pa.string()) for f in text_fields]
    if label_field:
        content_fields.append(("label", pa.string()))
    digest = file_digest(path) if path.is_file() else hashlib.sha256(str(path.resolve()).encode()).hexdigest()
    fingerprint = stage_fingerprint(
        "ingest", {"text_fields": text_fields, "label_field": label_field, "model": model}, {"file": digest}
    )
    batch_id = batch_id or f"import-{digest[:12]}"
    samples = []
    for i, record in enumerate(rows):
        where = f"{path}: row {i + 1}" if path.suffix != ".csv" else f"{path}:{i + 2}"  # CSV line counts its header
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
