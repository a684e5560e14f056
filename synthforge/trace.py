"""trace: from a batch, model, prompt version or sample to every sample it touched and where each ended up.

DuckDB queries the Parquet manifests in place: every stage directory's manifest.parquet (what became of a
sample: kept, or rejected by which check) and every published version's provenance/manifest.parquet (which
versions and splits hold it). Descendants are followed through `provenance.generation.parent_ids`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from synthforge.errors import BadInput
from synthforge.registry import VERSION_MANIFEST_SCHEMA, Registry
from synthforge.stagedir import finished_stages, manifest_schema


@dataclass
class TracedSample:
    sample_id: str
    relation: str  # "match" or "descendant of <id>"
    batch_id: str
    method: str
    model: str
    prompt: str | None
    fate: str
    last_stage: str | None
    kept: bool | None
    rejected_by: str | None
    reason: str | None
    published: list[str] = field(default_factory=list)  # "name vX.Y.Z split"


@dataclass
class TraceResult:
    query: dict[str, str]
    samples: list[TracedSample]

    @property
    def versions(self) -> dict[str, dict[str, int]]:
        """'name vX.Y.Z' -> {split: count} over traced samples."""
        out: dict[str, dict[str, int]] = {}
        for s in self.samples:
            for where in s.published:
                version, split = where.rsplit(" ", 1)
                out.setdefault(version, {}).setdefault(split, 0)
                out[version][split] += 1
        return out

    def to_json(self) -> str:
        return json.dumps(
            {"query": self.query, "versions": self.versions, "samples": [asdict(s) for s in self.samples]}, indent=2
        )


def _register(con, view: str, files: list[Path], schema: pa.Schema) -> None:
    """A view over Parquet files (file names go in as values, never spliced into SQL), or an empty typed table."""
    if files:
        con.read_parquet([str(f) for f in files], filename=True).create_view(view)
    else:
        con.register(view, schema.append(pa.field("filename", pa.string())).empty_table())


def _predicate(batch: str | None, model: str | None, prompt_version: str | None, sample: str | None) -> tuple[str, list]:
    given = [(k, v) for k, v in (("batch", batch), ("model", model), ("prompt_version", prompt_version), ("sample", sample)) if v]
    if len(given) != 1:
        raise BadInput("trace needs exactly one of --batch, --model, --prompt-version, --sample")
    kind, value = given[0]
    gen = "provenance.generation"
    if kind == "batch":
        return f"{gen}.batch_id = ?", [value]
    if kind == "model":
        return f"{gen}.model = ?", [value]
    if kind == "sample":
        return "sample_id LIKE ?", [value + "%"]
    if "@" in value:  # template-id@version
        template, version = value.rsplit("@", 1)
        return f"{gen}.prompt_template_id = ? AND {gen}.prompt_version = ?", [template, version]
    return f"{gen}.prompt_version = ?", [value]


def trace(
    data_dir: str | Path,
    registry: str | Path,
    *,
    batch: str | None = None,
    model: str | None = None,
    prompt_version: str | None = None,
    sample: str | None = None,
    prompt_field: str = "prompt",
) -> TraceResult:
    import duckdb

    where, args = _predicate(batch, model, prompt_version, sample)
    stages = [(st.path / "manifest.parquet", st.stage, depth) for st, depth in finished_stages(data_dir)]
    versions = Registry(registry).manifests()
    if not stages and not versions:
        raise BadInput(f"nothing to trace: no stage manifests under {data_dir} and no published versions in {registry}")
    con = duckdb.connect()
    con.register(
        "stage_files",
        pa.table(
            {"file": [str(p) for p, _, _ in stages], "stage": [s for _, s, _ in stages], "ord": [d for _, _, d in stages]},
            schema=pa.schema([("file", pa.string()), ("stage", pa.string()), ("ord", pa.int64())]),
        ),
    )
    con.register(
        "version_files",
        pa.table(
            {"file": [str(p) for _, _, p in versions], "label": [f"{n} v{v}" for n, v, _ in versions]},
            schema=pa.schema([("file", pa.string()), ("label", pa.string())]),
        ),
    )
    _register(con, "sm", [p for p, _, _ in stages], manifest_schema())
    _register(con, "vm", [p for _, _, p in versions], VERSION_MANIFEST_SCHEMA)
    rows = con.execute(
        f"""
        WITH RECURSIVE
          everything AS (SELECT sample_id, provenance FROM sm UNION ALL SELECT sample_id, provenance FROM vm),
          seeds AS (SELECT DISTINCT sample_id FROM everything WHERE {where}),
          edges AS (SELECT DISTINCT sample_id AS child, unnest(provenance.generation.parent_ids) AS parent FROM everything),
          tree(sample_id, parent) AS (
            SELECT sample_id, NULL::VARCHAR FROM seeds
            UNION
            SELECT e.child, e.parent FROM edges e JOIN tree t ON e.parent = t.sample_id
          ),
          -- a sample that matches itself is a match even when it also descends from another match
          first_relation AS (
            SELECT sample_id, CASE WHEN bool_or(parent IS NULL) THEN NULL ELSE min(parent) END AS parent
            FROM tree GROUP BY sample_id
          ),
          info AS (SELECT sample_id, any_value(provenance.generation) AS gen FROM everything GROUP BY sample_id),
          fate AS (
            SELECT sm.sample_id, arg_max(f.stage, f.ord) AS last_stage, arg_max(sm.kept, f.ord) AS kept,
                   arg_max(sm.rejected_by, f.ord) AS rejected_by, arg_max(sm.reason, f.ord) AS reason
            FROM sm JOIN stage_files f ON sm.filename = f.file GROUP BY sm.sample_id
          ),
          published AS (
            SELECT vm.sample_id, list(DISTINCT v.label || ' ' || vm.split ORDER BY v.label || ' ' || vm.split) AS places
            FROM vm JOIN version_files v ON vm.filename = v.file GROUP BY vm.sample_id
          )
        SELECT r.sample_id, r.parent, i.gen.batch_id, i.gen.method, i.gen.model,
               i.gen.prompt_template_id || '@' || i.gen.prompt_version,
               fate.last_stage, fate.kept, fate.rejected_by, fate.reason, coalesce(p.places, [])
        FROM first_relation r JOIN info i USING (sample_id)
        LEFT JOIN fate USING (sample_id) LEFT JOIN published p USING (sample_id)
        ORDER BY r.parent NULLS FIRST, i.gen.batch_id, r.sample_id
        """,
        args,
    ).fetchall()
    samples = []
    for sid, parent, batch_id, method, gen_model, prompt, last_stage, kept, rejected_by, reason, places in rows:
        if last_stage is None:
            fate = "published" if places else "unknown (no stage manifest holds it)"
        elif kept:
            fate = f"kept through {last_stage}"
        else:
            fate = f"rejected at {last_stage} by {rejected_by}"
        samples.append(
            TracedSample(
                sample_id=sid,
                relation="match" if parent is None else f"descendant of {parent}",
                batch_id=batch_id,
                method=method,
                model=gen_model,
                prompt=prompt,
                fate=fate,
                last_stage=last_stage,
                kept=kept,
                rejected_by=rejected_by,
                reason=reason,
                published=list(places),
            )
        )
    query = {k: v for k, v in (("batch", batch), ("model", model), ("prompt_version", prompt_version), ("sample", sample)) if v}
    return TraceResult(query=query, samples=samples)
