"""trace by text: the samples that match a query item (exact, n-gram, MinHash), their near-duplicates and descendants,
where each came from and which published versions hold them."""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, read_manifest, read_rows

from synthforge.content_index import INDEX_METADATA, ContentQuery, QueryItem, index_is_current, text_fields
from synthforge.errors import BadInput
from synthforge.params import load_params
from synthforge.registry import Registry
from synthforge.trace import print_trace, read_items, trace

NAME = "evalset"
VERSION = f"{NAME} v1.0.0"
FIELDS = ["prompt", "reference", "label", "locale", "context"]


# -- what the project holds, independently of trace ----------------------------------------------------------


@pytest.fixture(scope="module")
def registry(project, tmp_path_factory) -> Path:
    reg = tmp_path_factory.mktemp("registry")
    Registry(reg).publish(project / "data" / "split", NAME, "1.0.0", load_params(project / "params.yaml"), project)
    return reg


@pytest.fixture(scope="module")
def samples(project) -> dict[str, dict]:
    """Every sample the pipeline made (the generate stage's kept and rejected shards): sample_id -> row."""
    generated = project / "data" / "generated"
    return {r["sample_id"]: r for r in read_rows(generated) + read_rows(generated, "rejected")}


@pytest.fixture(scope="module")
def published(project) -> dict[str, str]:
    """sample_id -> the place that holds it in the published version."""
    return {r["sample_id"]: f"{VERSION} {r['provenance']['split']}" for r in read_rows(project / "data" / "split")}


@pytest.fixture(scope="module")
def dedup(project) -> dict[str, dict]:
    return {m["sample_id"]: m for m in read_manifest(project / "data" / "deduped")}


def tokens(text: str) -> list[str]:
    return re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())


def shingles(text: str) -> set[tuple[str, ...]]:
    words = tokens(text)
    return {tuple(words[i : i + 3]) for i in range(max(1, len(words) - 2))}


def jaccard(a: str, b: str) -> float:
    return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))


def shares_ngram(item: str, text: str, n: int = 13) -> bool:
    words, item_words = tokens(text), tokens(item)
    width = min(n, len(item_words))
    grams = {tuple(words[i : i + width]) for i in range(len(words) - width + 1)}
    return any(tuple(item_words[i : i + width]) in grams for i in range(len(item_words) - width + 1))


def same_text(a: str, b: str) -> bool:
    """Equal after NFKC, case folding and collapsing whitespace."""
    fold = lambda t: unicodedata.normalize("NFKC", t).casefold().split()  # noqa: E731
    return fold(a) == fold(b)


def matches(result) -> dict[str, object]:
    return {s.sample_id: s for s in result.samples if s.relation.startswith("match")}


def template_sample(samples: dict, published: dict) -> dict:
    """A published template sample whose prompt no other sample repeats."""
    prompts = defaultdict(int)
    for r in samples.values():
        prompts[" ".join(r["prompt"].casefold().split())] += 1
    return next(
        r
        for sid, r in sorted(samples.items())
        if sid in published and r["provenance"]["generation"]["method"] == "template"
        and prompts[" ".join(r["prompt"].casefold().split())] == 1
    )  # fmt: skip


# -- finding the matches -------------------------------------------------------------------------------------


def test_an_exact_copy_is_traced_to_its_batch_prompt_model_source_and_version(project, registry, samples, published):
    target = template_sample(samples, published)
    query = "  " + target["prompt"].upper().replace(" ", "   ") + "\n"  # case and spacing do not matter
    result = trace(project / "data", registry, texts=[query], methods=["exact"])

    assert set(matches(result)) == {target["sample_id"]}
    s = matches(result)[target["sample_id"]]
    gen, source = target["provenance"]["generation"], target["provenance"]["source"]
    assert s.relation == "match: exact (1.00, query #1)"
    assert (s.evidence[0].method, s.evidence[0].field, s.evidence[0].similarity) == ("exact", "prompt", 1.0)
    assert (s.batch_id, s.method, s.model) == (gen["batch_id"], gen["method"], gen["model"])
    assert s.model_revision == gen["model_revision"]
    assert s.prompt == f"{gen['prompt_template_id']}@{gen['prompt_version']}"
    assert s.source == f"{source['uri']}#{source['record_id']}"
    assert s.published == [published[target["sample_id"]]] and s.fate == "kept through split"
    assert published[target["sample_id"]].rsplit(" ", 1)[1] in result.versions[VERSION]


