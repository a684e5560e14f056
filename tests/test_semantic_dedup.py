"""Semantic dedup: sentence-embedding clusters after exact and MinHash, exact against brute force."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pyarrow as pa
import pytest
from conftest import read_manifest, read_rows
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from synthforge.minhash import cluster
from synthforge.provenance import new_record
from synthforge.resources import schema_path
from synthforge.stagedir import StageWriter, stage_fingerprint
from synthforge.text.semantic import cosine_clusters, nearest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONTENT = pa.schema([("prompt", pa.string()), ("reference", pa.string())])

# Cosines under the bundled all-MiniLM-L6-v2: France 0.94, router 0.99, Austen 0.93; unrelated pairs < 0.45.
PROMPTS = [
    "What is the capital of France?",
    "How do I reset the password of my router?",
    "Which city is the capital of France?",
    "Describe the water cycle for a ten year old.",
    "How can I reset my router password?",
    "Who wrote the novel Pride and Prejudice?",
    "Write a haiku about autumn leaves.",
    "Pride and Prejudice was written by which author?",
    "Explain how vaccines train the immune system.",
    "Translate good morning into Spanish.",
]
PARAPHRASE_OF = {2: 0, 4: 1, 7: 5}


def sid(k: int) -> str:
    return f"{k:016x}"  # sample ids are hex digests


def write_stage(path, prompts, methods=None, parents=None):
    """A finished `judge` stage directory of text samples, as the real stages write it; returns the ids."""
    rows = []
    for k, prompt in enumerate(prompts):
        method = (methods or {}).get(k, "template")
        prov = new_record(
            sample_id=sid(k),
            run_id="run-1",
            source={"uri": "sources/requests.jsonl", "record_id": f"r{k}", "row": k},
            method=method,
            model="templates",
            batch_id="b1",
            parent_ids=[sid(p) for p in (parents or {}).get(k, [])],
        )
        rows.append({"sample_id": sid(k), "prompt": prompt, "reference": "", "provenance": prov})
    with StageWriter(path, "judge", CONTENT, stage_fingerprint("judge", {}, {})) as writer:
        writer.write(rows)
    return [r["sample_id"] for r in rows]


def dedup_params(**section):
    """Params with a dedup section that the published params schema accepts."""
    section = {"fields": ["prompt"], "exact": True, **section}
    schema = json.loads(schema_path("params.schema.json").read_text())
    jsonschema.validate(section, schema["properties"]["dedup"])
    return {"dedup": section, "__file__": "params.yaml"}


def run(tmp_path, prompts, name="deduped", methods=None, parents=None, **section):
    from synthforge.stages.dedup import run_dedup

    if not (tmp_path / "judged").exists():
        write_stage(tmp_path / "judged", prompts, methods, parents)
    stats = run_dedup(dedup_params(**section), tmp_path / "judged", tmp_path / name)
    rows = {r["sample_id"]: r for kind in ("samples", "rejected") for r in read_rows(tmp_path / name, kind)}
    return stats, rows


def test_planted_paraphrases_are_clustered_and_the_earliest_kept_with_evidence(tmp_path):
    stats, rows = run(tmp_path, PROMPTS, semantic={"threshold": 0.9})
    rejected = {k for k, r in rows.items() if r.get("rejected_by")}
    assert rejected == {sid(k) for k in PARAPHRASE_OF}
    for k, rep in PARAPHRASE_OF.items():
        row = rows[sid(k)]
        dedup = row["provenance"]["dedup"]
        assert row["rejected_by"] == "dedup.semantic"
        assert dedup["representative_id"] == sid(rep) and dedup["cluster_id"] == f"c-{sid(rep)}"
        assert dedup["method"] == "semantic" and not dedup["is_representative"] and dedup["similarity"] >= 0.9
        assert f"near-duplicate of {sid(rep)}: cosine {dedup['similarity']:.3f}" in row["reason"]
        assert "threshold 0.9" in row["reason"] and "all-MiniLM-L6-v2@" in row["reason"]
        kept = rows[sid(rep)]["provenance"]["dedup"]
        assert kept["is_representative"] and kept["method"] is None
    assert stats["semantic_duplicates"] == 3 and stats["rejected_by"] == {"dedup.semantic": 3}
    assert stats["semantic"]["threshold"] == 0.9 and stats["semantic"]["encoder"].startswith("all-MiniLM-L6-v2@")
    assert stats["clusters"] == len(PROMPTS) - 3


def test_the_threshold_is_honoured(tmp_path):
    # Only the router pair (cosine 0.99) reaches 0.95; without `semantic` nothing is clustered by meaning.
    _, rows = run(tmp_path, PROMPTS, semantic={"threshold": 0.95})
    assert {k for k, r in rows.items() if r.get("rejected_by")} == {sid(4)}
    _, rows = run(tmp_path, PROMPTS, name="plain")
    assert not any(r.get("rejected_by") for r in rows.values())


def test_semantic_runs_on_what_exact_and_minhash_left_and_their_copies_follow(tmp_path):
    prompts = [
        "Which city is the capital of France?",
        "What is the capital of France?",
        "what is the capital of   FRANCE?",  # exact copy of 1 after normalisation
        "Write a haiku about autumn leaves.",
    ]
    stats, rows = run(tmp_path, prompts, semantic={"threshold": 0.9}, near={"threshold": 0.9})
    assert rows[sid(1)]["rejected_by"] == "dedup.semantic" and rows[sid(2)]["rejected_by"] == "dedup.semantic"
    assert rows[sid(2)]["provenance"]["dedup"]["representative_id"] == sid(0)
    assert stats["exact_duplicates"] == 1 and stats["semantic_duplicates"] == 1
    assert not rows[sid(3)].get("rejected_by")
    manifest = read_manifest(tmp_path / "deduped")
    assert {m["sample_id"] for m in manifest if m["kept"]} == {sid(0), sid(3)}


def test_a_variant_is_not_a_semantic_duplicate_of_its_parent(tmp_path):
    prompts = ["What is the capital of France?", "Which city is the capital of France?"]
    _, rows = run(
        tmp_path,
        prompts,
        methods={1: "adversarial"},
        parents={1: [0]},
        variant_methods=["adversarial"],
        semantic={"threshold": 0.9},
    )
    assert not any(r.get("rejected_by") for r in rows.values())


def test_an_unknown_encoder_is_refused_naming_the_param():
    from synthforge.errors import BadInput
    from synthforge.stages.dedup import DedupStage

    with pytest.raises(BadInput, match=r"^params.yaml: dedup.semantic: model: ./no-such-model: no such directory"):
        DedupStage({"fields": ["prompt"], "semantic": {"threshold": 0.9, "model": "./no-such-model"}})


def brute_force(embeddings, threshold, eligible, exempt=None):
    sims = embeddings.astype(np.float64) @ embeddings.astype(np.float64).T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    keep = eligible[i] & eligible[j]
    if exempt is not None:
        keep &= ~exempt(i, j)
    return cluster(len(embeddings), np.stack([i[keep], j[keep]], axis=1)), sims


def unit_vectors(seed, n, dim):
    rng = np.random.default_rng(seed)
    # Few dimensions and a few shared centres: many pairs near any threshold, long chains, big clusters.
    centres = rng.normal(size=(max(1, n // 6), dim))
    x = centres[rng.integers(len(centres), size=n)] + rng.normal(scale=0.4, size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 90),
    dim=st.integers(2, 12),
    threshold=st.floats(0.3, 0.99),
    block_size=st.integers(1, 40),
    eligible_share=st.sampled_from([1.0, 0.7]),
    exempt_mod=st.sampled_from([None, 3, 7]),
)
def test_blocked_clustering_equals_brute_force(seed, n, dim, threshold, block_size, eligible_share, exempt_mod):
    x = unit_vectors(seed, n, dim)
    eligible = np.random.default_rng(seed + 1).random(n) < eligible_share
    exempt = None if exempt_mod is None else (lambda i, j: (i + j) % exempt_mod == 0)
    expected, sims = brute_force(x, threshold, eligible, exempt)
    # A pair within float32 rounding of the threshold may fall either way; such draws prove nothing.
    assume(not np.any(np.abs(sims[np.triu_indices(n, k=1)] - threshold) < 1e-5))
    rep, sim = cosine_clusters(x, threshold, eligible, exempt, block_size=block_size)
    np.testing.assert_array_equal(rep, expected)
    np.testing.assert_allclose(sim, np.where(rep == np.arange(n), 1.0, sims[np.arange(n), rep]), atol=1e-5)


def test_blocked_clustering_merges_large_components_in_bounded_steps(monkeypatch):
    import synthforge.text.semantic as semantic

    monkeypatch.setattr(semantic, "_EDGES_BEFORE_MERGE", 50)  # merge many times, as on a huge input
    x = unit_vectors(7, 400, 3)
    eligible = np.ones(400, dtype=bool)
    rep, _ = cosine_clusters(x, 0.95, eligible, block_size=32)
    np.testing.assert_array_equal(rep, brute_force(x, 0.95, eligible)[0])
    assert len(np.unique(rep)) < 200  # the data really has big clusters


def test_nearest_finds_the_most_similar_item_across_blocks():
    queries, corpus = unit_vectors(1, 50, 5), unit_vectors(2, 70, 5)
    index, sim = nearest(queries, corpus, block_size=16)
    full = queries @ corpus.T
    np.testing.assert_array_equal(index, full.argmax(axis=1))
    np.testing.assert_allclose(sim, full.max(axis=1), atol=1e-6)
