"""The per-sample provenance record: its Arrow type, its JSON Schema check, and how it starts.

`schemas/provenance.schema.json` is the contract; `PROVENANCE_TYPE` is the same shape as an Arrow struct so
that manifests are queryable column by column (DuckDB: `provenance.generation.batch_id`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from synthforge.errors import BadInput
from synthforge.resources import schema_path

CHECK_TYPE = pa.struct(
    [
        ("name", pa.string()),
        ("verdict", pa.string()),
        ("score", pa.float64()),
        ("reason", pa.string()),
        ("raw_output", pa.string()),
        ("parsed", pa.bool_()),
        ("judged_by", pa.string()),
        ("difficulty", pa.string()),
    ]
)

CAPTION_TYPE = pa.struct([("raw", pa.string()), ("perturbed", pa.string()), ("model", pa.string()), ("parsed", pa.bool_())])

VOG_TYPE = pa.struct(
    [
        ("score", pa.float64()),
        ("normalized", pa.float64()),
        ("direction", pa.string()),
        ("target", pa.string()),
        ("checkpoints", pa.list_(pa.string())),
        ("normalization", pa.string()),
        ("drop_fraction", pa.float64()),
        ("class_threshold", pa.float64()),
        ("classifier", pa.string()),
    ]
)

CONTAMINATION_TYPE = pa.struct(
    [
        ("checked_sets", pa.list_(pa.string())),
        ("ngram", pa.int64()),
        ("matched", pa.bool_()),
        ("eval_set", pa.string()),
        ("eval_item_id", pa.string()),
        ("method", pa.string()),
        ("span", pa.string()),
        ("similarity", pa.float64()),
    ]
)

PROVENANCE_TYPE = pa.struct(
    [
        ("sample_id", pa.string()),
        ("synthforge_version", pa.string()),
        ("run_id", pa.string()),
        ("source", pa.struct([("uri", pa.string()), ("record_id", pa.string()), ("row", pa.int64())])),
        (
            "generation",
            pa.struct(
                [
                    ("method", pa.string()),
                    ("model", pa.string()),
                    ("model_revision", pa.string()),
                    ("adapter_hash", pa.string()),
                    ("prompt_template_id", pa.string()),
                    ("prompt_version", pa.string()),
                    ("prompt_hash", pa.string()),
                    ("seed", pa.int64()),
                    ("params", pa.string()),
                    ("batch_id", pa.string()),
                    ("parent_ids", pa.list_(pa.string())),
                    ("created_at", pa.string()),
                    ("caption", CAPTION_TYPE),
                    ("seed_marginal_score", pa.float64()),
                    ("raw_output", pa.string()),
                    ("parsed", pa.bool_()),
                ]
            ),
        ),
        ("judge", pa.struct([("verdict", pa.string()), ("checks", pa.list_(CHECK_TYPE))])),
        (
            "dedup",
            pa.struct(
                [
                    ("exact_hash", pa.string()),
                    ("cluster_id", pa.string()),
                    ("representative_id", pa.string()),
                    ("is_representative", pa.bool_()),
                    ("method", pa.string()),
                    ("similarity", pa.float64()),
                    ("distance", pa.float64()),
                    ("representative_is_real", pa.bool_()),
                ]
            ),
        ),
        ("vog", VOG_TYPE),
        ("contamination", CONTAMINATION_TYPE),
        ("tags", pa.list_(pa.string())),
        ("difficulty", pa.string()),
        ("difficulty_rule", pa.string()),
        ("difficulty_features", pa.string()),
        ("split", pa.string()),
        ("stages", pa.list_(pa.struct([("stage", pa.string()), ("fingerprint", pa.string())]))),
    ]
)


# A sample id as make_sample_id makes it (and as the schema's $defs/sample_id allows): never a path, never blank.
# Match it with fullmatch: `$` would let a trailing newline through.
SAMPLE_ID = re.compile(r"[0-9a-f]{16,64}")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_hex(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def make_sample_id(origin: dict[str, Any], content: dict[str, Any]) -> str:
    """Stable id from where a sample came from and what it says; never reassigned downstream."""
    return sha256_hex(canonical_json({"origin": origin, "content": content}))[:24]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_record(
    *,
    sample_id: str,
    run_id: str,
    source: dict[str, Any],
    method: str,
    model: str,
    batch_id: str,
    seed: int | None = None,
    params: dict[str, Any] | None = None,
    prompt_template_id: str | None = None,
    prompt_version: str | None = None,
    prompt_hash: str | None = None,
    parent_ids: list[str] | None = None,
    model_revision: str | None = None,
    adapter_hash: str | None = None,
    caption: dict[str, Any] | None = None,
    seed_marginal_score: float | None = None,
    raw_output: str | None = None,
    parsed: bool | None = None,
) -> dict[str, Any]:
    from synthforge import __version__

    return {
        "sample_id": sample_id,
        "synthforge_version": __version__,
        "run_id": run_id,
        "source": {"uri": source["uri"], "record_id": source.get("record_id"), "row": source.get("row")},
        "generation": {
            "method": method,
            "model": model,
            "model_revision": model_revision,
            "adapter_hash": adapter_hash,
            "prompt_template_id": prompt_template_id,
            "prompt_version": prompt_version,
            "prompt_hash": prompt_hash,
            "seed": seed,
            "params": canonical_json(params or {}),
            "batch_id": batch_id,
            "parent_ids": list(parent_ids or []),
            "created_at": now_iso(),
            "caption": caption,
            "seed_marginal_score": seed_marginal_score,
            "raw_output": raw_output,
            "parsed": parsed,
        },
        "judge": None,
        "dedup": None,
        "vog": None,
        "contamination": None,
        "tags": [],
        "difficulty": None,
        "difficulty_rule": None,
        "difficulty_features": None,
        "split": None,
        "stages": [],
    }


def _provenance_schema() -> dict[str, Any]:
    return json.loads(schema_path("provenance.schema.json").read_text())


@functools.cache
def _check():
    """The schema compiled to Python: every row of every stage passes through it (benchmarks/README.md, Scale)."""
    import fastjsonschema

    return fastjsonschema.compile(_provenance_schema())


@functools.cache
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(_provenance_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def validate_record(record: dict[str, Any], where: str) -> None:
    """Raise BadInput naming `where` (file and row) and the offending field if the record breaks the schema.

    The compiled check decides; jsonschema, slower, only names the first offending field of a record it refused."""
    import fastjsonschema

    try:
        _check()(record)
        return
    except fastjsonschema.JsonSchemaValueException as refused:
        errors = sorted(_validator().iter_errors(record), key=lambda e: list(e.absolute_path))
        if not errors:  # a check jsonschema does not make here (a date-time format)
            field, why = refused.name.removeprefix("data."), refused.message.removeprefix(f"{refused.name} ")
            raise BadInput(f"{where}: provenance.{field}: {why}") from None
    from synthforge.params import key_path

    err = errors[0]
    raise BadInput(f"{where}: provenance.{key_path(err.absolute_path)}: {err.message}")


def read_manifest(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A manifest: a stage directory's manifest.parquet or a version's provenance/manifest.parquet (all columns, or
    `columns`, which always include sample_id). A damaged one is BadInput naming the file and what is wrong: not
    readable as Parquet, a column missing, text that is not UTF-8, a sample id that is not one."""
    import pyarrow.parquet as pq

    from synthforge.sources import PARQUET_ERRORS, check_arrow

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: manifest not found")
    try:
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        missing = [c for c in dict.fromkeys(["sample_id", *(columns or [])]) if c not in names]
        if missing:
            raise BadInput(f"{path}: not a manifest: no column {', '.join(map(repr, missing))} (columns: {', '.join(names)})")
        table = file.read(columns=list(dict.fromkeys(["sample_id", *columns])) if columns else None)
    except PARQUET_ERRORS as exc:
        raise BadInput(f"{path}: not a readable Parquet file: {exc}") from None
    check_arrow(table, lambda i: f"{path}: row {i}")
    check_sample_ids(table, str(path))
    return table