def test_every_exact_copy_is_found_also_the_rejected_ones(project, registry, samples, dedup):
    duplicate = next(m for m in dedup.values() if m["rejected_by"] == "dedup.exact")
    text = samples[duplicate["sample_id"]]["prompt"]
    result = trace(project / "data", registry, texts=[text], methods=["exact"])
    expected = {sid for sid, r in samples.items() if any(same_text(r[f], text) for f in FIELDS if r[f])}
    assert set(matches(result)) == expected and len(expected) >= 2
    rejected = matches(result)[duplicate["sample_id"]]
    assert rejected.fate == "rejected at dedup by dedup.exact" and rejected.published == []


def test_an_edited_copy_is_found_by_minhash_with_its_similarity(project, registry, samples, published):
    target = template_sample(samples, published)
    words = target["prompt"].split()
    for i in (5, 15, 25):  # three words changed
        words[i] = "zebra"
    edited = " ".join(words)
    result = trace(project / "data", registry, texts=[edited], methods=["minhash"])

    found = matches(result)
    assert target["sample_id"] in found
    for sid, s in found.items():
        e = s.evidence[0]
        assert e.method == "minhash" and e.similarity == pytest.approx(jaccard(edited, samples[sid][e.field]))
        assert e.similarity >= 0.5 and s.relation == f"match: minhash ({e.similarity:.2f}, query #1)"
    assert found[target["sample_id"]].evidence[0].similarity < 1
    # LSH misses a pair this close with probability below 1e-7: every such sample is there
    assert {sid for sid, r in samples.items() if jaccard(edited, r["prompt"]) >= 0.9} <= set(found)


def test_an_item_inside_longer_prompts_is_found_by_ngram_with_the_shared_words(project, registry, samples, published):
    target = template_sample(samples, published)
    message = target["prompt"].split("Customer message:")[1].strip()  # what a held-out item would look like
    assert len(message.split()) > 13
    result = trace(project / "data", registry, texts=[message], methods=["ngram"])

    found = matches(result)
    expected = {sid for sid, r in samples.items() if any(shares_ngram(message, r[f]) for f in FIELDS if r[f])}
    assert set(found) == expected and target["sample_id"] in expected
    e = found[target["sample_id"]].evidence[0]
    assert (e.method, e.field, e.similarity) == ("ngram", "prompt", 1.0)
    assert tokens(e.span) == tokens(message) and e.span in target["prompt"]
    assert not any(same_text(samples[sid]["prompt"], message) for sid in found), "n-gram, not exact copies"


def test_a_short_item_must_appear_whole(project, registry, samples, published):
    target = template_sample(samples, published)
    phrase = " ".join(target["prompt"].split("Customer message:")[1].split()[:6])
    found = matches(trace(project / "data", registry, texts=[phrase], methods=["ngram"]))
    assert set(found) == {sid for sid, r in samples.items() if any(shares_ngram(phrase, r[f]) for f in FIELDS if r[f])}
    assert target["sample_id"] in found
    assert not matches(trace(project / "data", registry, texts=[phrase + " zebra"], methods=["ngram"]))


def test_an_unrelated_text_matches_nothing(project, registry, capsys):
    text = "Arctic terns migrate from pole to pole every year, the longest migration of any animal on record."
    result = trace(project / "data", registry, texts=[text])
    assert result.samples == [] and result.versions == {}
    print_trace(result)
    assert "no samples match 1 query item(s) (exact, ngram, minhash)" in capsys.readouterr().out


