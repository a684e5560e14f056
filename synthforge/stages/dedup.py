"""dedup: text (decontamination, exact normalised hash, MinHash LSH, sentence embeddings) or images (perceptual
hash, also against real images).

Marks, never silently drops: every sample gets a cluster id, its representative and the similarity to it;
the representative (the earliest sample of its cluster in input order) is kept and the others go to
`rejected/` with the detector and the evidence. A text sample that copies an item of a protected eval set is
rejected before any clustering, and every sample records which sets it was checked against.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from synthforge.errors import BadInput
from synthforge.minhash import (
    MinHasher,
    estimated_jaccard,
    exact_hash,
    joined_text,
    near_duplicate_representatives,
    normalize,
    optimal_bands,
)
from synthforge.stagedir import Row, StageBase, StageInput, reject, require_columns, run_stage


def _encoder(section: dict[str, Any], where: str, params_file: str):
    from synthforge.text.embeddings import shared_encoder

    try:
        return shared_encoder(section.get("model"), None, section.get("batch_size", 64))
    except BadInput as exc:  # "model: <name>: what is wrong", placed under its params section
        raise BadInput(f"{params_file}: {where}: {exc}") from None


class DedupStage(StageBase):
    def __init__(self, section: dict[str, Any], params_file: str = "params.yaml"):
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
        self.semantic = section.get("semantic")
        if self.semantic:
            self.semantic_threshold = self.semantic["threshold"]
            # Template variants of one record share most of their words by design: semantic dedup is for the
            # free text an LLM writes, so a pipeline can limit it to those methods.
            self.semantic_methods = set(self.semantic.get("methods") or [])
            self.semantic_encoder = _encoder(self.semantic, "dedup.semantic", params_file)
        self.decontaminator = None
        if decontaminate := section.get("decontaminate"):
            self.decontaminator, self.decontaminate_fields = _decontaminator(decontaminate, self.fields, params_file)
        self._ids: list[str] = []
        self._hashes: list[str] = []
        self._sigs: list[np.ndarray] = []
        self._has_words: list[np.ndarray] = []
        self._has_text: list[bool] = []
        self._embeddings: list[np.ndarray] = []
        self._contamination: list = []
        self._variant_of: dict[int, set[str]] = {}

    def extra_inputs(self) -> dict[str, str]:
        """What else decides the output: the protected sets' contents and the encoders' weights."""
        inputs = {}
        if self.decontaminator:
            inputs |= {f"protected:{s.name}": s.digest for s in self.decontaminator.sets}
            if self.decontaminator.encoder:
                inputs["decontaminate:encoder"] = self.decontaminator.encoder.identity
        if self.semantic:
            inputs["semantic:encoder"] = self.semantic_encoder.identity
        return inputs

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
        embeddings = None
        if self.semantic:
            embeddings = self.semantic_encoder.encode(texts, progress="dedup: embeddings")
            self._embeddings.append(embeddings)
            methods = [r["provenance"]["generation"]["method"] for r in rows]
            self._has_text.extend(
                bool(normalize(t)) and (not self.semantic_methods or m in self.semantic_methods)
                for t, m in zip(texts, methods, strict=True)
            )
        if self.decontaminator:
            same_text = self.decontaminate_fields == self.fields
            checked = texts if same_text else [joined_text(r, self.decontaminate_fields) for r in rows]
            # The embeddings already made for semantic dedup serve when they are of the same text and model.
            reuse = embeddings if same_text and self.semantic and self.decontaminator.encoder is self.semantic_encoder else None
            self._contamination.extend(self.decontaminator.find(checked, reuse))

    def finalize(self) -> None:
        n = len(self._ids)
        own = np.arange(n)
        self.index = {sid: i for i, sid in enumerate(self._ids)}
        # A contaminated sample is rejected for that alone and takes no part in clustering.
        clean = np.array([m is None for m in self._contamination], dtype=bool) if self.decontaminator else np.ones(n, bool)
        first_with_hash: dict[str, int] = {}
        exact_rep = own.copy()
        if self.exact:
            for i in np.flatnonzero(clean).tolist():
                exact_rep[i] = first_with_hash.setdefault(self._hashes[i], i)
        near_rep = exact_rep.copy()
        variant_pairs = self._is_variant_pair if self._variant_of else None
        # Each step clusters only the texts still unique after the previous ones; their duplicates follow them.
        if self.near and n:
            self.sigs = np.concatenate(self._sigs)
            eligible = np.concatenate(self._has_words) & (exact_rep == own) & clean
            near_rep = near_duplicate_representatives(self.sigs, self.threshold, self.bands, self.rows, eligible, variant_pairs)
            near_rep = near_rep[exact_rep]
        rep = near_rep
        if self.semantic and n:
            from synthforge.text.semantic import cosine_clusters

            self.embeddings = np.concatenate(self._embeddings)
            eligible = np.array(self._has_text) & (near_rep == own) & clean
            rep = cosine_clusters(self.embeddings, self.semantic_threshold, eligible, variant_pairs)[0][near_rep]
        self.near_rep, self.rep = near_rep, rep
        self._metrics = {
            "clusters": len(np.unique(rep[clean])) if n else 0,
            "exact_duplicates": int((exact_rep != own).sum()),
            "near_duplicates": int(((near_rep != own) & (exact_rep == own)).sum()),
            "minhash": {"bands": self.bands, "rows": self.rows, "threshold": self.threshold} if self.near else None,
        }
        if self.semantic:
            self._metrics["semantic_duplicates"] = int(((rep != own) & (near_rep == own)).sum())
            self._metrics["semantic"] = {"threshold": self.semantic_threshold, "encoder": self.semantic_encoder.identity}
        if self.decontaminator:
            self._metrics["contaminated"] = _contamination_counts(self._contamination)
            d = self.decontaminator
            self._metrics["decontamination"] = {
                "sets": {s.name: {"source": s.source, "items": len(s.ids), "digest": s.digest} for s in d.sets},
                "ngram": d.ngram,
                "embedding_threshold": d.embedding_threshold,
                "encoder": d.encoder.identity if d.encoder else None,
            }

    def _is_variant_pair(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        def derived(a: int, b: int) -> bool:
            return self._ids[b] in self._variant_of.get(a, ()) or self._ids[a] in self._variant_of.get(b, ())

        return np.fromiter((derived(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True)), dtype=bool, count=len(i))

    def apply(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        kept, rejected = [], []
        for row in rows:
            i = self.index[row["sample_id"]]
            if self.decontaminator:
                match = self._contamination[i]
                row["provenance"]["contamination"] = self.decontaminator.record(match)
                if match:
                    reason = f"copies item {match.eval_item_id} of protected set {match.eval_set!r} ({match.method} match"
                    reason += f", cosine {match.similarity:.3f}" if match.similarity is not None else ""
                    rejected.append(reject(row, "dedup.contaminated", f'{reason}): "{match.quote()}"'))
                    continue
            r = int(self.rep[i])
            rep_id = self._ids[r]
            if r == i:
                method, similarity = None, None
            elif self._hashes[i] == self._hashes[r]:
                method, similarity = "exact", 1.0
            elif self.near_rep[i] == r:
                method = "minhash"
                similarity = float(estimated_jaccard(self.sigs, np.array([i]), np.array([r]))[0])
            else:
                # Clipped to the schema's [0, 1]: float32 rounding can pass 1, and a member linked through a chain of
                # neighbours may point away from the representative.
                method, similarity = "semantic", float(np.clip(self.embeddings[i] @ self.embeddings[r], 0.0, 1.0))
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
            elif method == "minhash":
                reason = (
                    f"near-duplicate of {rep_id}: estimated Jaccard {similarity:.2f} (cluster threshold {self.threshold}, "
                    f"MinHash {self.hasher.num_perm} perms, {self.hasher.ngram}-word shingles)"
                )
                rejected.append(reject(row, "dedup.minhash", reason))
            else:
                reason = (
                    f"semantic near-duplicate of {rep_id}: cosine {similarity:.3f} (cluster threshold "
                    f"{self.semantic_threshold}, encoder {self.semantic_encoder.identity})"
                )
                rejected.append(reject(row, "dedup.semantic", reason))
        return kept, rejected


def _decontaminator(section: dict[str, Any], dedup_fields: list[str], params_file: str):
    """(the Decontaminator of `dedup.decontaminate`, the sample fields it checks)."""
    from synthforge.text.decontam import Decontaminator, load_protected_set

    fields = section.get("fields", dedup_fields)
    sets, seen = [], set()
    for k, spec in enumerate(section["sets"]):
        where = f"dedup.decontaminate.sets[{k}]"
        if spec["name"] in seen:
            raise BadInput(f"{params_file}: {where}.name: {spec['name']!r} names two sets")
        seen.add(spec["name"])
        sets.append(load_protected_set(spec, fields, where, params_file))
    threshold = section.get("embedding_threshold", 0.9)
    encoder = _encoder(section, "dedup.decontaminate", params_file) if threshold is not None else None
    return Decontaminator(sets, section.get("ngram", 13), threshold, encoder), fields


def _contamination_counts(matches: list) -> dict[str, Any]:
    by_set: dict[str, Counter] = {}
    for m in matches:
        if m is not None:
            by_set.setdefault(m.eval_set, Counter())[m.method] += 1
    return {
        "total": sum(m is not None for m in matches),
        "by_set": {k: dict(sorted(v.items())) for k, v in sorted(by_set.items())},
    }


class ImageDedupStage(StageBase):
    """Perceptual-hash dedup of images: within the synthetic set, and against the real training images.

    A synthetic image within `max_distance` of a real training image is a memorised copy and is rejected; the
    rest are clustered (connected components of the within-distance graph, found by multi-index hashing) and
    each cluster keeps its earliest member.
    """

    def __init__(self, section: dict[str, Any], params_file: str = "params.yaml"):
        from synthforge.vision.imagehash_index import HASH_KINDS

        super().__init__(name="dedup", needs_reduce=True)
        self.kind = section.get("hash", "phash")
        if self.kind not in HASH_KINDS:
            raise BadInput(f"{params_file}: dedup.image.hash: unknown hash {self.kind!r} (known: {', '.join(HASH_KINDS)})")
        self.hash_size = int(section.get("hash_size", 8))
        self.max_distance = int(section.get("max_distance", 4))
        if self.max_distance >= self.hash_size**2:
            raise BadInput(
                f"{params_file}: dedup.image.max_distance: {self.max_distance} must be below the hash length "
                f"({self.hash_size**2} bits for hash_size {self.hash_size})"
            )
        self.against_real = section.get("against_real")
        self._ids: list[str] = []
        self._hashes: list[np.ndarray] = []

    def observe(self, rows: list[Row]) -> None:
        from synthforge.vision.imagehash_index import hash_images

        self._ids += [r["sample_id"] for r in rows]
        self._hashes.append(hash_images((r["image"] for r in rows), self.kind, self.hash_size))

    def finalize(self) -> None:
        from synthforge.vision.imagehash_index import cluster_near_duplicates, hash_images, imagehash_version, words_per_hash

        hashes = np.concatenate(self._hashes) if self._hashes else np.zeros((0, words_per_hash(self.hash_size)), np.uint64)
        self.hashes = hashes
        self.index = {sid: i for i, sid in enumerate(self._ids)}
        n = len(hashes)
        self.real_ids: list[str] = []
        self.real_match = np.full(n, -1, dtype=np.int64)
        self.real_distance = np.full(n, -1, dtype=np.int64)
        if self.against_real:
            from synthforge.vision.real import read_real

            real = read_real(Path(self.against_real), "train")
            self.real_ids = real.column("real_id").to_pylist()
            real_hashes = hash_images(real.column("image").to_pylist(), self.kind, self.hash_size)
            against = cluster_near_duplicates(hashes, self.max_distance, reference=real_hashes)
            self.real_match, self.real_distance = against.reference_match, against.reference_distance
        # Clusters among the synthetic images that are not memorised copies, so every cluster keeps one.
        fresh = np.flatnonzero(self.real_match < 0)
        result = cluster_near_duplicates(hashes[fresh], self.max_distance)
        self.rep = np.arange(n)
        self.distance = np.zeros(n, dtype=np.int64)
        self.rep[fresh] = fresh[result.representative]
        self.distance[fresh] = result.distance
        self._metrics = {
            "hash": self.kind,
            "hash_size": self.hash_size,
            "max_distance": self.max_distance,
            "imagehash_version": imagehash_version(),  # imagehash 4.0 changed its encoding: keep the version
            "against_real": self.against_real,
            "real_images": len(self.real_ids),
            "memorised_copies": int((self.real_match >= 0).sum()),
            "near_duplicates": int((self.rep != np.arange(n)).sum()),
            "clusters": int(len(np.unique(self.rep[fresh]))),
        }

    def _hex(self, i: int) -> str:
        return f"{self.kind}{self.hash_size}:" + "".join(f"{int(w):016x}" for w in self.hashes[i])

    def apply(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        kept, rejected = [], []
        bits = self.hash_size * self.hash_size
        for row in rows:
            i = self.index[row["sample_id"]]
            if self.real_match[i] >= 0:
                rep_id, d, is_real = self.real_ids[self.real_match[i]], int(self.real_distance[i]), True
            else:
                rep_id, d, is_real = self._ids[self.rep[i]], int(self.distance[i]), False
            is_rep = rep_id == row["sample_id"]
            row["provenance"]["dedup"] = {
                "exact_hash": self._hex(i),
                "cluster_id": f"c-{rep_id}",
                "representative_id": rep_id,
                "is_representative": is_rep,
                "method": None if is_rep else (f"{self.kind}-vs-real" if is_real else self.kind),
                "similarity": 1 - d / bits,
                "distance": float(d),
                "representative_is_real": is_real,
            }
            if is_rep:
                kept.append(row)
            elif is_real:
                reason = f"memorised copy of real training image {rep_id}: {self.kind} distance {d} <= {self.max_distance}"
                rejected.append(reject(row, "dedup.memorised", reason))
            else:
                reason = f"near-duplicate of {rep_id}: {self.kind} distance {d} (cluster threshold {self.max_distance} bits)"
                rejected.append(reject(row, f"dedup.{self.kind}", reason))
        return kept, rejected


def run_dedup(params: dict[str, Any], src: str | Path, out: str | Path) -> dict:
    section = params["dedup"]
    params_file = params.get("__file__", "params.yaml")
    source = StageInput.open(src)
    if "image" in section:
        from synthforge.vision.real import real_info

        stage = ImageDedupStage(section["image"], params_file)
        real = section["image"].get("against_real")
        inputs = {"real": real_info(Path(real))["digest"]} if real else {}
    else:
        require_columns(source, section["fields"], f"{params_file}: dedup.fields")
        stage = DedupStage(section, params_file)
        if stage.decontaminator:
            require_columns(source, stage.decontaminate_fields, f"{params_file}: dedup.decontaminate.fields")
        inputs = stage.extra_inputs()
    return run_stage(stage, source, out, {"dedup": section}, extra_inputs=inputs)