def check_sample_ids(table: pa.Table, where: str, first_row: int = 0) -> None:
    """Every `sample_id` is a sample id (never a path, never blank) and, where the table has provenance, the id its
    provenance records: a row whose id was edited would otherwise pass for another sample. Rows are named as
    `where: row N`, counting from first_row."""
    import pyarrow.compute as pc

    ids = table.column("sample_id")
    if not pa.types.is_string(ids.type):
        raise BadInput(f"{where}: column 'sample_id' holds {ids.type}, not text")
    recorded = ids
    if "provenance" in table.column_names:
        kind = table.schema.field("provenance").type
        if not pa.types.is_struct(kind) or kind.get_field_index("sample_id") < 0:
            raise BadInput(f"{where}: column 'provenance' holds {kind}, not provenance records")
        recorded = pc.struct_field(table.column("provenance"), "sample_id")
    valid = pc.fill_null(pc.match_substring_regex(ids, f"^{SAMPLE_ID.pattern}$"), False)  # RE2: $ is the very end
    ok = pc.and_(valid, pc.fill_null(pc.equal(ids, recorded), False))
    if pc.all(ok).as_py():
        return
    row = pc.index(ok, False).as_py()
    sid = ids[row].as_py()
    if not valid[row].as_py():
        raise BadInput(f"{where}: row {first_row + row}: {sid!r} is not a sample id (16 to 64 hex digits)")
    raise BadInput(f"{where}: row {first_row + row}: sample_id {sid} differs from provenance.sample_id {recorded[row].as_py()!r}")