def test_json_holds_the_evidence_the_origin_and_the_versions(project, registry, samples, published):
    target = template_sample(samples, published)
    unrelated = "Arctic terns migrate from pole to pole every year."
    result = trace(project / "data", registry, texts=[target["prompt"], unrelated])
    out = json.loads(result.to_json())

    assert out["query"] == {
        "text": [{"id": "#1", "text": target["prompt"]}, {"id": "#2", "text": unrelated}],
        "methods": ["exact", "ngram", "minhash"],
    }
    (entry,) = [s for s in out["samples"] if s["sample_id"] == target["sample_id"]]
    gen, source = target["provenance"]["generation"], target["provenance"]["source"]
    assert (entry["batch_id"], entry["model"], entry["model_revision"]) == (gen["batch_id"], gen["model"], gen["model_revision"])
    assert entry["prompt"] == f"{gen['prompt_template_id']}@{gen['prompt_version']}"
    assert entry["source"] == f"{source['uri']}#{source['record_id']}"
    assert entry["published"] == [published[target["sample_id"]]] and entry["fate"] == "kept through split"
    assert [(e["query"], e["method"], e["field"], e["similarity"]) for e in entry["evidence"]] == [
        ("#1", "exact", "prompt", 1.0),
        ("#1", "ngram", "prompt", 1.0),
        ("#1", "minhash", "prompt", 1.0),
    ]
    assert all(e["span"] == target["prompt"] for e in entry["evidence"] if e["method"] != "ngram")
    assert out["versions"] == result.versions and VERSION in out["versions"]
    assert out["samples"][0]["sample_id"] == target["sample_id"], "the strongest match comes first"


# -- from the matches to their relatives ---------------------------------------------------------------------


def test_the_descendants_of_a_match_come_along(project, registry, samples):
    children = defaultdict(set)
    for sid, r in samples.items():
        for parent in r["provenance"]["generation"]["parent_ids"]:
            children[parent].add(sid)
    parent = next(sid for sid in sorted(children) if len(children[sid]) >= 2)
    result = trace(project / "data", registry, texts=[samples[parent]["prompt"]], methods=["exact"])

    assert parent in matches(result)
    related = {s.sample_id: s for s in result.samples}
    for child in children[parent]:
        s = related[child]
        assert s.relation == f"descendant of {parent}" and s.evidence == []
        assert s.batch_id == samples[child]["provenance"]["generation"]["batch_id"]


def test_the_kept_near_duplicate_of_a_rejected_match_shows_its_versions(project, registry, samples, published, dedup):
    rejected = next(m for m in dedup.values() if m["rejected_by"] == "dedup.minhash")
    kept = rejected["provenance"]["dedup"]["representative_id"]
    result = trace(project / "data", registry, texts=[samples[rejected["sample_id"]]["prompt"]], methods=["exact"])

    assert set(matches(result)) == {rejected["sample_id"]}
    s = next(s for s in result.samples if s.sample_id == kept)
    assert s.relation == f"near-duplicate of {rejected['sample_id']}"
    assert s.published == [published[kept]] and s.fate == "kept through split" and s.evidence == []
    assert published[kept].rsplit(" ", 1)[1] in result.versions[VERSION]


# -- where the text is searched ------------------------------------------------------------------------------


def test_a_published_manifest_carries_a_current_text_index(registry):
    ((_, _, manifest),) = Registry(registry).manifests()
    schema = pq.read_schema(manifest)
    assert index_is_current(schema)
    assert schema.field("text_hash").type == pa.string() and schema.field("minhash_bands").type == pa.list_(pa.uint64())


