"""tag: difficulty easy / medium / hard / adversarial; the rule that fired and its features are kept.

Text (TagStage), from explainable features; images (ImageTagStage), from the reference classifier.

Rules, first match wins:
  adversarial  the sample was made by an adversarial method (injection, manipulation, format breaking)
  (rated)      a judge rated the sample's difficulty (a reviewer's rating before an LLM judge's)
  hard         constraints >= hard_min_constraints, or words >= hard_min_words
  medium       an ambiguity marker occurs, or constraints >= medium_min_constraints, or words >= medium_min_words
  easy         otherwise
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from synthforge.engine import StageBase, engine_args, run_stage
from synthforge.errors import BadInput
from synthforge.provenance import canonical_json
from synthforge.stagedir import Row, StageInput

DEFAULT_AMBIGUITY_MARKERS = ["maybe", "i think", "not sure", "either", "or so", "around", "approximately", "?"]


def judge_rating(row: Row) -> dict[str, str] | None:
    """The difficulty a judge gave the sample: a reviewer's (check `review`) before any model's; None if unrated."""
    checks = [c for c in ((row["provenance"].get("judge") or {}).get("checks") or []) if c.get("difficulty")]
    if not checks:
        return None
    best = next((c for c in checks if c["name"] == "review"), checks[0])
    return {"check": best["name"], "judged_by": best.get("judged_by") or "rule", "difficulty": best["difficulty"]}


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
            "judge_rating": judge_rating(row),
        }

    def classify(self, f: dict[str, Any]) -> tuple[str, str]:
        if f["method"] == "adversarial":
            return "adversarial", "method=adversarial"
        if f["judge_rating"]:
            rating = f["judge_rating"]
            return rating["difficulty"], f"judge {rating['check']} ({rating['judged_by']}) rated {rating['difficulty']}"
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

    def apply(self, rows: list[Row], decisions=None) -> tuple[list[Row], list[Row]]:
        for row in rows:
            f = self.features(row)
            level, rule = self.classify(f)
            prov = row["provenance"]
            prov["difficulty"], prov["difficulty_rule"], prov["difficulty_features"] = level, rule, canonical_json(f)
            label = row.get("label")
            extra = [f"difficulty:{level}", f"method:{f['method']}"] + ([f"label:{label}"] if label else [])
            prov["tags"] = sorted(set(prov.get("tags") or []) | set(extra))
        return rows, []

    def tally(self, kept: list[Row], rejected: list[Row]) -> None:
        for row in kept:
            self._metrics["difficulty"][row["provenance"]["difficulty"]] += 1


class ImageTagStage(StageBase):
    """Difficulty of an image from the reference classifier's marginal score p(label | image).

    Rules, first match wins:
      adversarial  the classifier predicts another class with probability >= adversarial_min_confidence
      easy         marginal score >= easy_min_score
      medium       marginal score >= medium_min_score
      hard         otherwise
    """

    uses_model = True

    def __init__(self, section: dict[str, Any], params_file: str = "params.yaml"):
        from synthforge.vision.classifier import load_classifier

        super().__init__(name="tag")
        self.classifier = load_classifier(section["classifier"])
        self.easy = float(section.get("easy_min_score", 0.9))
        self.medium = float(section.get("medium_min_score", 0.5))
        self.adversarial = float(section.get("adversarial_min_confidence", 0.8))
        if not 0 <= self.medium <= self.easy <= 1:
            raise BadInput(
                f"{params_file}: tag: need 0 <= medium_min_score <= easy_min_score <= 1, got {self.medium}, {self.easy}"
            )
        self._metrics = {"difficulty": {d: 0 for d in ("easy", "medium", "hard", "adversarial")}, "recognised": 0, "tagged": 0}

    def metrics(self) -> dict[str, Any]:
        m = dict(self._metrics)
        # How often the reference classifier reads a synthetic image as the class it was generated for.
        m["recognised_fraction"] = round(m["recognised"] / m["tagged"], 4) if m["tagged"] else None
        return m

    def classify(self, score: float, predicted: str, confidence: float, label: str) -> tuple[str, str]:
        if predicted != label and confidence >= self.adversarial:
            return "adversarial", f"predicted {predicted} with p={confidence:.2f}>={self.adversarial}"
        if score >= self.easy:
            return "easy", f"marginal_score={score:.2f}>={self.easy}"
        if score >= self.medium:
            return "medium", f"marginal_score={score:.2f}>={self.medium}"
        return "hard", f"marginal_score={score:.2f}<{self.medium}"

    def levels(self, probabilities, labels) -> list[str]:
        """The difficulty of each image given the classifier's probabilities (N x K) and the true labels, with the
        scores rounded as `apply` records and classifies them: the levels the tag stage would give."""
        names = self.classifier.class_names
        levels = []
        for p, y in zip(probabilities, labels, strict=True):
            top = int(p.argmax())
            levels.append(self.classify(round(float(p[y]), 6), names[top], round(float(p[top]), 6), names[int(y)])[0])
        return levels

    def apply(self, rows: list[Row], decisions=None) -> tuple[list[Row], list[Row]]:
        probs = self.classifier.probabilities([r["image"] for r in rows])
        names = self.classifier.class_names
        for row, p in zip(rows, probs, strict=True):
            if not 0 <= row["label"] < len(names):
                raise BadInput(
                    f"sample {row['sample_id']}: label {row['label']} is not one of the classifier's {len(names)} classes"
                )
            top = int(p.argmax())
            label_name = names[row["label"]]
            f = {
                "marginal_score": round(float(p[row["label"]]), 6),
                "predicted": names[top],
                "predicted_probability": round(float(p[top]), 6),
                "classifier": str(self.classifier.path),
            }
            level, rule = self.classify(f["marginal_score"], f["predicted"], f["predicted_probability"], label_name)
            prov = row["provenance"]
            prov["difficulty"], prov["difficulty_rule"], prov["difficulty_features"] = level, rule, canonical_json(f)
            extra = [f"difficulty:{level}", f"method:{prov['generation']['method']}", f"label:{label_name}"]
            prov["tags"] = sorted(set(prov.get("tags") or []) | set(extra))
        return rows, []

    def tally(self, kept: list[Row], rejected: list[Row]) -> None:
        for row in kept:
            prov = row["provenance"]
            self._metrics["difficulty"][prov["difficulty"]] += 1
            self._metrics["recognised"] += (
                json.loads(prov["difficulty_features"])["predicted"] == self.classifier.class_names[row["label"]]
            )
            self._metrics["tagged"] += 1


def run_tag(params: dict[str, Any], src: str | Path, out: str | Path) -> dict:
    section = params["tag"]
    if "classifier" in section:
        from synthforge.vision.classifier import classifier_digest

        params_file = params.get("__file__", "params.yaml")
        stage = ImageTagStage(section, params_file).rebuilt_by(ImageTagStage, section, params_file)
        return run_stage(
            stage,
            StageInput.open(src),
            out,
            {"tag": section},
            extra_inputs={"classifier": classifier_digest(section["classifier"])},
            **engine_args(params),
        )
    return run_stage(TagStage(section), StageInput.open(src), out, {"tag": section}, **engine_args(params))
