"""Version diffs: which samples a version adds, removes, changes or moves between splits, how its distributions
shift, and which semantic version that makes it.

Versions follow semver with the meaning Croissant 1.1 gives it for datasets:

- PATCH: the same records. Every sample id is there with the same content in the same split; only the card or
  other metadata changed.
- MINOR: records were added, and only added. Every earlier record is still there, unchanged, in its split.
- MAJOR: records were changed, removed or moved between splits, so a number measured on the earlier version
  may not hold on this one.

A sample is identified by its `sample_id`. It is changed when its `content_hash` differs (the content columns,
the label included; provenance alone, such as a new judge score, does not change the record), and moved when its
split differs; a sample can be both. The comparison and the counts run in DuckDB and Arrow compute, never in a
Python loop over rows: two manifests of a million samples compare in about two seconds on two cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from synthforge.errors import BadInput
from synthforge.registry import version_key

if TYPE_CHECKING:
    import duckdb
    from rich.console import Console

Bump = Literal["none", "patch", "minor", "major"]
BUMP_ORDER: tuple[Bump, ...] = ("none", "patch", "minor", "major")
REQUIRED_COLUMNS = ("sample_id", "split", "content_hash")
VOG = "vog.score"  # provenance.vog.score, beside the judge checks (whose `vog` check scores the normalised value)
EXAMPLES = 5  # ids printed per list; to_dict keeps them all

# Manifest fields the distributions read, as columns of the registered view.
FIELDS = {
    "label": "label",
    "difficulty": "provenance.difficulty",
    "method": "provenance.generation.method",
    "model": "provenance.generation.model",
    "template": "provenance.generation.prompt_template_id",
    "version": "provenance.generation.prompt_version",
}
# Distribution name -> its value in SQL over those columns. A prompt reads as `trace --prompt-version` takes it.
DIMENSIONS = {
    "difficulty": "difficulty",
    "label": "label",
    "generator": "NULLIF(concat_ws(' · ', method, model), '')",
    "prompt_version": "NULLIF(concat_ws('@', template, version), '')",
    "split": "split",
}


class ShiftRow(NamedTuple):
    value: str | None
    old: int
    old_share: float
    new: int
    new_share: float
    delta_pp: float  # new share minus old share, in percentage points


@dataclass
class Shift:
    """How many samples carry each value of one field (difficulty, label, ...), before and after."""

    old: dict[str | None, int]
    new: dict[str | None, int]

    def rows(self) -> list[ShiftRow]:
        """One row per value, the most frequent in the new version first."""
        old_total, new_total = sum(self.old.values()), sum(self.new.values())
        rows = []
        for value in self.old.keys() | self.new.keys():
            old, new = self.old.get(value, 0), self.new.get(value, 0)
            old_share = old / old_total if old_total else 0.0
            new_share = new / new_total if new_total else 0.0
            rows.append(ShiftRow(value, old, old_share, new, new_share, (new_share - old_share) * 100))
        return sorted(rows, key=lambda r: (-r.new, -r.old, r.value is None, r.value or ""))


@dataclass(frozen=True)
class ScoreStats:
    n: int
    mean: float
    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, scores: np.ndarray) -> ScoreStats:
        # Sorted first: the mean then sums in the same order whatever order the manifest holds.
        scores = np.sort(scores)
        p10, median, p90 = (float(q) for q in np.quantile(scores, [0.1, 0.5, 0.9]))
        return cls(int(scores.size), float(scores.mean()), median, p10, p90)


@dataclass(frozen=True)
class ScoreShift:
    """One score's distribution before and after; None where that version has no numeric score for it."""

    old: ScoreStats | None
    new: ScoreStats | None

    @property
    def delta_mean(self) -> float | None:
        return self.new.mean - self.old.mean if self.old and self.new else None


