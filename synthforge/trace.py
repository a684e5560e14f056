"""trace: from a batch, model, prompt version, sample or text to every sample it touched and where each ended up.

DuckDB queries the Parquet manifests in place: every stage directory's manifest.parquet (what became of a
sample: kept, or rejected by which check) and every published version's provenance/manifest.parquet (which
versions and splits hold it). Descendants are followed through `provenance.generation.parent_ids`.

A trace by text (`texts=`) first finds the samples whose text matches a query item (exact, n-gram or MinHash:
synthforge.content_index). A published version's manifest indexes its texts, so exact and MinHash lookups read
only the few candidates' text from its data shards; stage directories and versions without a current index are
read and indexed on the fly, and the n-gram test reads the text of every sample once. The samples of the matches'
dedup clusters come along as near-duplicates, and the walk to descendants and versions starts from all of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthforge.content_index import (
    BANDS,
    METHODS,
    ContentQuery,
    Evidence,
    QueryItem,
    band_keys,
    index_is_current,
    row_text,
    text_fields,
)
from synthforge.errors import BadInput
from synthforge.minhash import exact_hash, normalize
from synthforge.registry import Registry
from synthforge.release import manifest_schema as version_manifest_schema
from synthforge.stagedir import finished_stages, manifest_schema

_GEN = "provenance.generation"
# What the walk reads of every sample: what a seed is chosen by, and the links to other samples.
_LINKS = f"""sample_id, {_GEN}.batch_id AS batch_id, {_GEN}.model AS model, {_GEN}.prompt_template_id AS prompt_template_id,
    {_GEN}.prompt_version AS prompt_version, {_GEN}.parent_ids AS parent_ids, provenance.dedup.cluster_id AS cluster_id"""
# What a traced sample shows, read for the traced samples only.
_DETAILS = f"""sample_id, {_GEN}.batch_id AS batch_id, {_GEN}.method AS method, {_GEN}.model AS model,
    {_GEN}.model_revision AS model_revision, {_GEN}.prompt_template_id || '@' || {_GEN}.prompt_version AS prompt,
    CASE WHEN provenance.source.record_id IS NULL THEN provenance.source.uri
         ELSE provenance.source.uri || '#' || provenance.source.record_id END AS source"""
_SCAN_ROWS = 65_536  # rows of text per read: bounds memory on large shards
_QUOTE_CHARS = 60


@dataclass
class TracedSample:
    sample_id: str
    # "match" (by batch, model, prompt version, sample), "match: METHOD (SIMILARITY, query ID)" (by text),
    # "near-duplicate of ID" (same dedup cluster as a match) or "descendant of ID"
    relation: str
    batch_id: str
    method: str
    model: str
    model_revision: str | None
    prompt: str | None  # template@version
    source: str | None  # the source record or document: uri#record_id
    fate: str
    last_stage: str | None
    kept: bool | None
    rejected_by: str | None
    reason: str | None
    published: list[str] = field(default_factory=list)  # "name vX.Y.Z split"
    evidence: list[Evidence] = field(default_factory=list)  # why it matches the query text, strongest first


@dataclass
class TraceResult:
    query: dict[str, Any]
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
            {"query": self.query, "versions": self.versions, "samples": [asdict(s) for s in self.samples]},
            indent=2,
            ensure_ascii=False,
        )


@dataclass(frozen=True)
class _Place:
    """Where samples are: a stage directory or a published version, with the shards that hold their content."""

    label: str
    manifest: Path
    shards: list[Path]


def read_items(path: str | Path, field: str = "text") -> list[QueryItem]:
    """The items of a .jsonl file (one object per line: the text in `field`, an optional `id`) or a .txt file (one
    item per line). An item's id is its `id`, else its line number."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise BadInput(f"{path}: expected a .jsonl file (one JSON object per line) or a .txt file (one item per line)")
    try:
        with path.open(encoding="utf-8") as fh:  # lines end at \n only: JSON strings may hold other line separators
            lines = [line.rstrip("\r\n") for line in fh]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read: {exc}") from None
    items, first_seen = [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        if path.suffix == ".txt":
            row = {"id": f"line {number}", field: line}
        else:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{where}: not valid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise BadInput(f"{where}: expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get(field), str) or not re.search(r"\w", row[field]):
            raise BadInput(f"{where}: no words in field {field!r} (fields: {', '.join(row) or 'none'})")
        item_id = str(row["id"]) if row.get("id") not in (None, "") else f"line {number}"
        if item_id in first_seen:
            raise BadInput(f"{where}: duplicate id {item_id!r} (also on line {first_seen[item_id]})")
        first_seen[item_id] = number
        items.append(QueryItem(item_id, row[field]))
    if not items:
        raise BadInput(f"{path}: no items to trace")
    return items


def _register(con, view: str, files: list[Path], schema: pa.Schema) -> None:
    """A view over Parquet files (file names go in as values, never spliced into SQL), or an empty typed table."""
    if files:
        con.read_parquet([str(f) for f in files], filename=True, union_by_name=True).create_view(view)
    else:
        con.register(view, schema.append(pa.field("filename", pa.string())).empty_table())


def _predicate(kind: str, value: str) -> tuple[str, list]:
    """A filter on the walk's `everything` (see _LINKS) and its arguments."""
    if kind == "batch":
        return "batch_id = ?", [value]
    if kind == "model":
        return "model = ?", [value]
    if kind == "sample":
        return "sample_id LIKE ?", [value + "%"]
    if "@" in value:  # template-id@version
        template, version = value.rsplit("@", 1)
        return "prompt_template_id = ? AND prompt_version = ?", [template, version]
    return "prompt_version = ?", [value]


def _places(data_dir: str | Path, registry: str | Path | None, versions: Sequence[tuple[str, str | Path]]) -> tuple[list, list]:
    """(stage places with their pipeline depth, version places): where samples can be found."""
    stages = [
        (_Place(st.stage, st.path / "manifest.parquet", st.shards("samples") + st.shards("rejected")), depth)
        for st, depth in finished_stages(data_dir)
    ]
    registered = Registry(registry).manifests() if registry is not None else []
    published = [_version(f"{name} v{version}", manifest.parent.parent) for name, version, manifest in registered]
    published += [_version(label, Path(folder)) for label, folder in versions]
    if not stages and not published:
        raise BadInput(f"nothing to trace: no stage manifests under {data_dir} and no published versions in {registry}")
    return stages, published


def _version(label: str, folder: Path) -> _Place:
    manifest = folder / "provenance" / "manifest.parquet"
    if not manifest.is_file():
        raise BadInput(f"{label}: {folder} is not a published version: provenance/manifest.parquet is missing")
    return _Place(label, manifest, sorted((folder / "data").glob("*.parquet")))


def trace(
    data_dir: str | Path,
    registry: str | Path | None,
    *,
    batch: str | None = None,
    model: str | None = None,
    prompt_version: str | None = None,
    sample: str | None = None,
    sample_ids: Sequence[str] | None = None,
    texts: Sequence[str | QueryItem] | None = None,
    methods: Collection[str] = METHODS,
    versions: Sequence[tuple[str, str | Path]] = (),
) -> TraceResult:
    """Trace by exactly one of batch, model, prompt version (VERSION or TEMPLATE@VERSION), sample id (or prefix),
    a list of exact sample ids (each must be in some manifest) or texts (query items: plain strings are named #1,
    #2, ...; `read_items` reads a file of them).

    The places searched are the finished stage directories under `data_dir`, every version in `registry` (None:
    none) and `versions`: (label, folder) pairs of published versions held elsewhere, such as a Hub revision
    downloaded to a folder (its provenance/manifest.parquet and data/ shards). `methods` picks the text matches.
    """
    import duckdb

    selectors = {
        "batch": batch,
        "model": model,
        "prompt_version": prompt_version,
        "sample": sample,
        "sample_ids": sample_ids,
        "text": texts,
    }
    if sum(bool(v) for v in selectors.values()) != 1:
        raise BadInput("trace needs exactly one of --batch, --model, --prompt-version, --sample, --text/--file")
    stages, published = _places(data_dir, registry, versions)
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")  # DuckDB would draw one on the terminal for a long query
    con.register(
        "stage_files",
        pa.table(
            {"file": [str(p.manifest) for p, _ in stages], "stage": [p.label for p, _ in stages], "ord": [d for _, d in stages]},
            schema=pa.schema([("file", pa.string()), ("stage", pa.string()), ("ord", pa.int64())]),
        ),
    )
    con.register(
        "version_files",
        pa.table(
            {"file": [str(p.manifest) for p in published], "label": [p.label for p in published]},
            schema=pa.schema([("file", pa.string()), ("label", pa.string())]),
        ),
    )
    _register(con, "sm", [p.manifest for p, _ in stages], manifest_schema())
    _register(con, "vm", [p.manifest for p in published], version_manifest_schema())

    if sample_ids:
        con.register(
            "wanted", pa.table({"sample_id": list(dict.fromkeys(sample_ids))}, schema=pa.schema([("sample_id", pa.string())]))
        )
        known = "SELECT sample_id FROM sm UNION SELECT sample_id FROM vm"
        unknown = [r[0] for r in con.execute(f"SELECT sample_id FROM wanted EXCEPT ({known}) ORDER BY 1").fetchall()]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise BadInput(f"{len(unknown)} sample ids are in no stage manifest and no published version: {shown}")
        rows = _walk(con, "SELECT sample_id FROM wanted", near_duplicates=False)
        return TraceResult({"sample_ids": len(sample_ids)}, [_traced(row) for row in rows])
    if not texts:
        where, args = _predicate(*next((k, v) for k, v in selectors.items() if v))
        rows = _walk(con, f"SELECT DISTINCT sample_id FROM everything WHERE {where}", near_duplicates=False, args=args)
        return TraceResult({k: v for k, v in selectors.items() if v}, [_traced(row) for row in rows])

    items = [t if isinstance(t, QueryItem) else QueryItem(f"#{k}", t) for k, t in enumerate(texts, 1)]
    content = ContentQuery(items, methods)
    evidence = _find_by_content(con, content, published + [p for p, _ in stages])
    con.register("matched", pa.table({"sample_id": list(evidence)}, schema=pa.schema([("sample_id", pa.string())])))
    samples = [_traced(row, evidence) for row in _walk(con, "SELECT sample_id FROM matched", near_duplicates=True)]
    strength = {m: i for i, m in enumerate(METHODS)}
    # matches strongest first; the sort is stable, so the rest keep the walk's order
    samples.sort(key=lambda s: (0, strength[s.evidence[0].method], -s.evidence[0].similarity) if s.evidence else (1, 0, 0.0))
    query = {"text": [asdict(item) for item in items], "methods": [m for m in METHODS if m in content.methods]}
    return TraceResult(query, samples)


def _walk(con, seeds: str, near_duplicates: bool, args: Sequence = ()) -> list[tuple]:
    """The seeds (a query of sample ids), the other members of their dedup clusters when asked, and all their
    descendants: one row per sample with its closest relation (0 seed, 1 near-duplicate, 2 descendant), the
    sample it relates to, its generation, source, fate and the versions holding it."""
    if near_duplicates:
        # a match's cluster (its kept representative and the duplicates dedup rejected) holds the same text
        near = """
          SELECT e.sample_id, min(c.sample_id) AS parent FROM everything e
          JOIN (SELECT DISTINCT sample_id, cluster_id FROM everything JOIN seeds USING (sample_id)) c USING (cluster_id)
          WHERE e.sample_id NOT IN (SELECT sample_id FROM seeds)
          GROUP BY e.sample_id"""
    else:
        near = "SELECT NULL::VARCHAR AS sample_id, NULL::VARCHAR AS parent WHERE false"
    relation = con.sql(
        f"""
        WITH RECURSIVE
          everything AS (SELECT {_LINKS} FROM sm UNION ALL SELECT {_LINKS} FROM vm),
          seeds AS ({seeds}),
          near AS ({near}),
          roots AS (SELECT sample_id, NULL::VARCHAR AS parent, 0 AS rank FROM seeds
                    UNION ALL SELECT sample_id, parent, 1 FROM near),
          edges AS (
            SELECT DISTINCT sample_id AS child, unnest(parent_ids) AS parent FROM everything WHERE len(parent_ids) > 0
          ),
          tree(sample_id, parent, rank) AS (
            SELECT * FROM roots
            UNION
            SELECT e.child, e.parent, 2 FROM edges e JOIN tree t ON e.parent = t.sample_id
          ),
          -- a sample is reported once, by its closest relation: a seed, else a near-duplicate, else a descendant
          best AS (SELECT sample_id, min(rank) AS rank FROM tree GROUP BY sample_id)
        SELECT t.sample_id, t.rank, min(t.parent) AS parent FROM tree t JOIN best b USING (sample_id, rank)
        GROUP BY t.sample_id, t.rank
        """,
        params=list(args),
    ).to_arrow_table()
    # The details in a second query with the (few) traced samples as a table: joined with the manifests as the
    # small side, where a subquery would make DuckDB group every manifest row first.
    con.register("relation", relation)
    return con.execute(
        f"""
        WITH
          info AS (
            SELECT sample_id, any_value(batch_id) AS batch_id, any_value(method) AS method, any_value(model) AS model,
                   any_value(model_revision) AS model_revision, any_value(prompt) AS prompt, any_value(source) AS source
            FROM (SELECT {_DETAILS} FROM sm UNION ALL SELECT {_DETAILS} FROM vm) SEMI JOIN relation USING (sample_id)
            GROUP BY sample_id
          ),
          fate AS (
            SELECT sm.sample_id, arg_max(f.stage, f.ord) AS last_stage, arg_max(sm.kept, f.ord) AS kept,
                   arg_max(sm.rejected_by, f.ord) AS rejected_by, arg_max(sm.reason, f.ord) AS reason
            FROM sm JOIN stage_files f ON sm.filename = f.file SEMI JOIN relation USING (sample_id) GROUP BY sm.sample_id
          ),
          published AS (
            SELECT vm.sample_id, list(DISTINCT v.label || ' ' || vm.split ORDER BY v.label || ' ' || vm.split) AS places
            FROM vm JOIN version_files v ON vm.filename = v.file SEMI JOIN relation USING (sample_id) GROUP BY vm.sample_id
          )
        SELECT r.sample_id, r.rank, r.parent, i.batch_id, i.method, i.model, i.model_revision, i.prompt, i.source,
               fate.last_stage, fate.kept, fate.rejected_by, fate.reason, coalesce(p.places, [])
        FROM relation r JOIN info i USING (sample_id)
        LEFT JOIN fate USING (sample_id) LEFT JOIN published p USING (sample_id)
        ORDER BY r.rank, r.parent NULLS FIRST, i.batch_id, r.sample_id
        """
    ).fetchall()


def _traced(row: tuple, evidence: dict[str, list[Evidence]] | None = None) -> TracedSample:
    sid, rank, parent, batch_id, method, model, revision, prompt, source, last_stage, kept, rejected_by, reason, places = row
    if last_stage is None:
        fate = "published" if places else "unknown (no stage manifest holds it)"
    elif kept:
        fate = f"kept through {last_stage}"
    else:
        fate = f"rejected at {last_stage} by {rejected_by}"
    found = evidence[sid] if evidence is not None and rank == 0 else []
    if rank == 0:
        relation = f"match: {found[0].method} ({found[0].similarity:.2f}, query {found[0].query})" if found else "match"
    else:
        relation = f"{'near-duplicate' if rank == 1 else 'descendant'} of {parent}"
    return TracedSample(
        sample_id=sid,
        relation=relation,
        batch_id=batch_id,
        method=method,
        model=model,
        model_revision=revision,
        prompt=prompt,
        source=source,
        fate=fate,
        last_stage=last_stage,
        kept=kept,
        rejected_by=rejected_by,
        reason=reason,
        published=list(places),
        evidence=found,
    )


# -- finding samples by their text ---------------------------------------------------------------------------


def _find_by_content(con, query: ContentQuery, places: list[_Place]) -> dict[str, list[Evidence]]:
    """sample_id -> evidence for every sample whose text matches a query item, each sample's text read once."""
    indexed = [p for p in places if index_is_current(pq.read_schema(p.manifest))]
    from_index = _index_candidates(con, query, indexed)
    found: dict[str, list[Evidence]] = {}
    seen: set[str] = set()  # samples already tested: a sample's text is the same wherever it is
    for place in places:
        pending = from_index.get(str(place.manifest), set()) - seen
        on_the_fly = place not in indexed and bool(query.methods - {"ngram"})
        full_scan = on_the_fly or "ngram" in query.methods
        if not (full_scan or pending):
            continue
        for ids, columns in _text_batches(place.shards):
            new = [i for i, sid in enumerate(ids) if sid not in seen and (full_scan or sid in pending)]
            if not new:
                continue
            ids, columns = [ids[i] for i in new], {name: texts.take(new) for name, texts in columns.items()}
            seen.update(ids)
            candidate = np.fromiter((sid in pending for sid in ids), dtype=bool, count=len(ids))
            for texts in columns.values():
                candidate |= query.may_share_ngram(texts)
            if on_the_fly:
                candidate |= _index_hits(query, columns)
            tested = np.flatnonzero(candidate)
            values = {name: texts.take(tested).to_pylist() for name, texts in columns.items()}
            rows = [{name: values[name][j] for name in values} for j in range(len(tested))]
            for i, evidence in zip(tested, query.evidence(rows), strict=True):
                if evidence:
                    found[ids[i]] = evidence
    return found


def _index_candidates(con, query: ContentQuery, indexed: list[_Place]) -> dict[str, set[str]]:
    """manifest file -> sample ids whose indexed text may match: the same whole text, or band keys shared with a
    query (all BANDS of them for an exact copy of one field, one for a MinHash candidate)."""
    if not indexed or not query.methods & {"exact", "minhash"}:
        return {}
    con.register("query_hashes", pa.table({"h": pa.array(query.hashes, pa.string())}))
    con.register("query_keys", pa.table({"k": pa.array(query.keys, pa.uint64())}))
    con.read_parquet([str(p.manifest) for p in indexed], filename=True).create_view("indexed")
    # unnest and join: several times faster than a list function on every row
    sql = f"""
        SELECT filename, sample_id FROM (SELECT filename, sample_id, unnest(minhash_bands) AS k FROM indexed)
        JOIN query_keys USING (k) GROUP BY filename, sample_id HAVING count(*) >= {1 if "minhash" in query.methods else BANDS}
    """
    if "exact" in query.methods:
        sql += " UNION SELECT filename, sample_id FROM indexed WHERE text_hash IN (SELECT h FROM query_hashes)"
    out: dict[str, set[str]] = {}
    for filename, sid in con.execute(sql).fetchall():
        out.setdefault(filename, set()).add(sid)
    return out


def _index_hits(query: ContentQuery, columns: dict[str, pa.Array]) -> np.ndarray:
    """The rows whose text the index would have offered as candidates, for text that has no index."""
    raw = {name: texts.to_pylist() for name, texts in columns.items()}
    keys = np.asarray(query.keys, dtype=np.uint64)
    hits = np.zeros(len(next(iter(raw.values()))), dtype=bool)
    for texts in raw.values():
        field_keys, has_words = band_keys([normalize(t) if t else "" for t in texts])
        hits |= has_words & np.isin(field_keys, keys).any(axis=1)
    if "exact" in query.methods and len(raw) > 1:
        hashes = set(query.hashes)
        rows = ({name: texts[i] for name, texts in raw.items()} for i in range(len(hits)))
        hits |= np.fromiter((exact_hash(row_text(row, list(raw))) in hashes for row in rows), dtype=bool, count=len(hits))
    return hits


def _text_batches(shards: list[Path]) -> Iterator[tuple[list[str], dict[str, pa.Array]]]:
    """(sample ids, {text field: texts}) of every shard, in bounded batches; shards without text fields are skipped."""
    for shard in shards:
        fields = text_fields(pq.read_schema(shard))
        if not fields:
            continue
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=_SCAN_ROWS, columns=["sample_id", *fields]):
            yield batch.column("sample_id").to_pylist(), {name: batch.column(name) for name in fields}


# -- printing ------------------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 1] + "…"


def print_trace(result: TraceResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    by_text = "text" in result.query
    if by_text:
        query = f"{len(result.query['text'])} query item(s) ({', '.join(result.query['methods'])})"
    else:
        query = ", ".join(f"{k}={v}" for k, v in result.query.items())
    if not result.samples:
        console.print(f"no samples match {query}")
        return
    matches = sum(s.relation.startswith("match") for s in result.samples)
    near = sum(s.relation.startswith("near-duplicate") for s in result.samples)
    kept = sum(bool(s.kept) for s in result.samples)
    console.print(
        f"{query}: {matches} samples, {f'{near} near-duplicates, ' if by_text else ''}"
        f"{len(result.samples) - matches - near} descendants; "
        f"{kept} kept, {sum(s.kept is False for s in result.samples)} rejected"
    )
    # three columns of stacked lines stay readable in an 80-column terminal; nothing is cut, long words wrap
    table = Table(show_lines=True)
    table.add_column("sample", overflow="fold", min_width=24)  # a sample id on one line
    table.add_column("made by", overflow="fold")
    table.add_column("fate, published in", overflow="fold")
    for s in result.samples:
        model = f"{s.model}@{s.model_revision}" if s.model_revision else s.model
        quote = f"“{_quote(s.evidence[0].span)}”" if s.evidence else None
        made_by = [f"{s.method} · {model}", s.prompt, f"batch {s.batch_id}", s.source]
        fate = f"{s.fate}: {s.reason}" if s.reason else s.fate
        table.add_row(
            *("\n".join(filter(None, cell)) for cell in ([s.sample_id, s.relation, quote], made_by, [fate, *s.published]))
        )
    console.print(table)
    if result.versions:
        versions = Table("published version", "split", "samples", title="versions holding these samples")
        for version, splits in result.versions.items():
            for split, n in splits.items():
                versions.add_row(version, split, str(n))
        console.print(versions)
    else:
        console.print("no published version holds any of them")
