"""safety: keep unwanted content out of the set, by pattern lists per category and an optional classifier.

Patterns are regular expressions (case-insensitive) grouped by category, e.g. `pii`, `violence`, `injection`.
Adversarial samples carry attack text on purpose, so `exempt_methods` names the generation methods whose samples
skip the pattern lists (`[adversarial]`), or maps a method to the only categories it skips
(`{adversarial: [injection]}`), so that its samples are still checked for, say, leaked credentials. The
classifier still judges every sample: it looks for harmful content, and an injection test needs the injection,
not that.

The classifier is any transformers sequence-classification model (local path or hub id); a field is flagged
when the probability of one of `unsafe_labels` reaches `threshold`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from synthforge.errors import BadInput
from synthforge.params import compile_patterns
from synthforge.stagedir import Row


@dataclass
class SafetyOptions:
    fields: list[str]
    categories: dict[str, list[str]] = field(default_factory=dict)  # category -> regular expressions
    # generation methods whose samples skip every pattern category, or method -> the categories it skips
    exempt_methods: list[str] | dict[str, list[str]] = field(default_factory=list)
    classifier: str | None = None
    unsafe_labels: list[str] = field(default_factory=lambda: ["unsafe"])
    threshold: float = 0.5
    batch_size: int = 32
    device: str | None = None


class SafetyCheck:
    name = "safety"
    Options = SafetyOptions

    def __init__(self, options: SafetyOptions, where: str, params_file: str):
        self.o = options
        self.patterns: list[tuple[str, re.Pattern]] = []
        for category, patterns in options.categories.items():
            if not isinstance(patterns, list):
                raise BadInput(f"{params_file}: {where}.categories.{category}: expected a list of regular expressions")
            compiled = compile_patterns(patterns, f"{params_file}: {where}.categories.{category}")
            self.patterns += [(category, pattern) for pattern in compiled]
        exempt = options.exempt_methods
        if isinstance(exempt, list):
            exempt = {method: list(options.categories) for method in exempt}
        for method, categories in exempt.items():
            if not isinstance(categories, list):
                raise BadInput(
                    f"{params_file}: {where}.exempt_methods.{method}: expected a list of categories, got {categories!r}"
                )
            for j, category in enumerate(categories):
                if category not in options.categories:
                    raise BadInput(
                        f"{params_file}: {where}.exempt_methods.{method}[{j}]: unknown category {category!r} "
                        f"(categories: {', '.join(options.categories) or 'none'})"
                    )
        self.exempt = {method: set(categories) for method, categories in exempt.items()}
        if not self.patterns and options.classifier is None:
            raise BadInput(f"{params_file}: {where}: nothing to check: give `categories` of patterns, a `classifier`, or both")
        self.classifier = _Classifier(options, where, params_file) if options.classifier else None
        self.where, self.columns = where, list(options.fields)

    @property
    def inputs(self) -> dict[str, str]:
        return {f"classifier:{self.where}": self.classifier.identity} if self.classifier else {}

    def check_batch(self, rows: list[Row]) -> list[dict]:
        from synthforge.stages.judge import result  # judge.py imports this module to register the check

        out: list[dict | None] = [self._match(row) for row in rows]
        if self.classifier is None:
            return [r or result(self.name, True) for r in out]
        todo = [(i, key, text) for i, row in enumerate(rows) if out[i] is None for key, text in self._texts(row)]
        scores = self.classifier.scores([text for _, _, text in todo])
        per_row: dict[int, dict[str, tuple[str, float]]] = {}
        for (i, key, _), score in zip(todo, scores, strict=True):
            per_row.setdefault(i, {})[key] = score
        for i in range(len(rows)):
            if out[i] is None:
                out[i] = self._classified(per_row.get(i, {}))
        return out

    def _texts(self, row: Row) -> list[tuple[str, str]]:
        texts = []
        for key in self.o.fields:
            value = row.get(key)
            if value is not None and not isinstance(value, str):
                value = json.dumps(value, ensure_ascii=False)  # constraints and other list fields
            if value:
                texts.append((key, value))
        return texts

    def _match(self, row: Row) -> dict | None:
        """A failing result for the first pattern that matches, or None."""
        from synthforge.stages.judge import result

        exempt = self.exempt.get(row["provenance"]["generation"]["method"], set())
        for key, text in self._texts(row):
            for category, pattern in self.patterns:
                if category in exempt:
                    continue
                m = pattern.search(text)
                if m:
                    context = text[max(0, m.start() - 30) : m.end() + 30].replace("\n", " ")
                    return result(
                        self.name,
                        False,
                        f"{category}: {key} contains {m.group(0)!r} (pattern {pattern.pattern!r}) in “…{context}…”",
                        raw=json.dumps({"category": category, "field": key, "match": m.group(0), "start": m.start()}),
                    )
        return None

    def _classified(self, scores: dict[str, tuple[str, float]]) -> dict:
        from synthforge.stages.judge import result

        raw = json.dumps({key: {"label": label, "probability": round(p, 4)} for key, (label, p) in scores.items()})
        worst = max(scores.items(), key=lambda kv: kv[1][1], default=None)
        top = worst[1][1] if worst else 0.0
        if worst and top >= self.o.threshold:
            key, (label, p) = worst
            reason = f"classifier: {key} is {label!r} with probability {p:.3f} (threshold {self.o.threshold})"
            return result(self.name, False, reason, score=round(p, 4), raw=raw, judged_by=self.classifier.identity)
        return result(self.name, True, score=round(top, 4), raw=raw, judged_by=self.classifier.identity)


class _Classifier:
    """A transformers text classifier; `scores` gives each text's most probable unsafe label and its probability."""

    def __init__(self, o: SafetyOptions, where: str, params_file: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from synthforge.llm.models import hub_revision, pick_device, resolve_model

        param = f"{params_file}: {where}.classifier"
        source, revision = resolve_model(o.classifier, param)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, revision=hub_revision(source, revision))
            model = AutoModelForSequenceClassification.from_pretrained(source, revision=hub_revision(source, revision))
        except (OSError, ValueError) as exc:
            raise BadInput(f"{param}: {o.classifier}: cannot load a text classifier: {exc}") from None
        labels = {str(name): int(i) for i, name in model.config.id2label.items()}
        missing = [label for label in o.unsafe_labels if label not in labels]
        if missing:
            raise BadInput(f"{params_file}: {where}.unsafe_labels: {missing} not among the classifier's labels {sorted(labels)}")
        if o.batch_size < 1:
            raise BadInput(f"{params_file}: {where}.batch_size: must be >= 1, got {o.batch_size}")
        self.unsafe = [(label, labels[label]) for label in o.unsafe_labels]
        self.device = pick_device(o.device)
        self.model = model.to(self.device).eval()
        self.batch_size = o.batch_size
        self.identity = f"{o.classifier}@{revision}"
        positions = getattr(model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.max_length = min(self.tokenizer.model_max_length, positions)

    def scores(self, texts: list[str]) -> list[tuple[str, float]]:
        import torch

        multi_label = self.model.config.problem_type == "multi_label_classification"
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits.float()
            probs = (logits.sigmoid() if multi_label else logits.softmax(-1)).cpu()
            for row in probs:
                out.append(max(((label, float(row[i])) for label, i in self.unsafe), key=lambda lp: lp[1]))
        return out
