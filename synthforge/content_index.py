"""The text index of a published version, and how trace compares a query text with a sample's text.

A sample's text is its text fields (string content columns), each normalised (synthforge.minhash.normalize).
provenance/manifest.parquet indexes it twice, so most lookups never open the data shards:

- text_hash: the exact hash of the whole text, one equality lookup for a verbatim copy of a sample;
- minhash_bands: the LSH band keys of each field's MinHash signature over word 3-grams. A field that is a near
  copy of a query (Jaccard >= THRESHOLD) shares a key with it with high probability, and an exact copy of one
  field (a held-out question pasted as the prompt) shares all of them.

Candidates from either column are then verified on their text: exact (normalised field equal to the query),
minhash (Jaccard of the word 3-gram sets, computed exactly, >= THRESHOLD) and ngram (a run of NGRAM query words,
or the whole query when shorter, occurs in the field: synthforge.text.decontam). The n-gram test needs the
text itself; a regular expression over the shards picks the few fields worth testing.

The settings are part of the index: INDEX_METADATA goes into the manifest's schema metadata, and trace uses the
columns only when they were written with the settings of this code; otherwise it computes them from the shards.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from synthforge.errors import BadInput
from synthforge.minhash import MinHasher, exact_hash, normalize, splitmix64

NUM_PERM = 64
SHINGLE = 3  # words per shingle
THRESHOLD = 0.5  # Jaccard of word 3-gram sets: a 30-word item with 2 words changed scores ~0.65
# optimal_bands(THRESHOLD, NUM_PERM, fp_weight=0.3, fn_weight=0.7): a missed copy costs more than a candidate to
# verify. A field is a candidate with probability 1-(1-J^4)^16: 0.64 at J=0.5, 0.89 at 0.6, 0.99 at 0.7, 0.12 at 0.3.
BANDS, ROWS = 16, 4
NGRAM = 13  # words, as lm-eval's decontamination
METHODS = ("exact", "ngram", "minhash")
_SEED = 1
_NOT_CONTENT = {"sample_id", "label_name", "rejected_by", "reason"}

INDEX_FIELDS: list[pa.Field] = [pa.field("text_hash", pa.string()), pa.field("minhash_bands", pa.list_(pa.uint64()))]
INDEX_METADATA: dict[bytes, bytes] = {
    b"synthforge.text_index": json.dumps(
        {"normalize": "nfkc-casefold-whitespace", "hash": "sha256-128", "num_perm": NUM_PERM, "shingle_words": SHINGLE,
         "bands": BANDS, "rows": ROWS, "seed": _SEED},
        sort_keys=True,
    ).encode()
}  # fmt: skip


def text_fields(schema: pa.Schema) -> list[str]:
    """The content columns a sample's text is made of: its string columns but the id and class name. None for image
    data: an image is traced by its batch, model or sample id, and its caption repeats across samples by design."""
    if "image" in schema.names:
        return []
    is_text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
    return [f.name for f in schema if f.name not in _NOT_CONTENT and is_text(f.type)]


def row_text(row: dict, fields: Sequence[str]) -> str | None:
    """The normalised text of a row: one line per field (normalising removes newlines inside a field)."""
    if not fields:
        return None
    return "\n".join(normalize(str(row.get(f) or "")) for f in fields)


def index_columns(texts: Sequence[str | None]) -> dict[str, list]:
    """The manifest's index columns for rows whose row_text are `texts` (None: a row without text)."""
    present = [i for i, t in enumerate(texts) if t is not None]
    lines = [texts[i].split("\n") for i in present]
    keys, has_words = band_keys([line for row in lines for line in row])
    owner = np.repeat(np.arange(len(lines)), [len(row) for row in lines])[has_words]
    offsets = np.concatenate(([0], np.cumsum(np.bincount(owner, minlength=len(lines)) * BANDS)))
    per_row = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(keys[has_words].ravel())).to_pylist()
    bands: list[list[int] | None] = [None] * len(texts)
    for i, row_keys in zip(present, per_row, strict=True):
        bands[i] = row_keys
    return {"text_hash": [None if t is None else exact_hash(t) for t in texts], "minhash_bands": bands}


