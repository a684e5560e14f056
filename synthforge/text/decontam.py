"""Decontamination: find synthetic texts that copy an item of a protected eval/test set.

Three tests, strongest evidence first:

- exact: the normalised texts are equal (NFKC, case-folded, word tokens only, so punctuation and spacing differ
  freely);
- ngram: the texts share a run of `ngram` words (13 by default, the length the GPT-3 paper's
  decontamination used); an eval item shorter than that must appear whole, so short items are protected too;
- embedding: the cosine of the sentence embeddings reaches `embedding_threshold` (a reworded copy).

Word n-grams are hashed to 64 bits and looked up in one sorted array, a whole batch of texts at a time; the
evidence (the longest run of words shared with one eval item) is then worked out for the few texts that hit.
"""

from __future__ import annotations

import csv
import functools
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from synthforge.errors import BadInput
from synthforge.minhash import joined_text, splitmix64
from synthforge.provenance import canonical_json, sha256_hex
from synthforge.text.embeddings import sentences
from synthforge.text.semantic import nearest

if TYPE_CHECKING:
    from synthforge.text.embeddings import SentenceEncoder

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
_WORD = re.compile(r"\w+")
_OWNERS_PER_GRAM = 32  # a gram shared by more eval items is boilerplate; its first owners stand for it
_QUOTE_CHARS = 80


@dataclass(frozen=True)
class ProtectedSet:
    """The items of one protected set: ids and texts (the set's fields joined), in file order."""

    name: str
    source: str
    ids: list[str]
    texts: list[str]

    @functools.cached_property
    def digest(self) -> str:
        """Changes whenever an item's id or text does, so editing the set reruns dedup."""
        return sha256_hex(canonical_json([self.ids, self.texts]))[:32]


def load_protected_set(spec: dict[str, Any], default_fields: Sequence[str], where: str, params_file: str) -> ProtectedSet:
    """Read one `dedup.decontaminate.sets[k]` entry: a file (`path`) or an HF dataset (`hf`, `split`).

    Items are numbered as their format counts them (the default id, and what errors name): `line N` (from 1)
    in .jsonl, .txt and .csv files, `row N` (from 0) in .json, .parquet and HF datasets.
    """
    fields = spec.get("fields", list(default_fields))
    id_field = spec.get("id_field")
    if "hf" in spec:
        source = spec["hf"]
        rows = _read_hf(source, spec.get("split"), fields, id_field, f"{params_file}: {where}.hf")
    else:
        source = spec["path"]
        path = Path(source)
        if "split" in spec:
            raise BadInput(f"{params_file}: {where}.split: {path}: a split belongs to an HF dataset (`hf`), not a file")
        if path.suffix == ".txt":
            for key in ("fields", "id_field"):
                if key in spec:
                    raise BadInput(
                        f"{params_file}: {where}.{key}: {path}: a .txt set has one item per line, its line number as id"
                    )
            fields, id_field = ["text"], None
        rows = _read_file(path, f"{params_file}: {where}.path")
    ids, texts = _items(rows, fields, id_field, f"{params_file}: {where}: {source}")
    if not ids:
        raise BadInput(f"{params_file}: {where}: {source}: the protected set is empty")
    return ProtectedSet(spec["name"], source, ids, texts)


