"""The stage contract and what each stage of the default recipe decides."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import jsonschema
import pytest
from conftest import STAGES, read_manifest, read_rows

from synthforge.errors import BadInput
from synthforge.provenance import validate_record
from synthforge.resources import schema_path


def test_every_sample_that_enters_a_stage_leaves_it_exactly_once(project):
    previous = None
    for name in STAGES:
        d = project / "data" / name
        kept = {r["sample_id"] for r in read_rows(d)}
        rejected = {r["sample_id"] for r in read_rows(d, "rejected")}
        manifest = read_manifest(d)
        assert not kept & rejected
        assert {m["sample_id"] for m in manifest} == kept | rejected
        assert len(manifest) == len(kept) + len(rejected)
        stats = json.loads((d / "stats.json").read_text())
        assert (stats["entered"], stats["kept"], stats["rejected"]) == (len(manifest), len(kept), len(rejected))
        if previous is not None:
            assert kept | rejected == previous, f"{name} did not receive exactly what the previous stage kept"
        previous = kept
        assert not list((project / "data").glob(f".{name}.*")), "temporary stage directory left behind"


def test_rejected_samples_keep_their_content_and_reason(project):
    rejected = read_rows(project / "data" / "judged", "rejected")
    assert rejected, "the default recipe has a source record with a missing field: judge must reject its samples"
    for row in rejected:
        assert row["prompt"] and row["rejected_by"].startswith("judge.") and row["reason"]


def test_every_manifest_row_validates_and_carries_the_seven_fields(project):
    validator = jsonschema.Draft202012Validator(json.loads(schema_path("provenance.schema.json").read_text()))
    for m in read_manifest(project / "data" / "split"):
        validator.validate(m["provenance"])
        p = m["provenance"]
        assert p["source"]["uri"].endswith("customer_requests.jsonl")
        assert p["generation"]["model"] and p["generation"]["prompt_version"]
        assert p["judge"]["verdict"] == "pass" and {c["name"] for c in p["judge"]["checks"]} >= {"format", "length"}
        assert p["tags"] and p["difficulty"] in {"easy", "medium", "hard", "adversarial"} and p["split"]
        assert [s["stage"] for s in p["stages"]] == ["generate", "judge", "dedup", "tag", "split"]


def test_a_broken_provenance_record_is_caught_naming_the_field(project):
    record = read_manifest(project / "data" / "split")[0]["provenance"]
    with pytest.raises(BadInput, match=r"manifest.parquet row 7: provenance\.difficulty: 'trivial' is not one of"):
        validate_record({**record, "difficulty": "trivial"}, "manifest.parquet row 7")
    broken = {**record, "generation": {**record["generation"]}}
    del broken["generation"]["batch_id"]
    with pytest.raises(BadInput, match="batch_id"):
        validate_record(broken, "x")


def test_generation_records_template_version_hash_seed_and_batch(project):
    from synthforge.provenance import sha256_hex

    rows = read_rows(project / "data" / "generated")
    template = next(r for r in rows if r["provenance"]["generation"]["prompt_template_id"] == "refund-request")
    gen = template["provenance"]["generation"]
    assert gen["method"] == "template" and gen["prompt_version"] == "3" and gen["seed"] == 20261121
    assert gen["prompt_hash"] == sha256_hex((project / "prompts" / "refund_request.yaml").read_bytes())
    assert gen["batch_id"] and template["provenance"]["source"]["record_id"]
    adversarial = [r for r in rows if r["provenance"]["generation"]["method"] == "adversarial"]
    ids = {r["sample_id"] for r in rows}
    assert adversarial and all(set(r["provenance"]["generation"]["parent_ids"]) <= ids for r in adversarial)
    assert all(len(r["provenance"]["generation"]["parent_ids"]) == 1 for r in adversarial)


def test_generation_is_deterministic_in_its_ids(project, tmp_path):
    import contextlib

    from conftest import run_pipeline  # noqa: F401  (same helper, other output)

    from synthforge.params import load_params
    from synthforge.stages.generate import run_generate

    with contextlib.chdir(project):
        run_generate(load_params("params.yaml"), tmp_path / "again")
    first = [r["sample_id"] for r in read_rows(project / "data" / "generated")]
    assert [r["sample_id"] for r in read_rows(tmp_path / "again")] == first


def test_judge_rejects_a_missing_template_variable_with_the_evidence(project):
    rejected = read_rows(project / "data" / "judged", "rejected")
    missing = [r for r in rejected if r["provenance"]["source"]["record_id"] == "wide-world-tour"]
    assert missing and all(r["rejected_by"] == "judge.banned_patterns" and "<<missing:amount>>" in r["reason"] for r in missing)
    verdicts = {c["name"]: c["verdict"] for c in missing[0]["provenance"]["judge"]["checks"]}
    assert verdicts.pop("banned_patterns") == "fail"
    assert {"format", "required_fields", "length", "safety", "llm_judge"} <= set(verdicts)  # every check ran
    assert set(verdicts.values()) == {"pass"}


def test_dedup_keeps_one_representative_per_cluster_and_records_it(project):
    rows = read_rows(project / "data" / "deduped") + read_rows(project / "data" / "deduped", "rejected")
    rows = [r for r in rows if r.get("rejected_by") != "dedup.contaminated"]  # rejected before any clustering
    by_cluster = defaultdict(list)
    for r in rows:
        by_cluster[r["provenance"]["dedup"]["cluster_id"]].append(r)
    exact = [r for r in rows if r.get("rejected_by") == "dedup.exact"]
    assert exact, "the default sources hold a duplicated record: its samples must be exact duplicates"
    for members in by_cluster.values():
        reps = [m for m in members if m["provenance"]["dedup"]["is_representative"]]
        assert len(reps) == 1 and reps[0].get("rejected_by") is None
        assert all(m["provenance"]["dedup"]["representative_id"] == reps[0]["sample_id"] for m in members)
    for r in exact:
        rep = next(m for m in rows if m["sample_id"] == r["provenance"]["dedup"]["representative_id"])
        assert rep["prompt"] == r["prompt"] and r["provenance"]["source"]["record_id"] == "woodgrove-loan-dup"


def test_adversarial_variants_are_not_deduplicated_against_their_parent(project):
    rejected = read_rows(project / "data" / "deduped", "rejected")
    for r in rejected:
        assert r["provenance"]["dedup"]["representative_id"] not in r["provenance"]["generation"]["parent_ids"]
    kept = read_rows(project / "data" / "deduped")
    assert any(r["provenance"]["generation"]["method"] == "adversarial" for r in kept)


def test_difficulty_rules_fire_as_documented(project):
    for r in read_rows(project / "data" / "tagged"):
        p = r["provenance"]
        features = json.loads(p["difficulty_features"])
        if p["generation"]["method"] == "adversarial":
            assert (p["difficulty"], p["difficulty_rule"]) == ("adversarial", "method=adversarial")
        elif len(r["constraints"]) >= 3:
            assert p["difficulty"] == "hard" and p["difficulty_rule"].startswith("constraints=")
        elif features["ambiguity_markers"]:
            assert p["difficulty"] == "medium" and "ambiguity_marker" in p["difficulty_rule"]
        assert f"difficulty:{p['difficulty']}" in p["tags"]
    levels = {r["provenance"]["difficulty"] for r in read_rows(project / "data" / "tagged")}
    assert levels == {"easy", "medium", "hard", "adversarial"}


def test_split_groups_by_source_and_is_stratified(project):
    rows = read_rows(project / "data" / "split")
    split_of_source = defaultdict(set)
    for r in rows:
        split_of_source[r["provenance"]["source"]["record_id"]].add(r["provenance"]["split"])
    assert all(len(s) == 1 for s in split_of_source.values()), "a source landed in two splits"
    splits = {r["provenance"]["split"] for r in rows}
    assert splits == {"train", "validation", "test"}
    test_levels = {r["provenance"]["difficulty"] for r in rows if r["provenance"]["split"] == "test"}
    assert len(test_levels) >= 3, "stratification should give the test split most difficulty levels"


def test_split_leakage_check_fails_loudly(tmp_path):
    """Two sources holding the same text would put one text in two splits: refused, with the sample ids."""
    import contextlib

    from synthforge.engine import run_stage
    from synthforge.errors import LeakageError
    from synthforge.stagedir import StageInput
    from synthforge.stages.ingest import run_ingest
    from synthforge.stages.split import SplitStage

    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question number {i % 5}"}) + "\n" for i in range(40)))
    run_ingest(src, tmp_path / "ingested", ["prompt"])
    stage = SplitStage({"ratios": {"train": 0.5, "test": 0.5}, "group_by": "sample", "stratify_by": None}, 1, ["prompt"])
    with contextlib.chdir(tmp_path), pytest.raises(LeakageError, match="same text in"):
        run_stage(stage, StageInput.open(tmp_path / "ingested"), tmp_path / "split", {})
    assert not (tmp_path / "split").exists()


def test_a_stage_that_crashes_leaves_the_previous_output_untouched(project, tmp_path):
    import shutil

    from conftest import tree_digest

    from synthforge.engine import StageBase, run_stage
    from synthforge.stagedir import StageInput

    out = tmp_path / "judged"
    shutil.copytree(project / "data" / "judged", out)
    before = tree_digest(out)

    class Explodes(StageBase):
        def __init__(self):
            super().__init__(name="judge")

        def apply(self, rows, decisions):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        run_stage(Explodes(), StageInput.open(project / "data" / "generated"), out, {}, batch_rows=16)
    assert tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["judged"]


def test_split_assignment_is_deterministic(project, tmp_path):
    import contextlib

    from synthforge.params import load_params
    from synthforge.stages.split import run_split

    with contextlib.chdir(project):
        run_split(load_params("params.yaml"), Path("data/tagged"), tmp_path / "split")
    again = {r["sample_id"]: r["provenance"]["split"] for r in read_rows(tmp_path / "split")}
    assert again == {r["sample_id"]: r["provenance"]["split"] for r in read_rows(project / "data" / "split")}


def test_difficulty_follows_a_judges_rating_and_a_reviewer_outranks_the_model():
    from synthforge.stages.judge import result
    from synthforge.stages.tag import TagStage

    def row(*checks):
        prov = {"generation": {"method": "grounded"}, "judge": {"verdict": "pass", "checks": list(checks)}, "tags": []}
        return {"prompt": "Name the refund period.", "constraints": [], "label": "grounded_qa", "provenance": prov}

    stage = TagStage({"field": "prompt"})
    model = result("llm_judge", True, score=4, judged_by="judge@abc", difficulty="hard")
    reviewer = result("review", True, judged_by="alice", difficulty="easy")
    rated, both, unrated = row(model), row(model, reviewer), row(result("format", True))
    stage.apply([rated, both, unrated])
    assert (rated["provenance"]["difficulty"], rated["provenance"]["difficulty_rule"]) == (
        "hard",
        "judge llm_judge (judge@abc) rated hard",
    )
    assert (both["provenance"]["difficulty"], both["provenance"]["difficulty_rule"]) == (
        "easy",
        "judge review (alice) rated easy",
    )
    assert unrated["provenance"]["difficulty"] == "easy" and unrated["provenance"]["difficulty_rule"] == "no hardness feature"