def test_a_version_folder_without_an_index_traces_the_same(project, registry, samples, published, tmp_path):
    """A version given as a folder (a Hub revision downloaded, say), here with its index stripped: the text is
    indexed on the fly, and without stage directories the versions alone answer."""
    ((_, _, manifest),) = Registry(registry).manifests()
    folder = tmp_path / "downloaded"
    shutil.copytree(manifest.parent.parent, folder)
    table = pq.read_table(folder / "provenance" / "manifest.parquet")
    stale = {k: v for k, v in (table.schema.metadata or {}).items() if k not in INDEX_METADATA}
    pq.write_table(table.replace_schema_metadata(stale), folder / "provenance" / "manifest.parquet")
    assert not index_is_current(pq.read_schema(folder / "provenance" / "manifest.parquet"))

    target = template_sample(samples, published)
    query = [" ".join(target["prompt"].split()[:-3]) + " zebra zebra zebra"]
    indexed = trace(tmp_path / "no-stages", registry, texts=query)
    on_the_fly = trace(tmp_path / "no-stages", None, texts=query, versions=[(VERSION, folder)])
    assert target["sample_id"] in matches(indexed)
    assert [(s.sample_id, s.relation, s.evidence, s.published) for s in on_the_fly.samples] == [
        (s.sample_id, s.relation, s.evidence, s.published) for s in indexed.samples
    ]
    assert {s.fate for s in on_the_fly.samples} == {"published"}


def test_a_version_folder_without_a_manifest_is_refused(project, tmp_path):
    (tmp_path / "v9" / "data").mkdir(parents=True)
    with pytest.raises(
        BadInput, match=r"evalset v9\.0\.0: .*v9 is not a published version: provenance/manifest.parquet is missing"
    ):
        trace(project / "data", None, texts=["anything at all"], versions=[("evalset v9.0.0", tmp_path / "v9")])


def test_image_data_has_no_text_to_index():
    assert text_fields(pa.schema([("image", pa.binary()), ("label", pa.int64()), ("caption", pa.string())])) == []
    text = pa.schema([("sample_id", pa.string()), ("prompt", pa.string()), ("label_name", pa.string()), ("n", pa.int64())])
    assert text_fields(text) == ["prompt"]


# -- query items ---------------------------------------------------------------------------------------------


def test_items_from_a_file_are_named_by_id_or_line(project, registry, samples, published, tmp_path):
    target = template_sample(samples, published)
    items = tmp_path / "eval_items.jsonl"
    lines = [{"id": "q-17", "question": target["prompt"]}, {"question": "Arctic terns migrate from pole to pole."}]
    items.write_text("\n".join(json.dumps(line) for line in lines[:1]) + "\n\n" + json.dumps(lines[1]) + "\n")
    assert read_items(items, field="question") == [QueryItem("q-17", target["prompt"]), QueryItem("line 3", lines[1]["question"])]

    result = trace(project / "data", registry, texts=read_items(items, "question"))
    assert matches(result)[target["sample_id"]].relation == "match: exact (1.00, query q-17)"

    plain = tmp_path / "items.txt"
    plain.write_text("first item\n\nsecond item\n")
    assert read_items(plain) == [QueryItem("line 1", "first item"), QueryItem("line 3", "second item")]
    plain.write_text("first item\n -- \n")
    with pytest.raises(BadInput, match=r"items\.txt: line 2: no words"):
        read_items(plain)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "fine"}\n{"text": oops}\n', r"eval_items\.jsonl: line 2: not valid JSON"),
        ('{"text": "fine"}\n{"question": "x"}\n', r"eval_items\.jsonl: line 2: no words in field 'text' \(fields: question\)"),
        ('{"text": "fine"}\n{"text": " ... "}\n', r"eval_items\.jsonl: line 2: no words in field 'text' \(fields: text\)"),
        ('{"text": "fine"}\n["a list"]\n', r"eval_items\.jsonl: line 2: expected a JSON object, got list"),
        ('{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n', r"eval_items\.jsonl: line 2: duplicate id '1' \(also on line 1\)"),
        ("\n\n", r"eval_items\.jsonl: no items to trace"),
    ],
    ids=["bad-json", "no-field", "no-words", "not-an-object", "duplicate-id", "empty"],
)
def test_a_bad_items_file_names_the_file_and_line(tmp_path, content, message):
    items = tmp_path / "eval_items.jsonl"
    items.write_text(content)
    with pytest.raises(BadInput, match=message):
        read_items(items)


