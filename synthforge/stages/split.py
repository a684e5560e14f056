"""split: deterministic, grouped by source or parent (no group lands in two splits), stratified by difficulty or label.

Groups are ordered by a seeded hash and, stratum by stratum, each group goes to the split furthest below its
target share. A leakage check then fails loudly if a source or a (normalised) text sits in two splits.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from synthforge.engine import ORDINAL, Engine, Frame, StageBase, engine_args, run_stage
from synthforge.errors import LeakageError
from synthforge.minhash import exact_hash, joined_text
from synthforge.stagedir import Row, StageInput


def group_key(row: Row, group_by: str) -> str:
    """source: the source record; parent: the real seed or parent sample (all children of one image together)."""
    prov = row["provenance"]
    if group_by == "sample":
        return row["sample_id"]
    if group_by == "parent" and prov["generation"]["parent_ids"]:
        return "parent:" + ",".join(sorted(prov["generation"]["parent_ids"]))
    src = prov["source"]
    return f"{src['uri']}#{src['record_id'] if src['record_id'] is not None else src['row']}"


def leakage_fields(params: dict[str, Any]) -> list[str] | None:
    """The fields that must not repeat across splits: split.leakage_fields, else what dedup compares."""
    dedup = params.get("dedup") or {}
    return (params.get("split") or {}).get("leakage_fields") or dedup.get("fields") or (["image"] if "image" in dedup else None)


def text_key(row: Row, fields: list[str]) -> str:
    """The content that must not repeat across splits: normalised text, or the exact bytes of binary fields."""
    binary = [f for f in fields if isinstance(row.get(f), bytes)]
    if binary:
        return hashlib.sha256(
            b"".join(row[f] for f in binary) + joined_text(row, [f for f in fields if f not in binary]).encode()
        ).hexdigest()[:32]
    return exact_hash(joined_text(row, fields))


def overlaps(items: Iterable[tuple[str, str, str]], what: str) -> Iterator[tuple[int, str]]:
    """items: (sample_id, split, key), in input order. (position, description) of every sample whose key
    already sits in another split."""
    seen: dict[str, tuple[str, str]] = {}
    for i, (sid, split, key) in enumerate(items):
        other = seen.setdefault(key, (split, sid))
        if other[0] != split:
            yield i, f"same {what} in {other[0]} ({other[1]}) and {split} ({sid})"


def leakage_problems(items: Iterable[tuple[str, str, str, str]]) -> list[str]:
    """items: (sample_id, split, group, text_hash), in input order. A description of every overlap."""
    items = list(items)
    by_group = overlaps(((sid, split, group) for sid, split, group, _ in items), "source")
    by_text = overlaps(((sid, split, text) for sid, split, _, text in items), "text")
    # Sample by sample, its source problem before its text problem (a stable sort keeps the order of the chain).
    return [problem for _, problem in sorted(itertools.chain(by_group, by_text), key=lambda found: found[0])]


def check_leakage(items: Iterable[tuple[str, str, str, str]]) -> None:
    """Raise LeakageError naming examples of any overlap."""
    raise_leakage(leakage_problems(items))


def raise_leakage(problems: list[str]) -> None:
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise LeakageError(f"split leakage: {'; '.join(problems[:5])}{more}")


ASSIGNMENT = pa.schema([("group", pa.string()), ("split", pa.string())])
OVERLAPS = pa.schema([(ORDINAL, pa.int64()), ("problem", pa.string())])


def _by_ordinal(table: pa.Table) -> pa.Table:
    return table.sort_by(ORDINAL)


def group_strata(table: pa.Table) -> pa.Table:
    """Per group (whole groups in `table`): its size and its most common stratum (ties by name)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for group, stratum in zip(table.column("group").to_pylist(), table.column("stratum").to_pylist(), strict=True):
        counts[group][stratum] += 1
    groups = sorted(counts)
    return pa.table(
        {
            "group": groups,
            "size": [sum(counts[g].values()) for g in groups],
            "stratum": [min(counts[g], key=lambda s, c=counts[g]: (-c[s], s)) for g in groups],
        }
    )