@dataclass
class VersionDiff:
    old: str | None  # version label; None: no earlier version
    new: str | None  # version label; None: the candidate about to be published
    added: list[str]
    removed: list[str]
    changed: list[str]
    moved: list[tuple[str, str, str]]  # (sample_id, old split, new split)
    unchanged: int
    shifts: dict[str, Shift]  # difficulty, label, generator (method · model), prompt_version (template@version), split
    judge_scores: dict[str, ScoreShift]  # per judge check with numeric scores, and vog.score
    first: bool = False  # no earlier version: nothing to bump, the version starts at 1.0.0

    @property
    def old_total(self) -> int:
        return sum(self.shifts["split"].old.values())

    @property
    def new_total(self) -> int:
        return sum(self.shifts["split"].new.values())

    @property
    def bump(self) -> Bump:
        """The smallest release the difference allows (module docstring)."""
        if self.first:
            return "none"
        if self.removed or self.changed or self.moved:
            return "major"
        return "minor" if self.added else "patch"

    def to_dict(self) -> dict:
        return {
            "old": self.old,
            "new": self.new,
            "bump": self.bump,
            "counts": {
                "old": self.old_total,
                "new": self.new_total,
                "added": len(self.added),
                "removed": len(self.removed),
                "changed": len(self.changed),
                "moved": len(self.moved),
                "unchanged": self.unchanged,
            },
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "moved": [{"sample_id": s, "from": a, "to": b} for s, a, b in self.moved],
            "shifts": {name: [r._asdict() for r in shift.rows()] for name, shift in self.shifts.items()},
            "judge_scores": {
                name: {
                    "old": asdict(s.old) if s.old else None,
                    "new": asdict(s.new) if s.new else None,
                    "delta_mean": s.delta_mean,
                }
                for name, s in self.judge_scores.items()
            },
        }


def diff_manifests(
    old: pa.Table | None, new: pa.Table, old_label: str | None = None, new_label: str | None = None
) -> VersionDiff:
    """Compare two version manifests (provenance/manifest.parquet). `old` None: there is no earlier version."""
    import duckdb

    first = old is None
    if old is None:
        old = new.schema.empty_table()
    con = duckdb.connect()
    for view, table, label in (("old_m", old, old_label), ("new_m", new, new_label)):
        _register(con, view, table, _describe(label, view == "new_m"))
    rows = con.sql(
        """
        SELECT coalesce(n.sample_id, o.sample_id) AS sample_id,
               o.sample_id IS NULL AS is_added,
               n.sample_id IS NULL AS is_removed,
               o.content_hash IS DISTINCT FROM n.content_hash AS is_changed,
               o.split IS DISTINCT FROM n.split AS is_moved,
               o.split AS old_split,
               n.split AS new_split
        FROM old_m o FULL OUTER JOIN new_m n ON o.sample_id = n.sample_id
        WHERE o.sample_id IS NULL OR n.sample_id IS NULL
           OR o.content_hash IS DISTINCT FROM n.content_hash OR o.split IS DISTINCT FROM n.split
        ORDER BY sample_id
        """
    ).to_arrow_table()
    in_both = pc.invert(pc.or_(rows["is_added"], rows["is_removed"]))
    changed = pc.and_(in_both, rows["is_changed"])
    moved = rows.filter(pc.and_(in_both, rows["is_moved"]))
    added = rows["sample_id"].filter(rows["is_added"]).to_pylist()
    removed = rows["sample_id"].filter(rows["is_removed"]).to_pylist()
    return VersionDiff(
        old=old_label,
        new=new_label,
        added=added,
        removed=removed,
        changed=rows["sample_id"].filter(changed).to_pylist(),
        moved=list(zip(*(moved[c].to_pylist() for c in ("sample_id", "old_split", "new_split")), strict=True)),
        unchanged=new.num_rows - (rows.num_rows - len(removed)),  # new samples not among the differing rows
        shifts={name: Shift(_counts(con, "old_m", name), _counts(con, "new_m", name)) for name in DIMENSIONS},
        judge_scores=_score_shifts(_scores(old), _scores(new)),
        first=first,
    )


def next_version(latest: str | None, diff: VersionDiff) -> str:
    """The version to publish after `latest`: 1.0.0 for the first one, else the bump the diff calls for."""
    if latest is None:
        return "1.0.0"
    if diff.first:
        raise ValueError(f"the diff has no earlier version, but the latest version is {latest}")
    major, minor, patch = version_key(latest)
    if diff.bump == "major":
        return f"{major + 1}.0.0"
    if diff.bump == "minor":
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