def test_other_file_kinds_and_missing_files_are_refused(tmp_path):
    with pytest.raises(BadInput, match=r"items\.csv: expected a \.jsonl file"):
        read_items(tmp_path / "items.csv")
    with pytest.raises(BadInput, match=r"missing\.jsonl: cannot read"):
        read_items(tmp_path / "missing.jsonl")


def test_bad_queries_are_refused(project, registry):
    with pytest.raises(BadInput, match=r"unknown match method fuzzy \(known: exact, ngram, minhash\)"):
        trace(project / "data", registry, texts=["a text"], methods=["exact", "fuzzy"])
    with pytest.raises(BadInput, match=r"query #2: no words to match"):
        trace(project / "data", registry, texts=["a text", " ... "])
    with pytest.raises(BadInput, match="exactly one of --batch, --model, --prompt-version, --sample, --text/--file"):
        trace(project / "data", registry, texts=["a text"], batch="b")
    with pytest.raises(BadInput, match="query x: the id is used twice"):
        ContentQuery([QueryItem("x", "one text"), QueryItem("x", "another text")])


# -- the command line ----------------------------------------------------------------------------------------


def test_cli_trace_text_json_matches_the_library(project, registry, samples, published, tmp_path):
    target = template_sample(samples, published)
    args = ["--data", str(project / "data"), "--registry", str(registry)]
    proc = cli("trace", "--text", target["prompt"], "--methods", "exact,minhash", "--json", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = json.loads(trace(project / "data", registry, texts=[target["prompt"]], methods=["exact", "minhash"]).to_json())
    assert out == expected
    assert out["samples"][0]["sample_id"] == target["sample_id"] and out["query"]["methods"] == ["exact", "minhash"]


def test_cli_trace_file_prints_the_matches_and_the_versions(project, registry, samples, published, tmp_path):
    target = template_sample(samples, published)
    items = tmp_path / "eval_items.jsonl"
    items.write_text(json.dumps({"id": "q-1", "question": target["prompt"]}) + "\n")
    args = ["--data", str(project / "data"), "--registry", str(registry)]
    wide = {"COLUMNS": "250"}  # a table row on one line
    proc = cli("trace", "--file", str(items), "--field", "question", *args, cwd=tmp_path, env=wide)
    assert proc.returncode == 0, proc.stderr
    expected = trace(project / "data", registry, texts=read_items(items, "question"))
    n_match = sum(s.relation.startswith("match") for s in expected.samples)
    assert f"1 query item(s) (exact, ngram, minhash): {n_match} samples," in proc.stdout
    assert "match: exact (1.00, query q-1)" in proc.stdout and target["sample_id"] in proc.stdout
    assert "versions holding these samples" in proc.stdout and VERSION in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--file", "{items}"], r"error: .*eval_items\.jsonl: line 2: not valid JSON"),
        (["--text", "a text", "--methods", "exact,fuzzy"], r"error: unknown match method fuzzy"),
        (["--text", "a text", "--file", "{items}"], r"error: trace takes --text or --file, not both"),
        (["--text", "a text", "--batch", "b"], r"error: trace needs exactly one of --batch, .*--text/--file"),
    ],
    ids=["bad-line", "bad-method", "text-and-file", "text-and-batch"],
)
def test_cli_trace_bad_input_exits_2_with_the_reason(project, registry, tmp_path, args, message):
    items = tmp_path / "eval_items.jsonl"
    items.write_text('{"text": "fine"}\n{"text": oops}\n')
    args = [a.format(items=items) for a in args]
    proc = cli("trace", *args, "--data", str(project / "data"), "--registry", str(registry), cwd=tmp_path)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