def index_is_current(schema: pa.Schema) -> bool:
    """Whether a manifest's index columns were written with this code's settings (else they are recomputed)."""
    names = {f.name for f in INDEX_FIELDS}
    return names <= set(schema.names) and all((schema.metadata or {}).get(k) == v for k, v in INDEX_METADATA.items())


@functools.cache
def _hasher() -> MinHasher:
    return MinHasher(num_perm=NUM_PERM, ngram=SHINGLE, seed=_SEED)


def band_keys(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(LSH band keys uint64 [len(texts), BANDS], has_words bool [len(texts)]) of normalised texts."""
    sigs, has_words = _hasher().signatures(texts)
    keys = np.empty((len(texts), BANDS), dtype=np.uint64)
    for band in range(BANDS):
        key = np.full(len(texts), band, dtype=np.uint64)  # the band number seeds the key: bands never collide
        for col in sigs[:, band * ROWS : (band + 1) * ROWS].T.astype(np.uint64):
            key = splitmix64(key ^ col)
        keys[:, band] = key
    return keys, has_words


def _shingle_sets(texts: Sequence[str]) -> list[set[int]]:
    hashes, counts = _hasher().shingles(texts)
    return [set(part.tolist()) for part in np.split(hashes, np.cumsum(counts)[:-1])]


# -- matching ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryItem:
    """A text to look for; `id` names it in the evidence (`#1` for the first --text, the line or the item's id)."""

    id: str
    text: str


@dataclass(frozen=True)
class Evidence:
    """Why a sample matches a query item."""

    query: str  # the item's id
    method: str  # exact | ngram | minhash
    similarity: float  # exact: 1; minhash: Jaccard of word 3-grams; ngram: share of the query's words in the span
    field: str  # the sample's field that matches
    span: str  # the field's text that matches, as written


class ContentQuery:
    """Query items compiled for one search: their hashes, band keys, n-gram index and a prefilter for n-grams."""

    def __init__(self, items: Sequence[QueryItem], methods: Collection[str] = METHODS):
        from synthforge.text.decontam import Decontaminator, ProtectedSet, words

        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise BadInput(f"unknown match method {', '.join(unknown) or '(none)'} (known: {', '.join(METHODS)})")
        if not items:
            raise BadInput("no text to trace")
        self.items, self.methods = list(items), set(methods)
        self._position: dict[str, int] = {}
        for k, item in enumerate(self.items):
            if item.id in self._position:
                raise BadInput(f"query {item.id}: the id is used twice")
            self._position[item.id] = k
        self._tokens = [words(item.text)[1] for item in self.items]
        for item, tokens in zip(self.items, self._tokens, strict=True):
            if not tokens:
                raise BadInput(f"query {item.id}: no words to match")
        normalized = [normalize(item.text) for item in self.items]
        self._by_text = {text: k for k, text in reversed(list(enumerate(normalized)))}
        self.hashes = sorted({exact_hash(text) for text in normalized})
        keys, _ = band_keys(normalized)
        self.keys = np.unique(keys).tolist()
        self._owners: dict[int, list[int]] = {}
        for k, row in enumerate(keys.tolist()):
            for key in row:
                self._owners.setdefault(key, []).append(k)
        self._shingles = _shingle_sets(normalized)
        self._decontaminator = None
        if "ngram" in self.methods:
            ids, texts = [item.id for item in self.items], [item.text for item in self.items]
            self._decontaminator = Decontaminator([ProtectedSet("query", "trace", ids, texts)], ngram=NGRAM)
        self._filters = _ngram_filters(self._tokens) if "ngram" in self.methods else None

    def may_share_ngram(self, texts: pa.Array) -> np.ndarray:
        """A mask of the texts that may share a query n-gram (it never misses one); all False without the ngram method."""
        if "ngram" not in self.methods:
            return np.zeros(len(texts), dtype=bool)
        if self._filters is None:
            return np.ones(len(texts), dtype=bool)
        folded = pc.ascii_lower(texts)
        others = pc.invert(pc.fill_null(pc.string_is_ascii(texts), True))
        if pc.any(others).as_py():
            # Query words are case-folded NFKC: folding these texts alike keeps the filter from missing them.
            nfkc = pc.utf8_lower(pc.utf8_normalize(texts.filter(others), "NFKC"))
            folded = pc.replace_with_mask(folded, others, pc.replace_substring(nfkc, "ß", "ss"))
        # One pass with every item's first test, then each item's tests in turn on the ever fewer texts left.
        first = np.flatnonzero(_matches(folded, _any_word([w for tests in self._filters for w in tests[0]])))
        hit = np.zeros(len(texts), dtype=bool)
        for tests in self._filters:
            rows = first
            for words in tests:
                rows = rows[_matches(folded.take(rows), _any_word(words))]
                if not len(rows):
                    break
            hit[rows] = True
        return hit

    def evidence(self, rows: Sequence[dict[str, str | None]]) -> list[list[Evidence]]:
        """Why each row (a sample's text fields by name) matches query items: per item and method the best evidence,
        strongest first (exact, ngram, minhash; then by similarity). A field's n-gram evidence names one item, the one
        sharing the longest run of words with it."""
        from synthforge.text.decontam import words

        found: list[dict[tuple[str, str], Evidence]] = [{} for _ in rows]

        def add(row: int, e: Evidence) -> None:
            best = found[row].get((e.query, e.method))
            if best is None or e.similarity > best.similarity:
                found[row][e.query, e.method] = e

        # every non-empty field of every row: (row, field name, text as written, normalised text)
        fields = [(i, name, text, normalize(text)) for i, row in enumerate(rows) for name, text in row.items() if text]
        if "exact" in self.methods:
            for i, name, text, norm in fields:
                if (k := self._by_text.get(norm)) is not None:
                    add(i, Evidence(self.items[k].id, "exact", 1.0, name, text))
            for i, row in enumerate(rows):
                names = [name for name, text in row.items() if text]
                whole = normalize(" ".join(row[name] for name in names))
                if len(names) > 1 and (k := self._by_text.get(whole)) is not None:
                    add(i, Evidence(self.items[k].id, "exact", 1.0, "+".join(names), "\n".join(row[name] for name in names)))
        if "minhash" in self.methods and fields:
            keys, has_words = band_keys([norm for *_, norm in fields])
            shingles = _shingle_sets([norm for *_, norm in fields])
            for j, (i, name, text, _) in enumerate(fields):
                candidates = {k for key in keys[j].tolist() for k in self._owners.get(key, ())} if has_words[j] else ()
                for k in candidates:
                    similarity = len(shingles[j] & self._shingles[k]) / len(shingles[j] | self._shingles[k])
                    if similarity >= THRESHOLD:
                        add(i, Evidence(self.items[k].id, "minhash", similarity, name, text))
        if self._decontaminator is not None and fields:
            for (i, name, _, _), match in zip(fields, self._decontaminator.find([text for _, _, text, _ in fields]), strict=True):
                if match is not None:
                    query_words = len(self._tokens[self._position[match.eval_item_id]])
                    share = min(1.0, len(words(match.span)[1]) / query_words)
                    add(i, Evidence(match.eval_item_id, "ngram", share, name, match.span))
        order = {m: i for i, m in enumerate(METHODS)}
        strongest = lambda e: (order[e.method], -e.similarity, self._position[e.query])  # noqa: E731
        return [sorted(row.values(), key=strongest) for row in found]


def _matches(texts: pa.Array, pattern: str) -> np.ndarray:
    return pc.fill_null(pc.match_substring_regex(texts, pattern), False).to_numpy(zero_copy_only=False)


def _any_word(words: Sequence[str]) -> str:
    return r"\b(?:" + "|".join(words) + r")\b"


def _ngram_filters(tokens: list[list[str]]) -> list[list[list[str]]] | None:
    """Per query item, word lists such that a text sharing an n-gram with the item holds a word of each list; None
    when some item has none (every text is then tested).

    Each window of w = min(NGRAM, len(item)) consecutive words holds exactly one word at a position p with
    p % w == r, for every r: so a text sharing a window holds one of the words at each residue r. Lists with the
    longest (rarest, usually) shortest word come first. Only ASCII words are used: lower-casing an ASCII-folded
    text finds them exactly where Python's case folding would.
    """
    filters = []
    for item in tokens:
        width = min(NGRAM, len(item))
        residues = [sorted(set(item[r::width])) for r in range(width)]
        usable = [words for words in residues if all(w.isascii() for w in words)]
        if not usable:
            return None
        filters.append(sorted(usable, key=lambda words: (-min(map(len, words)), len(words))))
    return filters
