"""faithfulness: a source-grounded sample's answer says what its source passage says.

Two tests, both must pass:
  similarity     the highest cosine similarity of the answer's sentence embedding with the passage or any of its
                 sentences (an answer usually restates one sentence; a drifted answer is about something else);
  token support  the fraction of the answer's content words (lowercase, no English stopwords, numbers kept) that
                 occur in the passage, word for word: a changed number or an invented name is unsupported.
Embeddings cannot tell "30 days" from "90 days"; token support can, and similarity catches answers that reuse
the passage's words to say something else. The embedding of a few words says little ("To the original payment
method." is as far from its passage as an answer about Paris), so answers shorter than `similarity_min_words`
content words are judged by token support alone. Samples without a source passage are not judged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from synthforge.errors import BadInput
from synthforge.stagedir import Row
from synthforge.text.embeddings import sentences

_WORD = re.compile(r"\d+(?:[.,:/-]\d+)*|[^\W\d_]+")


@dataclass
class FaithfulnessOptions:
    answer_field: str = "reference"  # plain text, or a JSON object whose `answer` is checked
    context_field: str = "context"  # the source passage
    min_similarity: float = 0.4
    min_token_support: float = 0.6
    similarity_min_words: int = 4  # shorter answers skip the similarity test
    model: str | None = None  # sentence-transformers model; None = the bundled all-MiniLM-L6-v2
    batch_size: int = 64


def content_words(text: str) -> list[str]:
    """Distinct lowercase words that carry meaning, in order: stopwords and one-letter words dropped, numbers kept."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    words = [w for w in _WORD.findall(text.lower()) if w[0].isdigit() or (len(w) > 1 and w not in ENGLISH_STOP_WORDS)]
    return list(dict.fromkeys(words))


def answer_text(value) -> str:
    """The answer to check: a JSON object's `answer` (how source-grounded references are stored), else the text."""
    text = "" if value is None else str(value)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()
    if isinstance(parsed, dict) and "answer" in parsed:
        return str(parsed["answer"] or "").strip()
    return text.strip()


class FaithfulnessCheck:
    name = "faithfulness"
    Options = FaithfulnessOptions

    def __init__(self, options: FaithfulnessOptions, where: str, params_file: str):
        from synthforge.text.embeddings import shared_encoder

        for key in ("min_similarity", "min_token_support"):
            if not -1 <= getattr(options, key) <= 1:
                raise BadInput(f"{params_file}: {where}.{key}: must be within [-1, 1], got {getattr(options, key)}")
        if options.batch_size < 1:
            raise BadInput(f"{params_file}: {where}.batch_size: must be >= 1, got {options.batch_size}")
        self.o = options
        try:
            self.encoder = shared_encoder(options.model, None, options.batch_size)
        except BadInput as exc:  # the encoder names its parameter `model`; say where in params.yaml it is
            raise BadInput(f"{params_file}: {where}.{exc}") from None
        self.where = where

    @property
    def inputs(self) -> dict[str, str]:
        return {f"encoder:{self.where}": self.encoder.identity}

    @property
    def columns(self) -> list[str]:
        return [self.o.answer_field, self.o.context_field]

    def check_batch(self, rows: list[Row]) -> list[dict | None]:
        from synthforge.stages.judge import result  # judge.py imports this module to register the check

        grounded = [i for i, row in enumerate(rows) if str(row.get(self.o.context_field) or "").strip()]
        answers = {i: answer_text(rows[i].get(self.o.answer_field)) for i in grounded}
        # One encoder call for every answer, passage and passage sentence in the batch.
        texts, spans = [], {}
        for i in grounded:
            if not answers[i]:
                continue
            passage = str(rows[i][self.o.context_field]).strip()
            pieces = [passage, *sentences(passage, min_words=1)]
            spans[i] = (len(texts), len(pieces))
            texts += [answers[i], *pieces]
        vectors = self.encoder.encode(texts)
        out: list[dict | None] = [None] * len(rows)
        for i in grounded:
            if not answers[i]:
                out[i] = result(self.name, False, f"{self.o.answer_field} has no answer to check", parsed=False)
                continue
            start, n = spans[i]
            similarity = float((vectors[start + 1 : start + 1 + n] @ vectors[start]).max())
            out[i] = self._verdict(answers[i], str(rows[i][self.o.context_field]), similarity)
        return out

    def _verdict(self, answer: str, passage: str, similarity: float) -> dict:
        from synthforge.stages.judge import result

        words = content_words(answer)
        in_passage = set(_WORD.findall(passage.lower()))
        unsupported = [w for w in words if w not in in_passage]
        # An answer of stopwords only ("yes", "no") has no word to look up, and too few for similarity either.
        support = 1 - len(unsupported) / len(words) if words else 1.0
        raw = json.dumps({"similarity": round(similarity, 4), "token_support": round(support, 4), "unsupported": unsupported})
        figures = f"similarity {similarity:.3f} (min {self.o.min_similarity}), "
        figures += f"token support {support:.2f} (min {self.o.min_token_support})"
        failed = []
        if len(words) < self.o.similarity_min_words:
            figures += (
                f"; similarity not tested on {len(words)} content words (similarity_min_words {self.o.similarity_min_words})"
            )
            score = support
        else:
            score = min(similarity, support)
            if similarity < self.o.min_similarity:
                failed.append("the answer is not about the source passage")
        if support < self.o.min_token_support:
            failed.append(f"answer words not in the source passage: {', '.join(map(repr, unsupported))}")
        reason = f"{'; '.join(failed)}: {figures}" if failed else figures
        return result(self.name, not failed, reason, score=round(score, 4), raw=raw, judged_by=self.encoder.identity)
