"""dedup: exact (normalised text hash) and near-duplicate (MinHash LSH) text dedup.

Marks, never silently drops: every sample gets a cluster id, its representative and the similarity to it;
the representative (the earliest sample of its cluster in input order) is kept and the others go to
`rejected/` with the detector and the evidence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from synthforge.minhash import (
    MinHasher,
    estimated_jaccard,
    exact_hash,
    joined_text,
    near_duplicate_representatives,
    optimal_bands,
)
from synthforge.stagedir import Row, StageBase, StageInput, reject, run_stage


class DedupStage(StageBase):
    def __init__(self, section: dict[str, Any]):
        super().__init__(name="dedup", needs_reduce=True)
        self.fields = section["fields"]
        self.exact = section.get("exact", True)
        near = section.get("near")
        self.near = near
        # A variant made on purpose from a parent (an adversarial payload) is not a duplicate of that parent.
        self.exempt_methods = set(section.get("variant_methods", []))
        if near:
            self.hasher = MinHasher(num_perm=near.get("num_perm", 128), ngram=near.get("ngram", 3))
            self.threshold = near["threshold"]
            bands, rows = near.get("bands"), near.get("rows")
            self.bands, self.rows = (bands, rows) if bands and rows else optimal_bands(self.threshold, self.hasher.num_perm)
        self._ids: list[str] = []
        self._hashes: list[str] = []
        self._sigs: list[np.ndarray] = []
        self._has_words: list[np.ndarray] = []
        self._variant_of: dict[int, set[str]] = {}

    def observe(self, rows: list[Row]) -> None:
        texts = [joined_text(r, self.fields) for r in rows]
        for r in rows:
            gen = r["provenance"]["generation"]
            if gen["method"] in self.exempt_methods and gen["parent_ids"]:
                self._variant_of[len(self._ids)] = set(gen["parent_ids"])
            self._ids.append(r["sample_id"])
        self._hashes.extend(exact_hash(t) for t in texts)
        if self.near:
            sigs, has_words = self.hasher.signatures(texts)
            self._sigs.append(sigs)
            self._has_words.append(has_words)

    def finalize(self) -> None:
        n = len(self._ids)
        self.index = {sid: i for i, sid in enumerate(self._ids)}
        first_with_hash: dict[str, int] = {}
        exact_rep = np.arange(n)
        if self.exact:
            for i, h in enumerate(self._hashes):
                exact_rep[i] = first_with_hash.setdefault(h, i)
        rep = exact_rep.copy()
        if self.near and n:
            self.sigs = np.concatenate(self._sigs)
            # Only exact-unique texts take part in near-dup clustering; their exact copies follow them.
            eligible = np.concatenate(self._has_words) & (exact_rep == np.arange(n))
            near_rep = near_duplicate_representatives(
                self.sigs, self.threshold, self.bands, self.rows, eligible, self._is_variant_pair if self._variant_of else None
            )
            rep = near_rep[exact_rep]
        self.rep = rep
        n_clusters = len(np.unique(rep)) if n else 0
        self._metrics = {
            "clusters": n_clusters,
            "exact_duplicates": int((exact_rep != np.arange(n)).sum()),
            "near_duplicates": int(((rep != np.arange(n)) & (exact_rep == np.arange(n))).sum()),
            "minhash": {"bands": self.bands, "rows": self.rows, "threshold": self.threshold} if self.near else None,
        }

    def _is_variant_pair(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        def derived(a: int, b: int) -> bool:
            return self._ids[b] in self._variant_of.get(a, ()) or self._ids[a] in self._variant_of.get(b, ())

        return np.fromiter((derived(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True)), dtype=bool, count=len(i))

    def apply(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        kept, rejected = [], []
        for row in rows:
            i = self.index[row["sample_id"]]
            r = int(self.rep[i])
            rep_id = self._ids[r]
            if r == i:
                method, similarity = None, None
            elif self._hashes[i] == self._hashes[r]:
                method, similarity = "exact", 1.0
            else:
                method = "minhash"
                similarity = float(estimated_jaccard(self.sigs, np.array([i]), np.array([r]))[0])
            row["provenance"]["dedup"] = {
                "exact_hash": self._hashes[i],
                "cluster_id": f"c-{rep_id}",
                "representative_id": rep_id,
                "is_representative": r == i,
                "method": method,
                "similarity": similarity,
                "distance": None,
                "representative_is_real": None,
            }
            if r == i:
                kept.append(row)
            elif method == "exact":
                rejected.append(reject(row, "dedup.exact", f"exact duplicate of {rep_id} (same normalised text)"))
            else:
                reason = (
                    f"near-duplicate of {rep_id}: estimated Jaccard {similarity:.2f} (cluster threshold {self.threshold}, "
                    f"MinHash {self.hasher.num_perm} perms, {self.hasher.ngram}-word shingles)"
                )
                rejected.append(reject(row, "dedup.minhash", reason))
        return kept, rejected


def run_dedup(params: dict[str, Any], src: str | Path, out: str | Path) -> dict:
    return run_stage(DedupStage(params["dedup"]), StageInput.open(src), out, {"dedup": params["dedup"]})