def _read_file(path: Path, where: str) -> Iterator[tuple[str, dict]]:
    """(location, row) pairs of a file, read lazily so that a broken line is reported with its number."""
    if path.suffix not in FILE_FORMATS:
        raise BadInput(f"{where}: {path}: unknown format {path.suffix!r} (known: {', '.join(FILE_FORMATS)})")
    if not path.is_file():
        raise BadInput(f"{where}: {path}: no such file")
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except pa.ArrowException as exc:
                raise BadInput(f"{where}: {path}: not a readable Parquet file: {exc}") from None
            yield from ((f"row {k}", row) for k, row in enumerate(rows))
        elif path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise BadInput(f"{where}: {path}: not valid JSON: {exc}") from None
            if not isinstance(data, list):
                raise BadInput(f"{where}: {path}: expected a JSON array of objects, got {type(data).__name__}")
            yield from ((f"row {k}", row) for k, row in enumerate(data))
        elif path.suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh)
                for row in reader:
                    yield f"line {reader.line_num}", row
        else:
            with path.open(encoding="utf-8") as fh:
                for k, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    if path.suffix == ".txt":
                        yield f"line {k}", {"text": line.rstrip("\r\n")}
                        continue
                    try:
                        yield f"line {k}", json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise BadInput(f"{where}: {path}: line {k}: not valid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{where}: {path}: cannot read: {exc}") from None


def _read_hf(ref: str, split: str | None, fields: list[str], id_field: str | None, where: str) -> Iterator[tuple[str, dict]]:
    """Rows of an HF dataset: a folder saved with `save_to_disk`, a local dataset folder or script, or a hub id
    (which `datasets` takes from its cache when there is no network; HF_HUB_OFFLINE=1 skips the attempts)."""
    import datasets

    folder = Path(ref)
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            data = datasets.load_from_disk(str(folder))
        else:
            data = datasets.load_dataset(ref, split=split)
    except Exception as exc:  # datasets raises many kinds: missing folder, unknown hub id, offline, bad files
        raise BadInput(f"{where}: {ref}: cannot load the dataset: {exc}") from None
    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) != 1:
            raise BadInput(f"{where}: {ref}: has splits {', '.join(data)}; choose one with `split`")
        if split is not None and split not in data:
            raise BadInput(f"{where}: {ref}: no split {split!r} (has: {', '.join(data)})")
        data = data[split] if split is not None else next(iter(data.values()))
    wanted = [*fields, *([id_field] if id_field else [])]
    missing = [c for c in wanted if c not in data.column_names]
    if missing:
        raise BadInput(f"{where}: {ref}: no column {missing[0]!r} (columns: {', '.join(data.column_names)})")
    yield from ((f"row {k}", row) for k, row in enumerate(data.select_columns(list(dict.fromkeys(wanted))).to_list()))


def _items(rows: Iterable[tuple[str, dict]], fields: list[str], id_field: str | None, where: str) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    first_seen: dict[str, str] = {}
    for location, row in rows:
        if not isinstance(row, dict):
            raise BadInput(f"{where}: {location}: expected an object with fields, got {type(row).__name__}")
        for f in [*fields, *([id_field] if id_field else [])]:
            if f not in row:
                raise BadInput(f"{where}: {location}: no field {f!r} (has: {', '.join(map(str, row)) or 'none'})")
        text = joined_text(row, fields)
        if not _WORD.search(text):
            raise BadInput(f"{where}: {location}: no words in {', '.join(fields)}")
        if id_field:
            if row[id_field] is None or row[id_field] == "":
                raise BadInput(f"{where}: {location}: empty id in {id_field!r}")
            item_id = str(row[id_field])
        else:
            item_id = location.split()[-1]
        if item_id in first_seen:
            raise BadInput(f"{where}: {location}: duplicate id {item_id!r} (also at {first_seen[item_id]})")
        first_seen[item_id] = location
        ids.append(item_id)
        texts.append(text)
    return ids, texts


@dataclass(frozen=True)
class Match:
    """Evidence that a synthetic text copies an eval item."""

    eval_set: str
    eval_item_id: str
    method: str  # exact | ngram | embedding
    span: str  # the shared words as they stand in the synthetic text; for an embedding match, the eval item
    similarity: float | None = None  # cosine, for an embedding match

    def quote(self) -> str:
        span = " ".join(self.span.split())
        return span if len(span) <= _QUOTE_CHARS else span[: _QUOTE_CHARS - 1] + "…"


