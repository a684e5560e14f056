"""tag: difficulty easy / medium / hard / adversarial from explainable features; the rule that fired is kept.

Rules, first match wins:
  adversarial  the sample was made by an adversarial method (injection, manipulation, format breaking)
  hard         constraints >= hard_min_constraints, or words >= hard_min_words
  medium       an ambiguity marker occurs, or constraints >= medium_min_constraints, or words >= medium_min_words
  easy         otherwise
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from synthforge.provenance import canonical_json
from synthforge.stagedir import Row, StageBase, StageInput, run_stage

DEFAULT_AMBIGUITY_MARKERS = ["maybe", "i think", "not sure", "either", "or so", "around", "approximately", "?"]


class TagStage(StageBase):
    def __init__(self, section: dict[str, Any]):
        super().__init__(name="tag")
        self.field = section["field"]
        self.constraints_field = section.get("constraints_field", "constraints")
        self.hard_constraints = section.get("hard_min_constraints", 3)
        self.medium_constraints = section.get("medium_min_constraints", 2)
        self.hard_words = section.get("hard_min_words", 150)
        self.medium_words = section.get("medium_min_words", 80)
        markers = section.get("ambiguity_markers", DEFAULT_AMBIGUITY_MARKERS)
        self.markers = [
            (m, re.compile(r"(?<!\w)" + re.escape(m) + r"(?!\w)" if m[-1].isalnum() else re.escape(m), re.I)) for m in markers
        ]
        self._metrics = {"difficulty": {d: 0 for d in ("easy", "medium", "hard", "adversarial")}}

    def features(self, row: Row) -> dict[str, Any]:
        text = str(row.get(self.field) or "")
        constraints = row.get(self.constraints_field) or []
        return {
            "words": len(text.split()),
            "constraints": len(constraints),
            "ambiguity_markers": [m for m, rx in self.markers if rx.search(text)],
            "method": row["provenance"]["generation"]["method"],
        }

    def classify(self, f: dict[str, Any]) -> tuple[str, str]:
        if f["method"] == "adversarial":
            return "adversarial", "method=adversarial"
        if f["constraints"] >= self.hard_constraints:
            return "hard", f"constraints={f['constraints']}>={self.hard_constraints}"
        if f["words"] >= self.hard_words:
            return "hard", f"words={f['words']}>={self.hard_words}"
        if f["ambiguity_markers"]:
            return "medium", f"ambiguity_marker={f['ambiguity_markers'][0]!r}"
        if f["constraints"] >= self.medium_constraints:
            return "medium", f"constraints={f['constraints']}>={self.medium_constraints}"
        if f["words"] >= self.medium_words:
            return "medium", f"words={f['words']}>={self.medium_words}"
        return "easy", "no hardness feature"

    def apply(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        for row in rows:
            f = self.features(row)
            level, rule = self.classify(f)
            prov = row["provenance"]
            prov["difficulty"], prov["difficulty_rule"], prov["difficulty_features"] = level, rule, canonical_json(f)
            label = row.get("label")
            extra = [f"difficulty:{level}", f"method:{f['method']}"] + ([f"label:{label}"] if label else [])
            prov["tags"] = sorted(set(prov.get("tags") or []) | set(extra))
            self._metrics["difficulty"][level] += 1
        return rows, []


def run_tag(params: dict[str, Any], src: str | Path, out: str | Path) -> dict:
    return run_stage(TagStage(params["tag"]), StageInput.open(src), out, {"tag": params["tag"]})
