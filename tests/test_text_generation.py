"""LLM generation methods: document passages, paraphrase, source-grounded Q&A and citation cases.

The parsers and each method's rules are tested on realistic model answers through a scripted model (an object
with the LLM interface that replays fixed answers); the real backends run these methods in
test_text_recipe.py, on tiny GPT-2s.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import read_rows

from synthforge.errors import BadInput
from synthforge.text.llm_methods import parse_question_answer, parse_rewrite, reference_values
from synthforge.text.passages import load_passages

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "text-eval"


# -- passages -------------------------------------------------------------------------------------------------


def test_markdown_is_cut_at_headings_and_keeps_the_heading(tmp_path):
    (tmp_path / "policy.md").write_text(
        "# Policy\n\nIntro words "
        + "w " * 20
        + "\n\n## Refunds\n\nRefunds take 5 days "
        + "x " * 20
        + "\n\nA second paragraph "
        + "y " * 20
        + "\n\n## Stub\n\nToo short.\n"
    )
    passages = load_passages(tmp_path, max_words=30, min_words=12)
    assert [p.id for p in passages] == ["policy.md#1", "policy.md#2", "policy.md#3"]
    assert [p.title for p in passages] == ["Policy", "Refunds", "Refunds"]  # the stub section is dropped
    assert passages[1].text.startswith("Refunds take 5 days")
    assert passages[1].uri == str(tmp_path / "policy.md")


def test_short_paragraphs_of_one_section_merge_up_to_max_words(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"Paragraph {i} " + "z " * 8 for i in range(6)))
    passages = load_passages(tmp_path, max_words=40, min_words=5)
    assert [p.words for p in passages] == [40, 20]
    assert all(p.words <= 40 for p in passages)


def test_jsonl_documents_keep_their_ids(tmp_path):
    (tmp_path / "kb.jsonl").write_text(
        json.dumps({"id": "faq-1", "text": "Refunds take 5 to 7 business days.", "title": "Refunds"}) + "\n"
    )
    (p,) = load_passages(tmp_path, min_words=1)
    assert (p.id, p.title, p.text) == ("kb.jsonl#faq-1", "Refunds", "Refunds take 5 to 7 business days.")


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "no documents"),
        ({"kb.jsonl": '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n'}, "kb.jsonl:2: duplicate passage id 'a'"),
        ({"kb.jsonl": '{"id": "a"}\n'}, "kb.jsonl:1: passage 'a' needs a non-empty string 'text'"),
        ({"kb.jsonl": '{"id": "a", "text": "x"\n'}, "kb.jsonl:1: invalid JSON"),
        ({"bad.md": b"\xff\xfe not utf-8"}, "bad.md: not UTF-8"),
    ],
)
def test_bad_documents_are_named(tmp_path, files, message):
    for name, body in files.items():
        (tmp_path / name).write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(BadInput, match=message.replace("(", r"\(")):
        load_passages(tmp_path, min_words=1)


def test_the_bundled_documents_give_passages():
    passages = load_passages(RECIPE / "docs")
    assert len(passages) >= 10
    assert len({p.id for p in passages}) == len(passages)


# -- parsers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            '{"question": "How long do refunds take?", "answer": "5 to 7 business days"}',
            ("How long do refunds take?", "5 to 7 business days"),
        ),
        ('Sure! Here it is:\n```json\n{"question": "Q?", "answer": "A."}\n```', ("Q?", "A.")),
        ('{"note": 1} then {"question": "Q?", "answer": 30}', ("Q?", "30")),
        (
            "Question: When is the card charged?\nAnswer: When the order ships.\n\nHope this helps",
            ("When is the card charged?", "When the order ships."),
        ),
    ],
)
def test_question_answer_parser(raw, expected):
    assert parse_question_answer(raw) == (expected, None)


@pytest.mark.parametrize("raw", ["", "I cannot help with that.", '{"question": "", "answer": "x"}', '{"question": "Q?"}'])
def test_question_answer_parser_says_why_it_failed(raw):
    qa, problem = parse_question_answer(raw)
    assert qa is None and problem


def test_rewrite_parser_strips_chatter_fences_and_quotes():
    assert parse_rewrite('Here is the rewritten text:\n"I paid £240.00 on 2024-03-05."', "x") == (
        "I paid £240.00 on 2024-03-05.",
        None,
    )
    assert parse_rewrite("```\nNew words.\n```", "x") == ("New words.", None)
    assert parse_rewrite("  ", "x")[0] is None
    assert parse_rewrite("Same  TEXT", "same text") == (None, "the rewrite is the original text unchanged")


def test_reference_values_are_the_facts_to_keep():
    assert reference_values('{"amount": "£240.00", "date": "2024-03-05", "order_id": null}') == ["£240.00", "2024-03-05"]
    assert reference_values("not json") == []


# -- the methods, through a scripted model -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Completion:
    text: str
    model: str
    model_revision: str | None
    cached: bool = False
    finish_reason: str | None = "stop"


class ScriptedLLM:
    """The LLM interface, answering from a function of the request: the methods' logic without a model."""

    def __init__(self, answer):
        self.answer = answer
        self.model_id, self.model_revision = "scripted/model", "r1"
        self.requests = []

    @property
    def identity(self) -> str:
        return f"{self.model_id}@{self.model_revision}"

    def request(self, messages, seed=0):
        from synthforge.llm.backends import ChatRequest

        return ChatRequest(messages=tuple(tuple(m) for m in messages), seed=seed)

    def complete(self, requests, desc="llm"):
        self.requests += requests
        return [_Completion(self.answer(r), self.model_id, self.model_revision) for r in requests]


