"""Manual spot check: stratified export (CSV and HTML), import of the verdicts, and the `review` judge check."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter

import pytest
import yaml
from conftest import cli, read_rows
from test_text_checks import sample, write_params_file, write_stage

from synthforge.stages.judge import result
from synthforge.text.review import allocate, stratum

# (method, difficulty the tag stage gave, LLM judge score or None, how many)
STRATA = [
    ("template", "easy", 5, 12),
    ("template", "medium", 4, 8),
    ("template", "hard", 2, 3),
    ("grounded", "medium", 4, 6),
    ("grounded", "hard", None, 2),
    ("adversarial", "adversarial", 3, 1),
]


def _samples(tagged: bool) -> list[dict]:
    rows = []
    for method, difficulty, score, n in STRATA:
        for i in range(n):
            prompt = f"{method} {difficulty} sample {i}: what is in </script><b>this</b> message?"
            prov = {}
            if tagged:
                checks = [] if score is None else [result("llm_judge", score >= 3, "ok", score=score, judged_by="judge@1")]
                prov = {"difficulty": difficulty, "judge": {"verdict": "pass", "checks": checks}}
            rows.append(
                sample(prompt, json.dumps({"answer": str(i)}), "a passage" if method == "grounded" else None, method, **prov)
            )
    return rows


@pytest.fixture
def workdir(tmp_path):
    """A project folder with the same samples as a generate stage and as a judged-and-tagged stage."""
    write_stage(tmp_path / "data" / "generated", _samples(tagged=False))
    write_stage(tmp_path / "data" / "tagged", _samples(tagged=True), stage="tag")
    write_params_file(tmp_path, {"name": "required_fields", "fields": ["prompt"]})
    return tmp_path


def _read_csv(path):
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path, rows):
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_allocation_gives_every_stratum_one_and_the_rest_by_size():
    sizes = {"big": 100, "mid": 10, "rare": 1}
    take = allocate(sizes, 20)
    assert sum(take.values()) == 20 and all(take[k] >= 1 for k in sizes)
    assert take["big"] > take["mid"] > 0 and take["rare"] == 1
    assert allocate(sizes, 2) == {"big": 1, "mid": 1, "rare": 1}  # every stratum is seen, even past n
    assert allocate(sizes, 500) == sizes


def test_export_import_and_judge_round_trip(workdir):
    tagged = {r["sample_id"]: r for r in read_rows(workdir / "data" / "tagged")}
    done = cli("review", "export", "--in", "data/tagged", "--out", "review.csv", "--n", "12", "--seed", "3", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "12 samples from 6 strata" in done.stdout
    exported = _read_csv(workdir / "review.csv")
    header = ["sample_id", "method", "difficulty", "judge_score", "prompt", "reference", "context", "verdict", "rating", "notes"]
    assert list(exported[0]) == header
    assert len(exported) == 12 and all(r["verdict"] == r["notes"] == "" for r in exported)
    # Every stratum is in the sample, the large ones more often; what the reviewer sees is the sample's content.
    seen = Counter(stratum(tagged[r["sample_id"]]) for r in exported)
    assert set(seen) == {stratum(r) for r in tagged.values()}
    assert seen[("template", "easy", "score 5")] > seen[("template", "hard", "score 2")] >= 1
    assert all(r["prompt"] == tagged[r["sample_id"]]["prompt"] for r in exported)
    assert {r["judge_score"] for r in exported} == {"5", "4", "2", "3", ""}
    again = cli("review", "export", "--in", "data/tagged", "--out", "again.csv", "--n", "12", "--seed", "3", cwd=workdir)
    assert again.returncode == 0 and (workdir / "again.csv").read_text() == (workdir / "review.csv").read_text()

    failed, passed = exported[:2], exported[2]
    for r in failed:
        r["verdict"], r["notes"] = "fail", f"the reference is wrong for {r['sample_id'][:6]}"
    passed["verdict"], passed["rating"] = "Pass ", "Hard"  # as a person types it
    _write_csv(workdir / "filled.csv", exported)
    done = cli("review", "import", "filled.csv", "--reviewer", "alice", "--in", "data/tagged", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "recorded 3 verdicts by alice (1 pass, 2 fail; 9 blank rows skipped)" in done.stdout
    assert "dvc repro" in done.stdout
    ledger = [json.loads(line) for line in (workdir / "reviews" / "verdicts.jsonl").read_text().splitlines()]
    assert {e["sample_id"]: (e["verdict"], e["reviewer"]) for e in ledger} == {
        failed[0]["sample_id"]: ("fail", "alice"),
        failed[1]["sample_id"]: ("fail", "alice"),
        passed["sample_id"]: ("pass", "alice"),
    }

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["judge"]["checks"].append({"name": "review", "ledger": "reviews/verdicts.jsonl"})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = cli("judge", "--in", "data/generated", "--out", "data/judged", cwd=workdir)
    assert done.returncode == 0, done.stderr

    judged = workdir / "data" / "judged"
    rejected = {r["sample_id"]: r for r in read_rows(judged, "rejected")}
    for r in failed:
        row = rejected[r["sample_id"]]
        assert row["rejected_by"] == "judge.review" and row["reason"] == r["notes"]
        (review,) = [c for c in row["provenance"]["judge"]["checks"] if c["name"] == "review"]
        assert review["verdict"] == "fail" and review["judged_by"] == "alice"
    kept = {r["sample_id"]: r for r in read_rows(judged)}
    reviews = [c for c in kept[passed["sample_id"]]["provenance"]["judge"]["checks"] if c["name"] == "review"]
    assert [(c["judged_by"], c["difficulty"]) for c in reviews] == [("alice", "hard")]  # the tag stage uses the rating
    assert len(kept) == len(tagged) - 2
    unreviewed = [r for sid, r in kept.items() if sid not in {e["sample_id"] for e in ledger}]
    assert all(c["name"] != "review" for r in unreviewed for c in r["provenance"]["judge"]["checks"])
    stage = json.loads((judged / "stage.json").read_text())
    assert stage["inputs"]["review:reviews/verdicts.jsonl"]  # a new verdict reruns the judge

    # Bob reviews one of Alice's failures again: the ledger keeps the latest verdict.
    _write_csv(workdir / "bob.csv", [{"sample_id": failed[0]["sample_id"], "verdict": "pass", "notes": "fine after all"}])
    done = cli("review", "import", "bob.csv", "--reviewer", "bob", cwd=workdir)
    assert done.returncode == 0 and "1 replacing earlier verdicts" in done.stdout
    ledger = [json.loads(line) for line in (workdir / "reviews" / "verdicts.jsonl").read_text().splitlines()]
    assert len(ledger) == 3 and ledger[-1]["reviewer"] == "bob" and ledger[-1]["verdict"] == "pass"


def test_html_export_shows_every_sampled_id_and_needs_nothing_else(workdir):
    args = ["review", "export", "--in", "data/tagged", "--n", "8", "--seed", "5", "--reviewer-fields", "prompt,label"]
    assert cli(*args, "--out", "review.csv", cwd=workdir).returncode == 0
    done = cli(*args, "--out", "review.html", cwd=workdir)
    assert done.returncode == 0, done.stderr
    ids = [r["sample_id"] for r in _read_csv(workdir / "review.csv")]
    page = (workdir / "review.html").read_text()
    assert all(page.count(f'data-sample="{sid}"') == 1 for sid in ids)
    assert page.count('type="radio"') == 2 * len(ids) and page.count("<textarea") == page.count("<select>") == len(ids)
    assert not re.search(r"(src|href)=|<link|@import|https?://", page)  # no external assets
    assert "new Blob(" in page and "Download verdicts (CSV)" in page
    # The data block the download button turns into CSV is intact, even with markup inside samples.
    data = json.loads(re.search(r'<script type="application/json" id="samples">(.*?)</script>', page, re.S)[1])
    assert data["header"] == ["sample_id", "method", "difficulty", "judge_score", "prompt", "label", "verdict", "rating", "notes"]
    assert [r["sample_id"] for r in data["records"]] == ids
    assert not [p for p in (workdir).iterdir() if p.name.startswith(".review")]  # no temp files left behind


def test_bad_review_files_are_refused_naming_file_and_row(workdir):
    ids = [r["sample_id"] for r in read_rows(workdir / "data" / "tagged")][:3]
    ledger = workdir / "reviews" / "verdicts.jsonl"
    ledger.parent.mkdir()
    ledger.write_text(json.dumps({"sample_id": ids[0], "verdict": "pass", "notes": "", "reviewer": "carol"}) + "\n")
    before = ledger.read_bytes()
    rows = [
        {"sample_id": ids[0], "verdict": "fail", "notes": "ok row"},
        {"sample_id": "0123456789abcdef0123", "verdict": "fail", "notes": "not a sample of this set"},
        {"sample_id": ids[1], "verdict": "maybe", "notes": ""},
        {"sample_id": ids[0], "verdict": "pass", "notes": "twice"},
    ]
    _write_csv(workdir / "filled.csv", rows)
    done = cli("review", "import", "filled.csv", "--reviewer", "dan", "--in", "data/tagged", cwd=workdir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "3 invalid row(s), nothing recorded" in done.stderr
    assert "filled.csv: row 3: unknown sample_id 0123456789abcdef0123" in done.stderr
    assert "filled.csv: row 4: verdict must be pass, fail or blank, got 'maybe'" in done.stderr
    assert f"filled.csv: row 5: duplicate sample_id {ids[0]} (also row 2)" in done.stderr
    assert ledger.read_bytes() == before

    (workdir / "nocol.csv").write_text("id,verdict\nx,pass\n")
    done = cli("review", "import", "nocol.csv", "--reviewer", "dan", cwd=workdir)
    assert done.returncode == 2 and "nocol.csv: row 1: missing column(s) sample_id" in done.stderr
    assert ledger.read_bytes() == before


def test_export_refuses_unknown_fields_and_formats(workdir):
    done = cli("review", "export", "--in", "data/tagged", "--out", "r.csv", "--reviewer-fields", "prompt,answer", cwd=workdir)
    assert done.returncode == 2 and "--reviewer-fields: data/tagged has no column 'answer'" in done.stderr
    done = cli("review", "export", "--in", "data/tagged", "--out", "r.xlsx", cwd=workdir)
    assert done.returncode == 2 and "write a .csv or an .html file" in done.stderr
    assert not (workdir / "r.csv").exists()


def test_the_review_check_without_a_ledger_judges_nothing_and_a_broken_ledger_is_refused(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["judge"]["checks"].append({"name": "review"})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = cli("judge", "--in", "data/generated", "--out", "data/judged2", cwd=workdir)
    assert done.returncode == 0, done.stderr
    judged = read_rows(workdir / "data" / "judged2")
    assert len(judged) == sum(n for *_, n in STRATA)
    assert all([c["name"] for c in r["provenance"]["judge"]["checks"]] == ["required_fields"] for r in judged)

    (workdir / "reviews").mkdir()
    (workdir / "reviews" / "verdicts.jsonl").write_text('{"sample_id": "ab", "verdict": "fail", "reviewer": "x"}\n{oops\n')
    done = cli("judge", "--in", "data/generated", "--out", "data/judged3", cwd=workdir)
    assert done.returncode == 2 and "reviews/verdicts.jsonl:2: invalid JSON" in done.stderr
    assert not (workdir / "data" / "judged3").exists()


def test_a_bad_rating_and_a_non_utf8_file_are_refused(workdir):
    sid = read_rows(workdir / "data" / "tagged")[0]["sample_id"]
    _write_csv(workdir / "bad.csv", [{"sample_id": sid, "verdict": "pass", "rating": "trivial", "notes": ""}])
    done = cli("review", "import", "bad.csv", "--reviewer", "alice", cwd=workdir)
    assert done.returncode == 2 and "bad.csv: row 2: rating must be easy, medium, hard or blank, got 'trivial'" in done.stderr
    (workdir / "latin1.csv").write_bytes(f"sample_id,verdict,notes\n{sid},fail,caf\xe9\n".encode("latin-1"))
    done = cli("review", "import", "latin1.csv", "--reviewer", "alice", cwd=workdir)
    assert done.returncode == 2 and "latin1.csv: not UTF-8 text" in done.stderr
    assert not (workdir / "reviews" / "verdicts.jsonl").exists()


def test_exported_cells_never_run_as_spreadsheet_formulas(workdir):
    from synthforge.text.review import _cell

    assert _cell('=HYPERLINK("http://x")') == '\'=HYPERLINK("http://x")'
    assert _cell("-1 refund") == "'-1 refund" and _cell("plain") == "plain"
