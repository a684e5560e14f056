"""The stage directory, the one contract between stages (see DESIGN.md).

    data/<stage>/samples/part-*.parquet   kept samples: content columns + provenance
    data/<stage>/rejected/part-*.parquet  dropped samples: same columns + rejected_by, reason
    data/<stage>/manifest.parquet         one row per sample that entered: id, kept, provenance
    data/<stage>/stats.json               counts and metrics
    data/<stage>/stage.json               fingerprint

A stage writes into a hidden temporary directory beside its output and renames it into place only when
everything is written, so a crash leaves the previous output (or nothing) and never half a stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from synthforge.errors import BadInput
from synthforge.provenance import (
    PROVENANCE_TYPE,
    canonical_json,
    check_sample_ids,
    now_iso,
    sha256_hex,
    validate_record,
)
from synthforge.resume import recover, temp_name
from synthforge.sources import PARQUET_ERRORS, check_arrow

SHARD_ROWS = 50_000
DEFAULT_BATCH_ROWS = 4_096
_LIBRARIES = (
    "pyarrow",
    "jinja2",
    "jsonschema",
    "numpy",
    "scipy",
    "torch",
    "diffusers",
    "peft",
    "transformers",
    "imagehash",
    "pillow",
    "sentence-transformers",
    "scikit-learn",
)  # those whose versions can change an output

Row = dict[str, Any]


def manifest_schema() -> pa.Schema:
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("stage", pa.string()),
            ("kept", pa.bool_()),
            ("rejected_by", pa.string()),
            ("reason", pa.string()),
            ("provenance", PROVENANCE_TYPE),
        ]
    )


def with_provenance(content_schema: pa.Schema) -> pa.Schema:
    """Content columns, then sample_id and provenance (replacing any stale definition of either)."""
    fields = [f for f in content_schema if f.name not in ("sample_id", "provenance", "rejected_by", "reason")]
    return pa.schema([pa.field("sample_id", pa.string()), *fields, pa.field("provenance", PROVENANCE_TYPE)])


def rejected_schema(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("rejected_by", pa.string())).append(pa.field("reason", pa.string()))


def _library_versions() -> dict[str, str]:
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def code_revision() -> str | None:
    """The git commit of the synthforge checkout, when running from one."""
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def stage_fingerprint(stage: str, params: Any, inputs: dict[str, str]) -> dict[str, Any]:
    """What determines a stage's output: its params, its inputs' fingerprints, code and library versions.

    Timestamps and paths are deliberately left out so the same work gets the same fingerprint.
    """
    from synthforge import __version__

    basis = {
        "stage": stage,
        "params": params,
        "inputs": dict(sorted(inputs.items())),
        "synthforge_version": __version__,
        "libraries": _library_versions(),
    }
    return {**basis, "params_hash": sha256_hex(canonical_json(params)), "fingerprint": sha256_hex(canonical_json(basis))}


@dataclass
class StageInput:
    """A finished stage directory, read as record batches of Python rows."""

    path: Path
    info: dict[str, Any]
    schema: pa.Schema

    @classmethod
    def open(cls, path: str | Path) -> StageInput:
        path = Path(path)
        if not path.is_dir():
            raise BadInput(f"{path}: input stage directory does not exist (run the stage that writes it first)")
        for required in ("stage.json", "manifest.parquet", "samples"):
            if not (path / required).exists():
                raise BadInput(f"{path}: not a stage directory: {required} is missing (was the stage interrupted?)")
        try:
            info = json.loads((path / "stage.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadInput(f"{path / 'stage.json'}: not valid JSON: {exc}") from None
        if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("stage", "fingerprint")):
            raise BadInput(f"{path / 'stage.json'}: not a stage fingerprint (it needs the strings 'stage' and 'fingerprint')")
        _read_schema(path / "manifest.parquet")  # the manifest's footer must be readable too
        return cls(path=path, info=info, schema=_samples_schema(path))

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def stage(self) -> str:
        return self.info["stage"]

    def shards(self, kind: str = "samples") -> list[Path]:
        return sorted((self.path / kind).glob("*.parquet"))

    def count(self, kind: str = "samples") -> int:
        return sum(open_shard(s).metadata.num_rows for s in self.shards(kind))

    def iter_rows(self, batch_rows: int = DEFAULT_BATCH_ROWS, kind: str = "samples") -> Iterator[list[Row]]:
        for batch in plan_batches(self, batch_rows, kind):
            yield batch.rows()


@dataclass(frozen=True)
class Batch:
    """Rows [start, stop) of one shard of a stage directory; `first` is the ordinal of its first row in the whole
    directory. The one reader of stage rows: both engines and every `iter_rows` read through it."""

    shard: str
    start: int
    stop: int
    first: int

    def read(self) -> pa.Table:
        pf = open_shard(self.shard)
        # Only the row groups that hold the range are read.
        groups, offset, begin = [], 0, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < self.stop and offset + n > self.start:
                begin = begin if groups else offset
                groups.append(g)
            offset += n
        try:
            table = pf.read_row_groups(groups).slice(self.start - begin, self.stop - self.start)
        except PARQUET_ERRORS as exc:  # the footer read when the directory opened; a data page did not
            raise BadInput(f"{self.shard}: rows {self.start} to {self.stop - 1} are damaged (rerun its stage): {exc}") from None
        # A damaged stage directory: text that is not UTF-8, a sample id that was edited.
        check_arrow(table, lambda i: f"{self.shard}: row {self.start + i}")
        if "sample_id" in table.column_names:
            check_sample_ids(table, self.shard, self.start)
        return table

    def rows(self) -> list[Row]:
        return self.read().to_pylist()


def open_shard(shard: str | Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(shard)
    except PARQUET_ERRORS as exc:
        raise BadInput(f"{shard}: not a readable Parquet file (a damaged stage directory: rerun its stage): {exc}") from None


def plan_batches(source: StageInput, batch_rows: int = DEFAULT_BATCH_ROWS, kind: str = "samples") -> list[Batch]:
    """The directory cut into batches of at most `batch_rows`, shard by shard: the same cut on every engine."""
    batches, first = [], 0
    for shard in source.shards(kind):
        n = open_shard(shard).metadata.num_rows
        for start in range(0, n, batch_rows):
            stop = min(n, start + batch_rows)
            batches.append(Batch(str(shard), start, stop, first))
            first += stop - start
    return batches


def _read_schema(file: Path) -> pa.Schema:
    """A Parquet file's schema, from its footer; a damaged file (truncated, overwritten) is named."""
    try:
        return pq.read_schema(file)
    except PARQUET_ERRORS as exc:
        raise BadInput(f"{file}: not a readable Parquet file (a damaged stage directory: rerun its stage): {exc}") from None