def words(text: str) -> tuple[str, list[str], list[tuple[int, int]]]:
    """(NFKC text, its case-folded word tokens, each token's character span in the NFKC text)."""
    text = unicodedata.normalize("NFKC", text)
    found = list(_WORD.finditer(text))
    return text, [m.group().casefold() for m in found], [m.span() for m in found]


def _grams(token_ids: np.ndarray, text_of: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, hash) of every run of `width` tokens inside one text with no unknown token (id -1)."""
    if len(token_ids) < width:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint64)
    unknown = np.concatenate(([0], np.cumsum(token_ids < 0)))
    start = np.arange(len(token_ids) - width + 1)
    start = start[(text_of[start] == text_of[start + width - 1]) & (unknown[start + width] == unknown[start])]
    h = np.full(len(start), width, dtype=np.uint64)  # the width seeds the hash: grams of different lengths differ
    for k in range(width):
        h = splitmix64(h ^ token_ids[start + k].astype(np.uint64))
    return start, h


class Decontaminator:
    """An index of the protected sets' normalised texts, word n-grams and (optionally) embeddings."""

    def __init__(
        self,
        sets: Sequence[ProtectedSet],
        ngram: int = 13,
        embedding_threshold: float | None = None,
        encoder: SentenceEncoder | None = None,
    ):
        if embedding_threshold is not None and encoder is None:
            raise ValueError("an embedding threshold needs an encoder")
        self.sets, self.ngram = list(sets), ngram
        self.embedding_threshold, self.encoder = embedding_threshold, encoder
        self._owner = [(s.name, item_id) for s in self.sets for item_id in s.ids]
        self._eval_texts = [t for s in self.sets for t in s.texts]
        self._vocab: dict[str, int] = {}
        self._exact: dict[str, int] = {}
        hashes, owners = [np.empty(0, dtype=np.uint64)], [np.empty(0, dtype=np.int64)]
        self._widths = {ngram}
        for item, text in enumerate(self._eval_texts):
            tokens = words(text)[1]
            if not tokens:  # nothing to match (a loaded set has none: an item without words is an error)
                continue
            self._exact.setdefault(" ".join(tokens), item)
            ids = np.array([self._vocab.setdefault(t, len(self._vocab)) for t in tokens], dtype=np.int64)
            width = min(ngram, len(ids))
            self._widths.add(width)
            h = _grams(ids, np.zeros(len(ids), dtype=np.int64), width)[1]
            hashes.append(h)
            owners.append(np.full(len(h), item, dtype=np.int64))
        hashes, owners = np.concatenate(hashes), np.concatenate(owners)
        order = np.lexsort((owners, hashes))
        self._gram_hash, self._gram_owner = hashes[order], owners[order]
        self._embeddings = None
        if embedding_threshold is not None:
            self._embeddings = encoder.encode(self._eval_texts, progress="decontamination: eval sets")

    def find(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> list[Match | None]:
        """The strongest match of each text, or None; `embeddings` (of `texts`) saves encoding them again."""
        parsed = [words(t) for t in texts]
        found: list[Match | None] = [None] * len(texts)
        for i, (_, tokens, _) in enumerate(parsed):
            item = self._exact.get(" ".join(tokens)) if tokens else None
            if item is not None:
                found[i] = self._match(item, "exact", _between(parsed[i], 0, len(tokens)))
        self._find_ngrams(parsed, found)
        if self.embedding_threshold is not None:
            self._find_embeddings(texts, parsed, embeddings, found)
        return found

    def _find_ngrams(self, parsed: list, found: list[Match | None]) -> None:
        todo = [i for i, p in enumerate(parsed) if found[i] is None and p[1]]
        token_ids = np.array([self._vocab.get(t, -1) for i in todo for t in parsed[i][1]], dtype=np.int64)
        text_of = np.repeat(np.arange(len(todo)), [len(parsed[i][1]) for i in todo])
        first_token = np.concatenate(([0], np.cumsum([len(parsed[i][1]) for i in todo])))
        hits: dict[int, list[tuple[int, int, int, int]]] = {}  # text -> (start word, width, first, last owner slot)
        for width in sorted(self._widths):
            start, h = _grams(token_ids, text_of, width)
            lo = np.searchsorted(self._gram_hash, h, side="left")
            hi = np.searchsorted(self._gram_hash, h, side="right")
            for s, a, b in zip(start[hi > lo].tolist(), lo[hi > lo].tolist(), hi[hi > lo].tolist(), strict=True):
                t = int(text_of[s])
                hits.setdefault(t, []).append((s - int(first_token[t]), width, a, min(b, a + _OWNERS_PER_GRAM)))
        for t, text_hits in hits.items():
            i = todo[t]
            item, first, last = self._longest_run(text_hits)
            found[i] = self._match(item, "ngram", _between(parsed[i], first, last))

    def _longest_run(self, hits: list[tuple[int, int, int, int]]) -> tuple[int, int, int]:
        """(eval item, first word, end word) of the longest run of words covered by grams of one eval item."""
        windows: dict[int, list[tuple[int, int]]] = {}
        for start, width, a, b in hits:
            for owner in self._gram_owner[a:b].tolist():
                windows.setdefault(owner, []).append((start, start + width))
        best = (0, 0, 0, 0)  # (length, -item, -first, end): longest, then earliest item, then earliest position
        for item, spans in windows.items():
            spans.sort()
            first, end = spans[0]
            for s, e in [*spans[1:], (1 << 62, 1 << 62)]:
                if s > end:
                    best = max(best, (end - first, -item, -first, end))
                    first = s
                end = max(end, e)
        return -best[1], -best[2], best[3]

    def _find_embeddings(self, texts: Sequence[str], parsed: list, embeddings: np.ndarray | None, found: list) -> None:
        todo = [i for i, p in enumerate(parsed) if found[i] is None and p[1]]
        if not todo:
            return
        vectors = embeddings[todo] if embeddings is not None else self.encoder.encode([texts[i] for i in todo])
        best_item, best = nearest(vectors, self._embeddings)
        # A reworded eval question inside a long prompt (an instruction and a passage around it) is close to the
        # eval item only on its own: each sentence and line is compared too, and the closest counts.
        owner, pieces = [], []
        for position, i in enumerate(todo):
            split = sentences(texts[i])
            if len(split) > 1:
                owner += [position] * len(split)
                pieces += split
        if pieces:
            item, similarity = nearest(self.encoder.encode(pieces), self._embeddings)
            for position, k, sim in zip(owner, item.tolist(), similarity.tolist(), strict=True):
                if sim > best[position]:
                    best[position], best_item[position] = sim, k
        for i, k, sim in zip(todo, best_item.tolist(), best.tolist(), strict=True):
            if sim >= self.embedding_threshold:
                found[i] = self._match(k, "embedding", self._eval_texts[k], similarity=sim)

    def _match(self, item: int, method: str, span: str, similarity: float | None = None) -> Match:
        eval_set, item_id = self._owner[item]
        return Match(eval_set, item_id, method, span, similarity)

    def record(self, match: Match | None) -> dict[str, Any]:
        """`provenance.contamination` of a sample: what was checked and, when matched, the evidence."""
        return {
            "checked_sets": [s.name for s in self.sets],
            "ngram": self.ngram,
            "matched": match is not None,
            "eval_set": match.eval_set if match else None,
            "eval_item_id": match.eval_item_id if match else None,
            "method": match.method if match else None,
            "span": match.span if match else None,
            "similarity": match.similarity if match else None,
        }


def _between(parsed: tuple[str, list[str], list[tuple[int, int]]], first: int, end: int) -> str:
    """The text from word `first` to word `end - 1`, as written (NFKC), punctuation between words included."""
    text, _, spans = parsed
    return text[spans[first][0] : spans[end - 1][1]]
