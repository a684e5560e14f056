"""The text-eval recipe end to end on the tiny local models: what each LLM step leaves in provenance, and that the
recipe's protected eval set really protects (a planted copy of a held-out item is caught through the CLI)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import cli, read_manifest, read_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_llm_methods_record_model_prompt_and_raw_output(project, generator_lm):
    made = read_manifest(project / "data" / "generated")
    by_method = {}
    for m in made:
        by_method.setdefault(m["provenance"]["generation"]["method"], []).append(m)
    assert set(by_method) == {"template", "paraphrase", "grounded", "adversarial"}
    for method in ("paraphrase", "grounded"):
        for m in by_method[method]:
            gen = m["provenance"]["generation"]
            assert gen["model"] == str(generator_lm) and gen["model_revision"]
            assert gen["raw_output"] is not None and gen["parsed"] in (True, False)
            assert gen["prompt_template_id"] == {"paraphrase": "paraphrase", "grounded": "grounded-qa"}[method]
            assert m["kept"] or m["rejected_by"] in ("generate.unparsed", "generate.lost_fact", "generate.truncated")
    for m in by_method["grounded"]:
        source = m["provenance"]["source"]
        assert source["uri"].startswith("docs/") and source["record_id"].split("#")[0] in source["uri"]


def test_grounded_samples_carry_their_passage(project):
    rows = read_rows(project / "data" / "generated") + read_rows(project / "data" / "generated", "rejected")
    grounded = [r for r in rows if r["provenance"]["generation"]["method"] == "grounded"]
    assert grounded and all(r["context"] for r in grounded)
    assert all(not r["context"] for r in rows if r["provenance"]["generation"]["method"] == "template")


def test_every_judged_sample_has_the_llm_judges_verdict_by_the_judge_model(project, judge_lm):
    for m in read_manifest(project / "data" / "judged"):
        checks = {c["name"]: c for c in m["provenance"]["judge"]["checks"]}
        judge = checks["llm_judge"]
        assert judge["judged_by"].startswith(f"{judge_lm}@") and judge["raw_output"] is not None
        assert "safety" in checks and "format" in checks
    stats = json.loads((project / "data" / "judged" / "stats.json").read_text())
    assert stats["llm_judge"]["self_judged"] is False


def test_every_deduped_sample_was_checked_against_the_protected_set(project):
    for m in read_manifest(project / "data" / "deduped"):
        contamination = m["provenance"]["contamination"]
        assert contamination["checked_sets"] == ["support-eval-heldout"] and contamination["ngram"] == 13


def test_a_planted_copy_of_a_held_out_item_is_caught_with_the_evidence(project, tmp_path):
    work = tmp_path / "proj"
    shutil.copytree(project, work, ignore=shutil.ignore_patterns(".git", ".dvc"))
    kept = read_rows(work / "data" / "judged")
    victim = next(r for r in kept if r["provenance"]["generation"]["method"] == "template")
    message = victim["prompt"].split("Customer message:\n", 1)[1]
    with (work / "protected" / "eval.jsonl").open("a") as fh:
        fh.write(json.dumps({"id": "planted-copy", "text": message, "answer": victim["reference"]}) + "\n")

    result = cli("dedup", "--in", "data/judged", "--out", "data/deduped", cwd=work)
    assert result.returncode == 0, result.stderr
    rejected = {r["sample_id"]: r for r in read_rows(work / "data" / "deduped", "rejected")}
    caught = rejected[victim["sample_id"]]
    assert caught["rejected_by"] == "dedup.contaminated" and "planted-copy" in caught["reason"]
    evidence = caught["provenance"]["contamination"]
    assert (evidence["eval_set"], evidence["eval_item_id"], evidence["matched"]) == ("support-eval-heldout", "planted-copy", True)
    assert evidence["method"] in ("exact", "ngram") and evidence["span"] and evidence["span"] in victim["prompt"]
    # Every sample made from the same customer message carries it, so each one is caught, not just the first.
    same_message = [r for r in kept if r["prompt"].endswith(message)]
    assert all(rejected.get(r["sample_id"], {}).get("rejected_by") == "dedup.contaminated" for r in same_message)
    others = [r for r in kept if not r["prompt"].endswith(message) and r["provenance"]["generation"]["method"] == "template"]
    assert others and not any(rejected.get(r["sample_id"], {}).get("rejected_by") == "dedup.contaminated" for r in others)