def _samples_schema(path: Path) -> pa.Schema:
    """The one schema of a stage directory's sample shards, which must hold sample_id (text) and provenance."""
    shards = sorted((path / "samples").glob("*.parquet"))
    if not shards:
        return with_provenance(pa.schema([]))
    schema = _read_schema(shards[0])
    for shard in shards[1:]:
        if not _read_schema(shard).equals(schema):
            raise BadInput(f"{shard}: columns differ from those of {shards[0].name} (a damaged stage directory: rerun its stage)")
    for name, is_type in (("sample_id", pa.types.is_string), ("provenance", pa.types.is_struct)):
        if name not in schema.names or not is_type(schema.field(name).type):
            found = f"holds {schema.field(name).type}" if name in schema.names else "is missing"
            raise BadInput(f"{shards[0]}: column {name!r} {found} (a damaged stage directory: rerun its stage)")
    return schema


def finished_stages(data_dir: str | Path) -> list[tuple[StageInput, int]]:
    """Every finished stage directory under data_dir with its depth in the pipeline, in pipeline order.

    Depth follows input fingerprints (generate 0, judge 1, ...), so order does not depend on directory names.
    """
    data_dir = Path(data_dir)
    stages = []
    if data_dir.is_dir():
        for d in sorted(data_dir.iterdir()):
            if not d.name.startswith(".") and all((d / f).exists() for f in ("stage.json", "manifest.parquet", "samples")):
                stages.append(StageInput.open(d))
    by_fp = {s.fingerprint: s for s in stages}

    def depth(stage: StageInput, seen: frozenset = frozenset()) -> int:
        parents = [by_fp[fp] for fp in stage.info.get("inputs", {}).values() if fp in by_fp and fp not in seen]
        return 1 + max((depth(p, seen | {stage.fingerprint}) for p in parents), default=-1)

    return sorted(((s, depth(s)) for s in stages), key=lambda sd: sd[1])


def lineage(source: StageInput) -> list[StageInput]:
    """The chain of stage directories that produced `source` (itself last), found among its siblings."""
    by_fp = {s.fingerprint: s for s, _ in finished_stages(source.path.parent)}
    chain = [source]
    while parents := [by_fp[fp] for fp in chain[-1].info.get("inputs", {}).values() if fp in by_fp]:
        chain.append(parents[0])
    return chain[::-1]