def assign_groups(table: pa.Table, ratios: dict[str, float], seed: int) -> pa.Table:
    """Per stratum (whole strata in `table`): groups in seeded-hash order, each to the split furthest below its share."""
    by_stratum: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for group, size, stratum in zip(*(table.column(c).to_pylist() for c in ("group", "size", "stratum")), strict=True):
        by_stratum[stratum].append((group, size))
    out_groups, out_splits = [], []
    for stratum in sorted(by_stratum):
        groups = sorted(by_stratum[stratum], key=lambda gs: hashlib.sha256(f"{seed}:{gs[0]}".encode()).hexdigest())
        total = sum(size for _, size in groups)
        assigned = dict.fromkeys(ratios, 0)
        for group, size in groups:
            split = max(ratios, key=lambda s: ratios[s] * total - assigned[s])
            out_groups.append(group)
            out_splits.append(split)
            assigned[split] += size
    return pa.table({"group": pa.array(out_groups, pa.string()), "split": pa.array(out_splits, pa.string())}, schema=ASSIGNMENT)


def text_overlaps(table: pa.Table) -> pa.Table:
    """Per text (whole texts in `table`): the samples whose text sits in another split, with the problem."""
    table = _by_ordinal(table)
    items = zip(*(table.column(c).to_pylist() for c in ("sample_id", "split", "text")), strict=True)
    found = list(overlaps(items, "text"))
    ordinals = table.column(ORDINAL).to_numpy()[[i for i, _ in found]] if found else []
    problems = [problem for _, problem in found]
    return pa.table({ORDINAL: pa.array(ordinals, pa.int64()), "problem": pa.array(problems, pa.string())}, schema=OVERLAPS)


class SplitStage(StageBase):
    needs_reduce = True

    def __init__(self, section: dict[str, Any], seed: int, fields: list[str]):
        super().__init__(name="split")
        ratios = section["ratios"]
        total = sum(ratios.values())
        self.ratios = {k: v / total for k, v in ratios.items()}
        self.group_by = section.get("group_by", "source")
        self.stratify_by = section.get("stratify_by", "difficulty")
        self.leakage_fields = fields
        self.seed = seed

    def _stratum(self, row: Row) -> str:
        if self.stratify_by == "difficulty":
            return str(row["provenance"]["difficulty"])
        if self.stratify_by == "label":
            return str(row.get("label"))
        return "all"

    def summarize(self, rows: list[Row]) -> pa.Table:
        return pa.table(
            {
                "sample_id": [r["sample_id"] for r in rows],
                "group": [group_key(r, self.group_by) for r in rows],
                "stratum": [self._stratum(r) for r in rows],
                "text": [text_key(r, self.leakage_fields) for r in rows],
            },
            schema=pa.schema([(c, pa.string()) for c in ("sample_id", "group", "stratum", "text")]),
        )

    def reduce(self, engine: Engine, summaries: Frame, total: int) -> pa.Table | None:
        if summaries is None:
            self._metrics = self._summary_metrics({}, 0)
            return pa.table({"split": pa.array([], pa.string())})
        groups = engine.reduce_by_key(summaries, "group", group_strata)
        assign = functools.partial(assign_groups, ratios=self.ratios, seed=self.seed)
        assignment = engine.collect(engine.reduce_by_key(groups, "stratum", assign), ASSIGNMENT)
        split_of = dict(zip(assignment.column("group").to_pylist(), assignment.column("split").to_pylist(), strict=True))

        def with_split(t: pa.Table) -> pa.Table:
            return t.append_column("split", pa.array([split_of[g] for g in t.column("group").to_pylist()], pa.string()))

        assigned = engine.map(summaries, with_split)
        overlaps = _by_ordinal(engine.collect(engine.reduce_by_key(assigned, "text", text_overlaps), OVERLAPS))
        raise_leakage(overlaps.column("problem").to_pylist())
        decisions = _by_ordinal(engine.collect(engine.map(assigned, lambda t: t.select([ORDINAL, "split"]))))
        self._metrics = self._summary_metrics(Counter(decisions.column("split").to_pylist()), assignment.num_rows)
        return decisions

    def _summary_metrics(self, counts: Counter, groups: int) -> dict[str, Any]:
        return {
            "splits": {s: counts.get(s, 0) for s in self.ratios},
            "groups": groups,
            "group_by": self.group_by,
            "stratify_by": self.stratify_by,
            "leakage_check": "passed",
        }

    def apply(self, rows: list[Row], decisions: pa.Table) -> tuple[list[Row], list[Row]]:
        for row, split in zip(rows, decisions.column("split").to_pylist(), strict=True):
            row["provenance"]["split"] = split
        return rows, []


def run_split(params: dict[str, Any], src: str | Path, out: str | Path) -> dict:
    stage = SplitStage(params["split"], int(params["seed"]), leakage_fields(params))
    fingerprint = {"split": params["split"], "seed": params["seed"]}
    return run_stage(stage, StageInput.open(src), out, fingerprint, **engine_args(params))
