"""dedup: text (decontamination, exact normalised hash, MinHash LSH, sentence embeddings) or images (perceptual
hash, also against real images).

Marks, never silently drops: every sample gets a cluster id, its representative and the similarity to it;
the representative (the earliest sample of its cluster in input order) is kept and the others go to
`rejected/` with the detector and the evidence. A text sample that copies an item of a protected eval set is
rejected before any clustering, and every sample records which sets it was checked against.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from synthforge.engine import ORDINAL, Engine, Frame, StageBase, engine_args, run_stage
from synthforge.errors import BadInput
from synthforge.minhash import (
    MinHasher,
    band_keys,
    bucket_pairs,
    cluster,
    estimated_jaccard,
    exact_hash,
    joined_text,
    normalize,
    optimal_bands,
    verified_pairs,
)
from synthforge.stagedir import Row, StageInput, reject, require_columns


def _encoder(section: dict[str, Any], where: str, params_file: str):
    from synthforge.text.embeddings import shared_encoder

    try:
        return shared_encoder(section.get("model"), None, section.get("batch_size", 64))
    except BadInput as exc:  # "model: <name>: what is wrong", placed under its params section
        raise BadInput(f"{params_file}: {where}: {exc}") from None


class DedupStage(StageBase):
    needs_reduce = True

    def __init__(self, section: dict[str, Any], params_file: str = "params.yaml"):
        super().__init__(name="dedup")
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
        self.uses_model = bool(self.semantic or (self.decontaminator and self.decontaminator.encoder))

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

    def summarize(self, rows: list[Row]) -> pa.Table:
        """Per sample: its exact hash, MinHash signature, embedding, contamination match and the parents it is
        a deliberate variant of: everything the clustering needs, computed batch by batch."""
        texts = [joined_text(r, self.fields) for r in rows]
        columns: dict[str, pa.Array] = {
            "sample_id": pa.array([r["sample_id"] for r in rows], pa.string()),
            "hash": pa.array([exact_hash(t) for t in texts], pa.string()),
            "variant_of": pa.array(
                [
                    r["provenance"]["generation"]["parent_ids"]
                    if r["provenance"]["generation"]["method"] in self.exempt_methods
                    else []
                    for r in rows
                ],
                pa.list_(pa.string()),
            ),
        }
        if self.near:
            sigs, has_words = self.hasher.signatures(texts)
            columns["sig"] = pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1), pa.uint32()), self.hasher.num_perm)
            columns["has_words"] = pa.array(has_words)
        embeddings = None
        if self.semantic:
            embeddings = self.semantic_encoder.encode(texts, progress="dedup: embeddings")
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(
                pa.array(embeddings.astype(np.float32).reshape(-1)), embeddings.shape[1]
            )
            methods = [r["provenance"]["generation"]["method"] for r in rows]
            columns["has_text"] = pa.array(
                [
                    bool(normalize(t)) and (not self.semantic_methods or m in self.semantic_methods)
                    for t, m in zip(texts, methods, strict=True)
                ]
            )
        if self.decontaminator:
            same_text = self.decontaminate_fields == self.fields
            checked = texts if same_text else [joined_text(r, self.decontaminate_fields) for r in rows]
            # The embeddings already made for semantic dedup serve when they are of the same text and model.
            reuse = embeddings if same_text and self.semantic and self.decontaminator.encoder is self.semantic_encoder else None
            matches = self.decontaminator.find(checked, reuse)
            columns["contamination"] = pa.array([json.dumps(asdict(m)) if m else None for m in matches], pa.string())
        else:
            columns["contamination"] = pa.nulls(len(rows), pa.string())
        return pa.table(columns)

    def reduce(self, engine: Engine, summaries: Frame, total: int) -> pa.Table:
        """Exact duplicates keyed by hash and LSH buckets keyed by band key are distributed reduces; the
        connected components of the verified pairs, and semantic clustering, run over the whole set here."""
        n = total
        if n:  # the embeddings stay where they are until semantic clustering needs them
            facts = engine.collect(engine.map(summaries, _without_embeddings)).sort_by(ORDINAL)
        else:
            facts = self.summarize([]).append_column(ORDINAL, pa.array([], pa.int64()))
        own = np.arange(n)
        ids = facts.column("sample_id").to_pylist()
        matches = [_match(m) for m in facts.column("contamination").to_pylist()] if self.decontaminator else [None] * n
        # A contaminated sample is rejected for that alone and takes no part in clustering.
        clean = np.array([m is None for m in matches], dtype=bool)
        exact_rep = own.copy()
        if self.exact and n:
            reps = engine.collect(engine.reduce_by_key(summaries, "hash", first_of_key), REPRESENTATIVES)
            exact_rep[reps.column(ORDINAL).to_numpy()] = reps.column("rep").to_numpy()
        variant_of = {i: set(p) for i, p in enumerate(facts.column("variant_of").to_pylist()) if p}
        exempt = functools.partial(_is_variant_pair, ids, variant_of) if variant_of else None
        near_rep = exact_rep.copy()
        sigs = None
        # Each step clusters only the texts still unique after the previous ones; their duplicates follow them.
        if self.near and n:
            sigs = _matrix(facts.column("sig"), n)
            keyed = engine.map(summaries, functools.partial(_band_rows, bands=self.bands, rows=self.rows))
            found = engine.collect(engine.reduce_by_key(keyed, "key", _bucket_pairs), PAIRS)
            pairs = np.unique(np.stack([found.column("i").to_numpy(), found.column("j").to_numpy()], axis=1), axis=0)
            eligible = facts.column("has_words").to_numpy(zero_copy_only=False) & (exact_rep == own) & clean
            near_rep = cluster(n, verified_pairs(pairs, sigs, self.threshold, eligible, exempt))[exact_rep]
        rep = near_rep
        embeddings = None
        if self.semantic and n:
            from synthforge.text.semantic import cosine_clusters

            vectors = engine.collect(engine.map(summaries, lambda t: t.select([ORDINAL, "embedding"]))).sort_by(ORDINAL)
            embeddings = _matrix(vectors.column("embedding"), n)
            eligible = facts.column("has_text").to_numpy(zero_copy_only=False) & (near_rep == own) & clean
            rep = cosine_clusters(embeddings, self.semantic_threshold, eligible, exempt)[0][near_rep]
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
            self._metrics["contaminated"] = _contamination_counts(matches)
            d = self.decontaminator
            self._metrics["decontamination"] = {
                "sets": {s.name: {"source": s.source, "items": len(s.ids), "digest": s.digest} for s in d.sets},
                "ngram": d.ngram,
                "embedding_threshold": d.embedding_threshold,
                "encoder": d.encoder.identity if d.encoder else None,
            }
        # How each sample was matched to its representative, decided in the order the steps ran.
        method = np.full(n, None, dtype=object)
        similarity = np.full(n, np.nan)
        hash_column = facts.column("hash")
        same_hash = np.asarray(pc.equal(hash_column, hash_column.take(pa.array(rep, pa.int64()))), dtype=bool)
        exact = (rep != own) & same_hash
        minhash = (rep != own) & ~exact & (near_rep == rep)
        semantic = (rep != own) & ~exact & ~minhash
        method[exact], similarity[exact] = "exact", 1.0
        if minhash.any():
            method[minhash] = "minhash"
            similarity[minhash] = estimated_jaccard(sigs, own[minhash], rep[minhash])
        if semantic.any():
            # Clipped to the schema's [0, 1]: float32 rounding can pass 1, and a member linked through a chain of
            # neighbours may point away from the representative.
            method[semantic] = "semantic"
            cosine = np.einsum("ij,ij->i", embeddings[own[semantic]], embeddings[rep[semantic]])
            similarity[semantic] = np.clip(cosine, 0.0, 1.0)
        return pa.table(
            {
                "hash": hash_column,
                "rep_id": facts.column("sample_id").take(pa.array(rep)),
                "method": pa.array(method, pa.string()),
                "similarity": pa.array(similarity, pa.float64(), mask=np.isnan(similarity)),
                "contamination": facts.column("contamination"),
            }
        )

    def apply(self, rows: list[Row], decisions: pa.Table) -> tuple[list[Row], list[Row]]:
        kept, rejected = [], []
        for row, d in zip(rows, decisions.to_pylist(), strict=True):
            if self.decontaminator:
                match = _match(d["contamination"])
                row["provenance"]["contamination"] = self.decontaminator.record(match)
                if match:
                    reason = f"copies item {match.eval_item_id} of protected set {match.eval_set!r} ({match.method} match"
                    reason += f", cosine {match.similarity:.3f}" if match.similarity is not None else ""
                    rejected.append(reject(row, "dedup.contaminated", f'{reason}): "{match.quote()}"'))
                    continue
            rep_id, method, similarity = d["rep_id"], d["method"], d["similarity"]
            is_rep = rep_id == row["sample_id"]
            row["provenance"]["dedup"] = {
                "exact_hash": d["hash"],
                "cluster_id": f"c-{rep_id}",
                "representative_id": rep_id,
                "is_representative": is_rep,
                "method": method,
                "similarity": similarity,
                "distance": None,
                "representative_is_real": None,
            }
            if is_rep:
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


REPRESENTATIVES = pa.schema([(ORDINAL, pa.int64()), ("rep", pa.int64())])
PAIRS = pa.schema([("i", pa.int64()), ("j", pa.int64())])


def _without_embeddings(table: pa.Table) -> pa.Table:
    return table.drop_columns(["embedding"]) if "embedding" in table.column_names else table


def _matrix(column: pa.ChunkedArray, n: int) -> np.ndarray:
    """A fixed-size-list column as an [n, width] array."""
    return column.combine_chunks().flatten().to_numpy().reshape(n, -1)


def _match(encoded: str | None):
    from synthforge.text.decontam import Match

    return Match(**json.loads(encoded)) if encoded else None


def first_of_key(table: pa.Table) -> pa.Table:
    """Per key (whole keys in `table`, column `hash`): every member's representative, the key's first member."""
    table = table.sort_by(ORDINAL)
    if "contamination" in table.column_names:
        table = table.filter(pc.is_null(table.column("contamination")))
    first: dict[str, int] = {}
    ordinals = table.column(ORDINAL).to_pylist()
    reps = [first.setdefault(h, o) for h, o in zip(table.column("hash").to_pylist(), ordinals, strict=True)]
    return pa.table({ORDINAL: pa.array(ordinals, pa.int64()), "rep": pa.array(reps, pa.int64())}, schema=REPRESENTATIVES)


def _band_rows(table: pa.Table, bands: int, rows: int) -> pa.Table:
    """One row per (sample, band): the LSH bucket key, to shuffle by."""
    n = table.num_rows
    keys = band_keys(_matrix(table.column("sig"), n), bands, rows)
    return pa.table(
        {
            "key": pa.array(keys.reshape(-1), pa.uint64()),
            "band": pa.array(np.tile(np.arange(bands, dtype=np.int64), n)),
            ORDINAL: pa.array(np.repeat(table.column(ORDINAL).to_numpy(), bands)),
        }
    )


def _bucket_pairs(table: pa.Table) -> pa.Table:
    """Per bucket key (whole buckets in `table`): the candidate pairs of its members."""
    pairs = bucket_pairs(table.column("band").to_numpy(), table.column("key").to_numpy(), table.column(ORDINAL).to_numpy())
    return pa.table({"i": pa.array(pairs[:, 0], pa.int64()), "j": pa.array(pairs[:, 1], pa.int64())}, schema=PAIRS)


def _is_variant_pair(ids: list[str], variant_of: dict[int, set[str]], i: np.ndarray, j: np.ndarray) -> np.ndarray:
    def derived(a: int, b: int) -> bool:
        return ids[b] in variant_of.get(a, ()) or ids[a] in variant_of.get(b, ())

    return np.fromiter((derived(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True)), dtype=bool, count=len(i))


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
    each cluster keeps its earliest member. The hashes are made batch by batch; the clustering (multi-index
    hashing over the whole set) runs on the driver.
    """

    needs_reduce = True

    def __init__(self, section: dict[str, Any], params_file: str = "params.yaml"):
        from synthforge.vision.imagehash_index import HASH_KINDS

        super().__init__(name="dedup")
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

    def summarize(self, rows: list[Row]) -> pa.Table:
        from synthforge.vision.imagehash_index import hash_images
        from synthforge.vision.images import decode_image

        try:
            hashes = hash_images((r["image"] for r in rows), self.kind, self.hash_size)
        except ValueError:
            for row in rows:  # only when an image does not decode: find the sample to name
                try:
                    decode_image(row["image"] or b"")
                except ValueError as why:
                    raise BadInput(
                        f"dedup: sample {row['sample_id']}: {why} (the judge's image_format check rejects such images)"
                    ) from None
            raise
        return pa.table(
            {
                "sample_id": pa.array([r["sample_id"] for r in rows], pa.string()),
                "hash": pa.FixedSizeListArray.from_arrays(pa.array(hashes.reshape(-1), pa.uint64()), hashes.shape[1]),
            }
        )

    def reduce(self, engine: Engine, summaries: Frame, total: int) -> pa.Table:
        from synthforge.vision.imagehash_index import cluster_near_duplicates, hash_images, imagehash_version, words_per_hash

        n = total
        facts = engine.collect(summaries).sort_by(ORDINAL) if n else None
        ids = facts.column("sample_id").to_pylist() if n else []
        hashes = _matrix(facts.column("hash"), n) if n else np.zeros((0, words_per_hash(self.hash_size)), np.uint64)
        real_ids: list[str] = []
        real_match = np.full(n, -1, dtype=np.int64)
        real_distance = np.full(n, -1, dtype=np.int64)
        if self.against_real:
            from synthforge.vision.real import read_real

            real = read_real(Path(self.against_real), "train")
            real_ids = real.column("real_id").to_pylist()
            real_hashes = hash_images(real.column("image").to_pylist(), self.kind, self.hash_size)
            against = cluster_near_duplicates(hashes, self.max_distance, reference=real_hashes)
            real_match, real_distance = against.reference_match, against.reference_distance
        # Clusters among the synthetic images that are not memorised copies, so every cluster keeps one.
        fresh = np.flatnonzero(real_match < 0)
        result = cluster_near_duplicates(hashes[fresh], self.max_distance)
        rep = np.arange(n)
        distance = np.zeros(n, dtype=np.int64)
        rep[fresh] = fresh[result.representative]
        distance[fresh] = result.distance
        self._metrics = {
            "hash": self.kind,
            "hash_size": self.hash_size,
            "max_distance": self.max_distance,
            "imagehash_version": imagehash_version(),  # imagehash 4.0 changed its encoding: keep the version
            "against_real": self.against_real,
            "real_images": len(real_ids),
            "memorised_copies": int((real_match >= 0).sum()),
            "near_duplicates": int((rep != np.arange(n)).sum()),
            "clusters": int(len(np.unique(rep[fresh]))),
        }
        is_real = real_match >= 0
        return pa.table(
            {
                "hash": pa.array(
                    [f"{self.kind}{self.hash_size}:" + "".join(f"{int(w):016x}" for w in h) for h in hashes], pa.string()
                ),
                "rep_id": pa.array([real_ids[real_match[i]] if is_real[i] else ids[rep[i]] for i in range(n)], pa.string()),
                "distance": pa.array(np.where(is_real, real_distance, distance), pa.int64()),
                "is_real": pa.array(is_real),
            }
        )

    def apply(self, rows: list[Row], decisions: pa.Table) -> tuple[list[Row], list[Row]]:
        kept, rejected = [], []
        bits = self.hash_size * self.hash_size
        for row, d in zip(rows, decisions.to_pylist(), strict=True):
            rep_id, dist, is_real = d["rep_id"], d["distance"], d["is_real"]
            is_rep = rep_id == row["sample_id"]
            row["provenance"]["dedup"] = {
                "exact_hash": d["hash"],
                "cluster_id": f"c-{rep_id}",
                "representative_id": rep_id,
                "is_representative": is_rep,
                "method": None if is_rep else (f"{self.kind}-vs-real" if is_real else self.kind),
                "similarity": 1 - dist / bits,
                "distance": float(dist),
                "representative_is_real": is_real,
            }
            if is_rep:
                kept.append(row)
            elif is_real:
                reason = f"memorised copy of real training image {rep_id}: {self.kind} distance {dist} <= {self.max_distance}"
                rejected.append(reject(row, "dedup.memorised", reason))
            else:
                reason = f"near-duplicate of {rep_id}: {self.kind} distance {dist} (cluster threshold {self.max_distance} bits)"
                rejected.append(reject(row, f"dedup.{self.kind}", reason))
        return kept, rejected


def run_dedup(params: dict[str, Any], src: str | Path, out: str | Path) -> dict:
    section = params["dedup"]
    params_file = params.get("__file__", "params.yaml")
    source = StageInput.open(src)
    if "image" in section:
        from synthforge.vision.real import real_info

        stage = ImageDedupStage(section["image"], params_file).rebuilt_by(ImageDedupStage, section["image"], params_file)
        real = section["image"].get("against_real")
        inputs = {"real": real_info(Path(real))["digest"]} if real else {}
    else:
        require_columns(source, section["fields"], f"{params_file}: dedup.fields", text=True)
        stage = DedupStage(section, params_file).rebuilt_by(DedupStage, section, params_file)
        if stage.decontaminator:
            require_columns(source, stage.decontaminate_fields, f"{params_file}: dedup.decontaminate.fields", text=True)
        inputs = stage.extra_inputs()
    return run_stage(stage, source, out, {"dedup": section}, extra_inputs=inputs, **engine_args(params))