class _ShardWriter:
    """Appends rows to `dir/part-NNNNN.parquet`, starting a new shard every SHARD_ROWS rows."""

    def __init__(self, directory: Path, schema: pa.Schema):
        self.directory, self.schema = directory, schema
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._shard = 0
        self.rows = 0

    def write(self, rows: list[Row]) -> None:
        while rows:
            if self._writer is None:
                path = self.directory / f"part-{self._shard:05d}.parquet"
                self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
            take = rows[: SHARD_ROWS - self._in_shard]
            rows = rows[len(take) :]
            self._writer.write_table(pa.Table.from_pylist(take, schema=self.schema))
            self._in_shard += len(take)
            self.rows += len(take)
            if self._in_shard >= SHARD_ROWS:
                self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._in_shard, self._shard = None, 0, self._shard + 1

    def close(self) -> None:
        self._close_shard()


class StageWriter:
    """Writes one stage directory atomically. Use as a context manager; `write` kept and rejected rows.

    Every row gets this stage's fingerprint appended to `provenance.stages`, and its provenance is validated
    against the schema before the manifest row is written.
    """

    def __init__(self, out: str | Path, stage: str, content_schema: pa.Schema, fingerprint: dict[str, Any]):
        self.out = Path(out)
        self.stage = stage
        self.fingerprint = fingerprint
        self.schema = with_provenance(content_schema)
        self.tmp = temp_name(self.out)
        self.rejected_by: Counter[str] = Counter()
        self.entered = 0
        self.metrics: dict[str, Any] = {}
        self._seen: set[str] = set()

    def __enter__(self) -> StageWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        recover(self.out)
        self.tmp.mkdir()
        self._samples = _ShardWriter(self.tmp / "samples", self.schema)
        self._rejected = _ShardWriter(self.tmp / "rejected", rejected_schema(self.schema))
        self._manifest = pq.ParquetWriter(self.tmp / "manifest.parquet", manifest_schema(), compression="zstd")
        return self

    def write(self, kept: Iterable[Row], rejected: Iterable[Row] = ()) -> None:
        stamp = {"stage": self.stage, "fingerprint": self.fingerprint["fingerprint"]}
        kept, rejected = list(kept), list(rejected)
        manifest = []
        for row, is_kept in [(r, True) for r in kept] + [(r, False) for r in rejected]:
            sid = row["sample_id"]
            if sid in self._seen:  # every sample leaves exactly once
                raise BadInput(f"{self.stage}: sample {sid} was emitted twice; sample ids must be unique")
            self._seen.add(sid)
            prov = row["provenance"]
            prov["stages"] = [*prov.get("stages", []), stamp]
            validate_record(prov, f"{self.out / 'manifest.parquet'} (sample {sid})")
            if not is_kept:
                if not row.get("rejected_by") or not row.get("reason"):
                    raise ValueError(f"rejected sample {sid} lacks rejected_by/reason")
                self.rejected_by[row["rejected_by"]] += 1
            manifest.append(
                {
                    "sample_id": sid,
                    "stage": self.stage,
                    "kept": is_kept,
                    "rejected_by": None if is_kept else row["rejected_by"],
                    "reason": None if is_kept else row["reason"],
                    "provenance": prov,
                }
            )
        self._samples.write(kept)
        self._rejected.write(rejected)
        if manifest:
            self._manifest.write_table(pa.Table.from_pylist(manifest, schema=manifest_schema()))
        self.entered += len(manifest)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._samples.close()
        self._rejected.close()
        self._manifest.close()
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        stats = {
            "stage": self.stage,
            "entered": self.entered,
            "kept": self._samples.rows,
            "rejected": self._rejected.rows,
            "rejected_by": dict(sorted(self.rejected_by.items())),
            **self.metrics,
        }
        (self.tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        info = {**self.fingerprint, "code_revision": code_revision(), "finished_at": now_iso()}
        (self.tmp / "stage.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        swap_into_place(self.tmp, self.out)

    @property
    def stats(self) -> dict[str, Any]:
        return json.loads((self.out / "stats.json").read_text())


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write into: it replaces `out` when the block ends, and is removed
    (leaving `out` as it was) when the block fails."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = temp_name(out)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_into_place(tmp, out)


def swap_into_place(new: Path, out: Path) -> None:
    """Replace `out` by `new` with renames only; the old output survives until the new one is in place."""
    old = None
    if out.exists():
        old = temp_name(out, "old")
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def reject(row: Row, by: str, reason: str) -> Row:
    return {**row, "rejected_by": by, "reason": reason}


def require_columns(source: StageInput, columns, where: str, text: bool = False) -> None:
    """A configured field the input does not have is a typo, not an empty text: checks that read it would
    silently pass everything. With `text`, the columns must hold text: a column of numbers is damaged input."""
    missing = [c for c in columns if c not in source.schema.names]
    if missing:
        have = ", ".join(n for n in source.schema.names if n != "provenance")
        raise BadInput(f"{where}: no column {', '.join(map(repr, missing))} in {source.path} (columns: {have})")
    for c in columns if text else ():
        kind = source.schema.field(c).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise BadInput(f"{where}: column {c!r} in {source.path} holds {kind}, not text")