def check_version(latest: str | None, proposed: str, diff: VersionDiff) -> None:
    """Refuse a requested version that is not after `latest` or that promises less than the diff delivers
    (a patch release that adds samples, a minor one that removes some). A bigger bump than needed is fine."""
    version = version_key(proposed)
    if latest is None:
        return
    shown = ".".join(map(str, version))
    previous = version_key(latest)
    if version <= previous:
        raise BadInput(
            f"version {shown} is not greater than the latest version {latest}: the next version is {next_version(latest, diff)}"
        )
    kind = "major" if version[0] > previous[0] else "minor" if version[1] > previous[1] else "patch"
    if BUMP_ORDER.index(kind) < BUMP_ORDER.index(diff.bump):
        raise BadInput(f"{shown} would be a {kind} release, but {_why(diff)}: the next version is {next_version(latest, diff)}")


def print_diff(diff: VersionDiff, console: Console | None = None) -> None:
    """Counts, a few example ids, the moved samples, and each distribution side by side with its deltas."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    old, new = diff.old or "(no earlier version)", diff.new or "candidate"
    summary = Table("", "samples", "examples", title=f"{old} → {new}: {diff.bump} release")
    summary.add_row("total", f"{diff.old_total} → {diff.new_total}", "")
    for name, ids in (("added", diff.added), ("removed", diff.removed), ("changed", diff.changed)):
        summary.add_row(name, str(len(ids)), escape(_examples(ids)))
    summary.add_row("moved", str(len(diff.moved)), escape(_examples([s for s, _, _ in diff.moved])))
    summary.add_row("unchanged", str(diff.unchanged), "")
    console.print(summary)

    if diff.moved:
        moved = Table("sample_id", "from", "to", title=f"moved between splits ({len(diff.moved)})")
        for sample_id, a, b in diff.moved[:EXAMPLES]:
            moved.add_row(escape(sample_id), escape(a or "(none)"), escape(b or "(none)"))
        console.print(moved)

    for name, shift in diff.shifts.items():
        table = Table(name, old, "%", new, "%", "Δ pp", title=f"{name} distribution")
        for r in shift.rows():
            value = "[dim](none)[/dim]" if r.value is None else escape(r.value)
            table.add_row(value, str(r.old), f"{r.old_share:.1%}", str(r.new), f"{r.new_share:.1%}", f"{r.delta_pp:+.1f}")
        console.print(table)

    if diff.judge_scores:
        scores = Table("score", "n", "mean", "median", "p10", "p90", title=f"judge scores, {old} → {new}")
        for name, s in diff.judge_scores.items():
            cells = [
                _change(getattr(s.old, stat) if s.old else None, getattr(s.new, stat) if s.new else None, stat)
                for stat in ScoreStats.__dataclass_fields__
            ]
            scores.add_row(escape(name), *cells)
        console.print(scores)


def _describe(label: str | None, is_new: bool) -> str:
    if label:
        return f"version {label}"
    return "the candidate version" if is_new else "the earlier version"


def _register(con: duckdb.DuckDBPyConnection, view: str, table: pa.Table, where: str) -> None:
    """Register the columns the diff reads as `view`, refusing a manifest that cannot identify its samples."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.schema.names]
    if missing:
        raise BadInput(f"the manifest of {where} lacks the column(s) {', '.join(missing)}")
    # Provenance fields go in as plain columns: DuckDB then never scans the whole struct, and it refuses struct
    # columns of sliced Arrow tables.
    columns = {name: table[name] for name in REQUIRED_COLUMNS} | {name: _column(table, path) for name, path in FIELDS.items()}
    con.register(view, pa.table(columns))
    duplicate = con.execute(
        f"SELECT sample_id, count(*) FROM {view} GROUP BY sample_id HAVING count(*) > 1 OR sample_id IS NULL ORDER BY 1 LIMIT 1"
    ).fetchone()
    if duplicate and duplicate[0] is None:
        raise BadInput(f"the manifest of {where} has {duplicate[1]} row(s) without a sample_id")
    if duplicate:
        raise BadInput(f"the manifest of {where} lists sample {duplicate[0]} {duplicate[1]} times")