@pytest.fixture
def text_project(tmp_path):
    """The text-eval recipe's inputs with only the generate methods under test."""
    import shutil

    for name in ("sources", "prompts", "docs"):
        shutil.copytree(RECIPE / name, tmp_path / name)
    return tmp_path


def _generate(project: Path, methods: list[dict], monkeypatch, answer):
    import contextlib

    from synthforge.llm import backends
    from synthforge.params import load_params
    from synthforge.stages.generate import run_generate

    llm = ScriptedLLM(answer)
    monkeypatch.setattr(backends, "shared_llm", lambda spec, where, params_file: llm)
    params = yaml.safe_load((RECIPE / "params.yaml").read_text())
    params["generate"]["methods"] = methods
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with contextlib.chdir(project):
        stats = run_generate(load_params("params.yaml"), "data/generated")
    return llm, stats, read_rows(project / "data/generated"), read_rows(project / "data/generated", "rejected")


MODEL = {"backend": "transformers", "model": "unused"}


def test_paraphrase_keeps_facts_or_is_rejected_with_the_dropped_value(text_project, monkeypatch):
    def answer(request):
        text = request.messages[-1][1]
        if "Acme Bank" in text:  # drops the order id
            return "Here is the rewritten text:\nAcme Bank took £240.00 from me on 2024-03-05, refund it please."
        if "Northwind" in text:
            return ""
        return "Reworded: " + text.split("\n\n", 1)[1]  # keeps every value

    template = {"name": "template", "max_constraints": 1, "variants_per_record": 1}
    llm, stats, kept, rejected = _generate(
        text_project, [template, {"name": "paraphrase", "rate": 1.0, "model": MODEL}], monkeypatch, answer
    )
    paraphrases = [r for r in kept if r["provenance"]["generation"]["method"] == "paraphrase"]
    templates = {r["sample_id"]: r for r in kept if r["provenance"]["generation"]["method"] == "template"}
    assert len(paraphrases) + len(rejected) == len(templates) == len(llm.requests)
    for row in paraphrases:
        parent = templates[row["provenance"]["generation"]["parent_ids"][0]]
        assert row["reference"] == parent["reference"] and row["prompt"] != parent["prompt"]
        assert all(v in row["prompt"] for v in reference_values(row["reference"]))
        gen = row["provenance"]["generation"]
        assert (gen["model"], gen["model_revision"], gen["parsed"]) == ("scripted/model", "r1", True)
        assert (gen["prompt_template_id"], gen["prompt_version"]) == ("paraphrase", "1") and gen["prompt_hash"]
    by_reason = {r["rejected_by"] for r in rejected}
    assert by_reason == {"generate.lost_fact", "generate.unparsed"}
    lost = next(r for r in rejected if r["rejected_by"] == "generate.lost_fact")
    assert "AB-1042" in lost["reason"] and lost["provenance"]["generation"]["raw_output"].startswith("Here is")
    assert stats["by_method"]["paraphrase"]["rejected"] == len(rejected)


def test_grounded_cases_carry_their_passage(text_project, monkeypatch):
    def answer(request):
        prompt = request.messages[-1][1]
        passage = prompt.split("\n", 1)[1].split("\n\n")[0]
        if "Invoices" in prompt:
            return "I am not able to write a question."
        return json.dumps({"question": "What does the passage say?", "answer": passage.split(".")[0]})

    method = {"name": "grounded", "docs": "docs", "kinds": ["qa", "citation"], "per_passage": 2, "distractors": 2, "model": MODEL}
    llm, stats, kept, rejected = _generate(text_project, [method], monkeypatch, answer)
    with contextlib.chdir(text_project):
        passages = {p.id: p for p in load_passages("docs")}
    assert len(kept) + len(rejected) == 2 * len(passages)
    assert {r["label"] for r in kept} == {"grounded_qa", "grounded_citation"}
    for row in kept:
        source = row["provenance"]["source"]
        passage = passages[source["record_id"]]
        assert row["context"] == passage.text and source["uri"] == passage.uri
        reference = json.loads(row["reference"])
        assert reference["answer"] and passage.text.startswith(reference["answer"])
        assert "What does the passage say?" in row["prompt"] and passage.text in row["prompt"]
        if row["label"] == "grounded_citation":
            assert reference["citation"] == passage.id
            shown = json.loads(row["provenance"]["generation"]["params"])["shown_passages"]
            assert passage.id in shown and len(shown) == 3
            assert all(f"[{pid}]" in row["prompt"] for pid in shown)
    assert rejected and all(r["rejected_by"] == "generate.unparsed" for r in rejected)
    assert all(r["provenance"]["source"]["record_id"].startswith("billing-faq.md#") for r in rejected)
    assert stats["by_method"]["grounded"]["passages"] == len(passages)


def test_same_work_asks_the_same_requests(text_project, monkeypatch):
    method = {"name": "grounded", "docs": "docs", "model": MODEL}
    answer = lambda r: '{"question": "Q?", "answer": "A"}'  # noqa: E731
    first, *_ = _generate(text_project, [method], monkeypatch, answer)
    second, *_ = _generate(text_project, [method], monkeypatch, answer)
    assert first.requests == second.requests  # equal requests: the response cache answers a rerun


def test_grounded_options_are_checked(text_project, monkeypatch):
    with pytest.raises(BadInput, match=r"generate.methods\[0\].kinds: must be a non-empty list of qa, citation"):
        _generate(text_project, [{"name": "grounded", "docs": "docs", "kinds": ["essay"], "model": MODEL}], monkeypatch, str)
    with pytest.raises(BadInput, match="nowhere: document folder not found"):
        _generate(text_project, [{"name": "grounded", "docs": "nowhere", "model": MODEL}], monkeypatch, str)
