"""Decontamination against protected eval sets: planted copies are rejected with the evidence, clean samples pass."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_rows
from test_semantic_dedup import dedup_params, sid, write_stage

from synthforge.errors import BadInput
from synthforge.text.decontam import load_protected_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVAL = [
    {"id": "exam-001", "prompt": "Explain in detail why the sky appears blue during the day but turns red and orange at sunset."},
    {
        "id": "exam-002",
        "prompt": "A train leaves Boston at six in the morning and travels toward New York at a steady speed of sixty miles "
        "per hour while a second train leaves New York at seven travelling toward Boston at forty miles per hour. "
        "When do they meet?",
    },
    {
        "id": "exam-003",
        "prompt": "List the three branches of the United States government and describe the main responsibility of each one.",
    },
    {"id": "exam-004", "prompt": "Which city is the capital of France?"},
    {"id": "exam-005", "prompt": "Who painted the Mona Lisa?"},
]

SAMPLES = [
    "Write a haiku about autumn leaves.",
    # exact copy, but for case and punctuation
    "explain in detail: why the sky appears BLUE during the day, but turns red and orange at sunset",
    # near-exact: two words changed, case and punctuation changed
    "a TRAIN leaves boston at 6 in the morning and travels toward New-York at a steady speed of sixty miles per hour, "
    "while a second train leaves new york at seven, going toward Boston at forty miles per hour... when do they meet??",
    # the item embedded in a longer prompt
    "I'm studying for a civics test. List the three branches of the United States government and describe the main "
    "responsibility of each one. Use bullet points.",
    # reworded: no shared run of words, caught by embeddings only
    "What is the capital of France?",
    # a short eval item inside a longer prompt
    "Quick art quiz: who painted the Mona Lisa? Answer in one word.",
    "How can I reset my router password?",
    "Describe the water cycle for a ten year old.",
]
CLEAN = {0, 6, 7}


def write_eval(path, items=EVAL):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def decontaminate(tmp_path, name="deduped", **options):
    from synthforge.stages.dedup import run_dedup

    if not (tmp_path / "judged").exists():
        write_stage(tmp_path / "judged", SAMPLES)
        write_eval(tmp_path / "protected" / "eval.jsonl")
    sets = options.pop("sets", [{"name": "exam", "path": str(tmp_path / "protected" / "eval.jsonl"), "id_field": "id"}])
    params = dedup_params(decontaminate={"sets": sets, **options})
    stats = run_dedup(params, tmp_path / "judged", tmp_path / name)
    rows = {r["sample_id"]: r for kind in ("samples", "rejected") for r in read_rows(tmp_path / name, kind)}
    return stats, rows


def test_planted_eval_items_are_rejected_with_the_evidence(tmp_path):
    stats, rows = decontaminate(tmp_path)
    expected = {1: ("exam-001", "exact"), 2: ("exam-002", "ngram"), 3: ("exam-003", "ngram"), 4: ("exam-004", "embedding")}
    expected[5] = ("exam-005", "ngram")
    for k, (item, method) in expected.items():
        row = rows[sid(k)]
        found = row["provenance"]["contamination"]
        assert row["rejected_by"] == "dedup.contaminated", k
        assert (found["matched"], found["eval_set"], found["eval_item_id"], found["method"]) == (True, "exam", item, method)
        assert f"item {item} of protected set 'exam' ({method} match" in row["reason"]
        assert row["provenance"]["dedup"] is None  # takes no part in clustering
    evidence = {k: rows[sid(k)]["provenance"]["contamination"] for k in expected}
    assert evidence[1]["span"] == SAMPLES[1]
    # The longest shared run, in the sample's own words: it stops at the changed words "6" and "going".
    assert evidence[2]["span"] == (
        "in the morning and travels toward New-York at a steady speed of sixty miles per hour, while a second train "
        "leaves new york at seven"
    )
    assert evidence[3]["span"] == EVAL[2]["prompt"].rstrip(".")
    assert evidence[4]["span"] == EVAL[3]["prompt"] and evidence[4]["similarity"] >= 0.9
    assert "cosine" in rows[sid(4)]["reason"] and '"Which city is the capital of France?"' in rows[sid(4)]["reason"]
    assert evidence[5]["span"] == "who painted the Mona Lisa" and evidence[5]["similarity"] is None
    assert stats["contaminated"] == {"total": 5, "by_set": {"exam": {"embedding": 1, "exact": 1, "ngram": 3}}}
    assert stats["decontamination"]["sets"]["exam"]["items"] == 5 and stats["decontamination"]["ngram"] == 13


def test_clean_samples_pass_and_record_what_was_checked(tmp_path):
    _, rows = decontaminate(tmp_path)
    for k in CLEAN:
        row = rows[sid(k)]
        assert not row.get("rejected_by")
        assert row["provenance"]["contamination"] == {
            "checked_sets": ["exam"],
            "ngram": 13,
            "matched": False,
            "eval_set": None,
            "eval_item_id": None,
            "method": None,
            "span": None,
            "similarity": None,
        }
        assert row["provenance"]["dedup"]["is_representative"]


def test_without_embeddings_a_reworded_item_is_not_caught_by_ngrams(tmp_path):
    stats, rows = decontaminate(tmp_path, embedding_threshold=None)
    assert not rows[sid(4)].get("rejected_by") and rows[sid(4)]["provenance"]["contamination"]["matched"] is False
    assert stats["contaminated"]["total"] == 4 and stats["decontamination"]["encoder"] is None


def test_a_saved_hf_dataset_and_a_local_dataset_folder_are_protected_sets(tmp_path):
    import datasets

    test = datasets.Dataset.from_dict({"qid": ["t1", "t2"], "question": [EVAL[0]["prompt"], EVAL[4]["prompt"]]})
    train = datasets.Dataset.from_dict({"qid": ["x1"], "question": ["Describe the water cycle for a ten year old."]})
    datasets.DatasetDict({"test": test, "train": train}).save_to_disk(tmp_path / "saved")
    write_eval(tmp_path / "folder" / "test.jsonl", [{"question": EVAL[2]["prompt"]}])
    sets = [
        {"name": "saved", "hf": str(tmp_path / "saved"), "split": "test", "fields": ["question"], "id_field": "qid"},
        {"name": "folder", "hf": str(tmp_path / "folder"), "split": "test", "fields": ["question"]},
    ]
    stats, rows = decontaminate(tmp_path, sets=sets, embedding_threshold=None)
    assert [rows[sid(k)]["provenance"]["contamination"]["eval_item_id"] for k in (1, 5, 3)] == ["t1", "t2", "0"]
    assert rows[sid(3)]["provenance"]["contamination"]["eval_set"] == "folder"
    assert not rows[sid(7)].get("rejected_by"), "the train split is not the protected one"
    assert stats["contaminated"]["by_set"] == {"folder": {"ngram": 1}, "saved": {"exact": 1, "ngram": 1}}
    with pytest.raises(BadInput, match=r"saved: has splits test, train; choose one with `split`"):
        load_protected_set(
            {"name": "saved", "hf": str(tmp_path / "saved"), "fields": ["question"]}, ["prompt"], "x", "params.yaml"
        )


def test_editing_the_eval_set_changes_the_dedup_fingerprint(tmp_path):
    decontaminate(tmp_path, name="first")
    decontaminate(tmp_path, name="again")
    write_eval(tmp_path / "protected" / "eval.jsonl", [*EVAL[:4], {"id": "exam-005", "prompt": "Who sculpted David?"}])
    _, rows = decontaminate(tmp_path, name="edited")
    info = {name: json.loads((tmp_path / name / "stage.json").read_text()) for name in ("first", "again", "edited")}
    assert info["first"]["fingerprint"] == info["again"]["fingerprint"]
    assert info["first"]["fingerprint"] != info["edited"]["fingerprint"]
    assert info["first"]["inputs"]["protected:exam"] != info["edited"]["inputs"]["protected:exam"]
    assert not rows[sid(5)].get("rejected_by")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt"])
def test_every_file_format_loads_ids_and_texts(tmp_path, suffix):
    items = [{"id": "a", "prompt": "first item"}, {"id": "b", "prompt": "second, item"}]
    path = tmp_path / f"eval{suffix}"
    if suffix == ".jsonl":
        write_eval(path, items)
    elif suffix == ".json":
        path.write_text(json.dumps(items))
    elif suffix == ".csv":
        path.write_text('id,prompt\na,first item\nb,"second, item"\n')
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(items), path)
    else:
        path.write_text("first item\n\nsecond, item\n")
    spec = {"name": "e", "path": str(path)} | ({} if suffix == ".txt" else {"id_field": "id"})
    loaded = load_protected_set(spec, ["prompt"], "dedup.decontaminate.sets[0]", "params.yaml")
    assert loaded.ids == (["1", "3"] if suffix == ".txt" else ["a", "b"])
    assert loaded.texts == ["first item", "second, item"]


BAD_SETS = [
    ("eval.jsonl", '{"id": 1, "prompt": "a b"}\n{"id": 2, "prompt": "c d"\n', {}, "line 2: not valid JSON"),
    (
        "eval.jsonl",
        '{"id": 1, "prompt": "a b"}\n{"id": 2, "question": "c"}\n',
        {},
        r"line 2: no field 'prompt' \(has: id, question\)",
    ),
    (
        "eval.jsonl",
        '{"id": "q1", "prompt": "a"}\n{"id": "q2", "prompt": "b"}\n{"id": "q1", "prompt": "c"}\n',
        {},
        "line 3: duplicate id 'q1' \\(also at line 1\\)",
    ),
    ("eval.jsonl", '{"prompt": "a"}\n', {}, "line 1: no field 'id'"),
    ("eval.jsonl", '{"id": 1, "prompt": "?!"}\n', {}, "line 1: no words in prompt"),
    ("eval.jsonl", "\n\n", {}, "the protected set is empty"),
    ("eval.jsonl", b"\xff\xfe broken", {}, "cannot read"),
    ("eval.csv", "id,question\n1,what\n", {}, "line 2: no field 'prompt'"),
    ("eval.json", '{"id": 1}', {}, "expected a JSON array of objects, got dict"),
    ("eval.json", '[{"id": 1, "prompt": "a"}, "b"]', {}, "row 1: expected an object with fields, got str"),
    ("eval.parquet", b"not parquet", {}, "not a readable Parquet file"),
    ("eval.txt", "a\n", {"fields": ["prompt"]}, r"sets\[0\]\.fields: .*eval.txt: a \.txt set has one item per line"),
    ("eval.xlsx", "a", {}, "unknown format '.xlsx'"),
    (
        "eval.jsonl",
        '{"id": 1, "prompt": "a"}\n',
        {"split": "test"},
        r"sets\[0\]\.split: .*eval.jsonl: a split belongs to an HF dataset",
    ),
]


@pytest.mark.parametrize(("name", "content", "extra", "message"), BAD_SETS)
def test_a_bad_set_file_is_refused_naming_file_row_and_problem(tmp_path, name, content, extra, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    spec = {"name": "e", "path": str(path)} | ({} if name.endswith(".txt") else {"id_field": "id"}) | extra
    with pytest.raises(BadInput, match=message) as err:
        load_protected_set(spec, ["prompt"], "dedup.decontaminate.sets[0]", "params.yaml")
    assert str(err.value).startswith("params.yaml: dedup.decontaminate.sets[0]")
    assert str(path) in str(err.value)


def test_a_missing_set_file_stops_dedup_before_it_writes(tmp_path):
    from synthforge.stages.dedup import run_dedup

    write_stage(tmp_path / "judged", SAMPLES[:2])
    params = dedup_params(decontaminate={"sets": [{"name": "exam", "path": "nowhere/eval.jsonl"}]})
    with pytest.raises(BadInput, match=r"params.yaml: dedup.decontaminate.sets\[0\].path: nowhere/eval.jsonl: no such file"):
        run_dedup(params, tmp_path / "judged", tmp_path / "deduped")
    assert not (tmp_path / "deduped").exists()


def test_a_reworded_item_inside_a_long_prompt_is_caught_by_its_sentence(tmp_path):
    """A grounded case wraps the question in an instruction and a passage: the whole prompt embeds far from the
    eval item, the question on its own close to it."""
    wrapped = (
        "Answer the question using only the passage below. If the passage does not answer it, say so.\n\nPassage:\n"
        "Refunds go back to the original payment method. Card refunds appear within 5 to 7 business days after we "
        "approve them. Bank transfers take up to 10 business days. Store credit is issued at once and never expires.\n\n"
        "Question: What is the capital of France?"
    )
    write_stage(tmp_path / "judged", [wrapped, "Describe the water cycle for a ten year old."])
    write_eval(tmp_path / "protected" / "eval.jsonl")
    _, rows = decontaminate(tmp_path, embedding_threshold=0.9)
    found = rows[sid(0)]["provenance"]["contamination"]
    assert rows[sid(0)]["rejected_by"] == "dedup.contaminated"
    assert (found["eval_item_id"], found["method"]) == ("exam-004", "embedding") and found["similarity"] >= 0.9
    assert rows[sid(1)]["provenance"]["contamination"]["matched"] is False


def test_a_misspelt_field_is_refused_not_read_as_empty(tmp_path):
    """Reading a missing column as "" would mark every sample clean: the quiet contamination this stage exists for."""
    with pytest.raises(BadInput, match=r"dedup.decontaminate.fields: no column 'promt' in .*judged \(columns: "):
        sets = [{"name": "exam", "path": str(tmp_path / "protected" / "eval.jsonl"), "id_field": "id", "fields": ["prompt"]}]
        decontaminate(tmp_path, fields=["promt"], sets=sets)
    assert not (tmp_path / "deduped").exists()