def _field(schema: pa.Schema | pa.StructType, path: str) -> pa.DataType | None:
    """The type at a dotted path through struct columns, or None where this manifest has no such field (older
    manifests lack `label`, and provenance gained fields over time)."""
    typ: pa.Schema | pa.DataType = schema
    for name in path.split("."):
        if not isinstance(typ, pa.Schema | pa.StructType) or typ.get_field_index(name) < 0:
            return None
        typ = typ.field(name).type
    return typ


def _column(table: pa.Table, path: str) -> pa.ChunkedArray | pa.Array:
    """The values at a dotted path as strings; nulls where this manifest lacks the field."""
    if _field(table.schema, path) is None:
        return pa.nulls(table.num_rows, pa.string())
    top, *rest = path.split(".")
    values = pc.struct_field(table[top], rest) if rest else table[top]
    return pc.cast(values, pa.string())


def _counts(con: duckdb.DuckDBPyConnection, view: str, dimension: str) -> dict[str | None, int]:
    return dict(con.execute(f"SELECT {DIMENSIONS[dimension]} AS value, count(*) FROM {view} GROUP BY value").fetchall())


def _scores(table: pa.Table) -> dict[str, ScoreStats]:
    """Statistics of every numeric judge-check score by check name, and of the raw VoG score. Plain Arrow
    compute: flattening the checks lists is several times faster than a DuckDB UNNEST over a million rows."""
    out = {}
    checks = _field(table.schema, "provenance.judge.checks")
    if checks is not None and pa.types.is_list(checks) and {"name", "score"} <= set(checks.value_type.names):
        flat = pc.list_flatten(pc.struct_field(table["provenance"], ["judge", "checks"]))
        names, scores = pc.struct_field(flat, "name"), pc.cast(pc.struct_field(flat, "score"), pa.float64())
        scored = pc.and_(pc.is_valid(names), pc.is_finite(scores))  # null where the score is null: filtered out
        names, scores = names.filter(scored), scores.filter(scored)
        for name in pc.unique(names).to_pylist():
            out[name] = ScoreStats.of(scores.filter(pc.equal(names, name)).to_numpy())
    if _field(table.schema, "provenance.vog.score") is not None:
        vog = pc.cast(pc.struct_field(table["provenance"], ["vog", "score"]), pa.float64())
        vog = vog.filter(pc.is_finite(vog))
        if len(vog):
            out[VOG] = ScoreStats.of(vog.to_numpy())
    return out


def _score_shifts(old: dict[str, ScoreStats], new: dict[str, ScoreStats]) -> dict[str, ScoreShift]:
    # Judge checks by name, VoG last.
    names = sorted(old.keys() | new.keys(), key=lambda name: (name == VOG, name))
    return {name: ScoreShift(old.get(name), new.get(name)) for name in names}


def _why(diff: VersionDiff) -> str:
    """What in the diff calls for its bump: '3 samples were removed and 1 moved between splits'."""
    if diff.bump == "major":
        parts = [(len(diff.removed), "removed"), (len(diff.changed), "changed"), (len(diff.moved), "moved between splits")]
    else:
        parts = [(len(diff.added), "added")]
    (n, what), *rest = [(n, what) for n, what in parts if n]
    phrases = [f"{n} sample was {what}" if n == 1 else f"{n} samples were {what}", *(f"{n} {what}" for n, what in rest)]
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def _examples(ids: list[str]) -> str:
    shown = ", ".join(ids[:EXAMPLES])
    return f"{shown}, … (+{len(ids) - EXAMPLES})" if len(ids) > EXAMPLES else shown


def _change(old: float | int | None, new: float | int | None, stat: str) -> str:
    """'0.71 → 0.74 (+0.03)'; a side without scores shows as '–'."""
    fmt = "{:d}" if stat == "n" else "{:.3g}"
    shown = f"{'–' if old is None else fmt.format(old)} → {'–' if new is None else fmt.format(new)}"
    if old is None or new is None:
        return shown
    return f"{shown} ({new - old:+d})" if stat == "n" else f"{shown} ({new - old:+.3g})"
