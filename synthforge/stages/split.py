"""split: deterministic, grouped by source or parent (no group lands in two splits), stratified by difficulty or label.

Groups are ordered by a seeded hash and, stratum by stratum, each group goes to the split furthest below its
target share. A leakage check then fails loudly if a source or a (normalised) text sits in two splits.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from synthforge.errors import LeakageError
from synthforge.minhash import exact_hash, joined_text
from synthforge.stagedir import Row, StageBase, StageInput, run_stage


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


def check_leakage(items: Iterable[tuple[str, str, str, str]]) -> None:
    """items: (sample_id, split, group, text_hash). Raise LeakageError naming examples of any overlap."""
    seen_group: dict[str, tuple[str, str]] = {}
    seen_text: dict[str, tuple[str, str]] = {}
    problems = []
    for sid, split, group, text in items:
        for seen, key, what in ((seen_group, group, "source"), (seen_text, text, "text")):
            other = seen.setdefault(key, (split, sid))
            if other[0] != split:
                problems.append(f"same {what} in {other[0]} ({other[1]}) and {split} ({sid})")
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise LeakageError(f"split leakage: {'; '.join(problems[:5])}{more}")


class SplitStage(StageBase):
    def __init__(self, section: dict[str, Any], seed: int, fields: list[str]):
        super().__init__(name="split", needs_reduce=True)
        ratios = section["ratios"]
        total = sum(ratios.values())
        self.ratios = {k: v / total for k, v in ratios.items()}
        self.group_by = section.get("group_by", "source")
        self.stratify_by = section.get("stratify_by", "difficulty")
        self.leakage_fields = fields
        self.seed = seed
        self._samples: list[tuple[str, str, str, str]] = []  # sample_id, group, stratum, text hash

    def _stratum(self, row: Row) -> str:
        if self.stratify_by == "difficulty":
            return str(row["provenance"]["difficulty"])
        if self.stratify_by == "label":
            return str(row.get("label"))
        return "all"

    def observe(self, rows: list[Row]) -> None:
        for row in rows:
            self._samples.append(
                (row["sample_id"], group_key(row, self.group_by), self._stratum(row), text_key(row, self.leakage_fields))
            )

    def finalize(self) -> None:
        members: dict[str, list[int]] = defaultdict(list)
        for i, (_, group, _, _) in enumerate(self._samples):
            members[group].append(i)
        by_stratum: dict[str, list[str]] = defaultdict(list)
        for group, idx in members.items():
            counts = Counter(self._samples[i][2] for i in idx)
            stratum = min(counts, key=lambda s: (-counts[s], s))  # the group's most common stratum
            by_stratum[stratum].append(group)
        split_of_group: dict[str, str] = {}
        for stratum in sorted(by_stratum):
            groups = sorted(by_stratum[stratum], key=lambda g: hashlib.sha256(f"{self.seed}:{g}".encode()).hexdigest())
            size = sum(len(members[g]) for g in groups)
            assigned = dict.fromkeys(self.ratios, 0)
            for g in groups:
                split = max(self.ratios, key=lambda s: self.ratios[s] * size - assigned[s])
                split_of_group[g] = split
                assigned[split] += len(members[g])
        self.split_of = {sid: split_of_group[group] for sid, group, _, _ in self._samples}
        check_leakage((sid, self.split_of[sid], group, text) for sid, group, _, text in self._samples)
        counts = Counter(self.split_of.values())
        self._metrics = {
            "splits": {s: counts.get(s, 0) for s in self.ratios},
            "groups": len(members),
            "group_by": self.group_by,
            "stratify_by": self.stratify_by,
            "leakage_check": "passed",
        }

    def apply(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        for row in rows:
            row["provenance"]["split"] = self.split_of[row["sample_id"]]
        return rows, []


def run_split(params: dict[str, Any], src: str | Path, out: str | Path) -> dict:
    stage = SplitStage(params["split"], int(params["seed"]), leakage_fields(params))
    return run_stage(stage, StageInput.open(src), out, {"split": params["split"], "seed": params["seed"]})
