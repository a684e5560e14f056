"""The LLM backends: transformers in process, and an OpenAI-compatible HTTP server (a real `transformers serve`
on 127.0.0.1, behind a proxy that fails or stalls requests on demand), with the response cache in front of both."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from tiny_llm import free_port

from synthforge.errors import BadInput, SynthforgeError
from synthforge.llm.backends import ChatRequest, LLMServerError, OpenAICompatibleLLM, TransformersLLM, build_llm
from synthforge.llm.cache import FILENAME
from synthforge.llm.models import local_revision

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QA = (
    ("system", "You write exam questions grounded in a source passage."),
    (
        "user",
        "Write one question and its answer about this passage. Reply with JSON with keys question and answer.\n\n"
        "Passage: The old mill stands near the coast since 1850. It is known for its red roof.",
    ),
)
PARAPHRASE = (
    ("user", "Paraphrase the following text in one paragraph:\n\nThe river lies in the valley. Farmers sell apples there."),
)
JUDGE = (
    ("system", "You are a strict judge of evaluation data."),
    (
        "user",
        "Judge this sample against the rubric.\nRubric: The question is clear.\nSample: Question: Where is it?\nAnswer: Here.",
    ),
)
PASSAGES = [
    "The lighthouse sits on a quiet hill every summer. Visitors come to see the garden.",
    "A small village grew beside the forest after the storm. The walls are made of stone.",
    "The bridge opened in the valley in the spring. It was rebuilt after a fire.",
    "The orchard lies at the end of the road for many years. Farmers sell apples there.",
]
# Prompts of different lengths, so that batches are padded.
MANY = [QA, PARAPHRASE] + [(("user", f"Read the passage and write a question and answer about it.\n\n{p}"),) for p in PASSAGES]
SECRET = "sk-test-SECRET123"


@pytest.fixture(scope="module")
def local(generator_lm):
    return TransformersLLM(str(generator_lm), max_new_tokens=48, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def one_by_one(generator_lm):
    return TransformersLLM(str(generator_lm), max_new_tokens=48, device="cpu", batch_size=1)


@pytest.fixture(scope="module")
def greedy_one_by_one(one_by_one):
    return one_by_one.complete([one_by_one.request(m) for m in MANY])


def with_template(generator_lm, folder, template: str | None):
    """A copy of generator_lm with another chat template, or none."""
    shutil.copytree(generator_lm, folder)
    (folder / "chat_template.jinja").unlink()
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def http_llm(base_url, model, **options):
    return OpenAICompatibleLLM(str(model), base_url, max_new_tokens=48, **options)


# ---- the tiny models ---------------------------------------------------------------------------------------------


def test_tiny_models_write_the_formats_they_were_trained_on(local, judge_lm):
    def parsed(texts):
        out = []
        for text in texts:
            try:
                out.append(json.loads(text))
            except json.JSONDecodeError:
                continue
        return out

    # A tiny model is not reliable on any one answer: most of a handful must have the shape.
    sampled = TransformersLLM(str(local.model_id), max_new_tokens=96, temperature=0.7, device="cpu", batch_size=1)
    answers = [c.text for c in sampled.complete([sampled.request(QA, seed=s) for s in range(6)])]
    qa = parsed(answers)
    assert len(qa) >= 3 and all(set(a) == {"question", "answer"} for a in qa), answers
    (paraphrase,) = local.complete([local.request(PARAPHRASE)])
    assert paraphrase.text.strip() and not paraphrase.text.startswith("{")
    judge = TransformersLLM(str(judge_lm), max_new_tokens=48, temperature=0.8, device="cpu")
    verdicts = [v.text for v in judge.complete([judge.request(JUDGE, seed=s) for s in range(8)])]
    scored = parsed(verdicts)
    assert len(scored) >= 4, verdicts
    assert all(p["score"] in range(1, 6) and p["difficulty"] in ("easy", "medium", "hard") for p in scored)


# ---- transformers in process -------------------------------------------------------------------------------------


def test_batched_greedy_equals_one_by_one(local, greedy_one_by_one):
    batched = local.complete([local.request(m) for m in MANY])
    assert [(c.text, c.finish_reason) for c in batched] == [(c.text, c.finish_reason) for c in greedy_one_by_one]
    assert {c.finish_reason for c in batched} <= {"stop", "length"}
    assert not any(c.cached for c in batched)


def test_finish_reason_tells_an_answer_cut_short(generator_lm, greedy_one_by_one):
    # An answer that ended on its own, asked again with room for 3 tokens only.
    messages, whole = next((m, c) for m, c in zip(MANY, greedy_one_by_one, strict=True) if c.finish_reason == "stop")
    short = TransformersLLM(str(generator_lm), max_new_tokens=3, device="cpu")
    (cut,) = short.complete([short.request(messages)])
    assert cut.finish_reason == "length" and whole.text.startswith(cut.text) and len(cut.text) < len(whole.text)


def test_chat_template_is_used(local):
    assert local.uses_chat_template
    prompt = local.prompt(QA)
    assert prompt.startswith("<|system|>\nYou write exam questions")
    assert "<|user|>\nWrite one question" in prompt and prompt.endswith("<|assistant|>\n")


def test_template_that_refuses_a_system_role_gets_it_in_the_user_turn(generator_lm, tmp_path):
    template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    llm = TransformersLLM(str(with_template(generator_lm, tmp_path / "lm", template)), max_new_tokens=8, device="cpu")
    prompt = llm.prompt(QA)
    assert "<|system|>" not in prompt
    assert prompt.startswith(f"<|user|>\n{QA[0][1]}\n\n{QA[1][1]}\n")
    with pytest.raises(BadInput, match="chat template refuses the messages: System role not supported"):
        llm.prompt((("system", "only instructions"),))


def test_tokenizer_without_chat_template_gets_a_plain_prompt(generator_lm, tmp_path):
    folder = with_template(generator_lm, tmp_path / "lm", None)
    llm = TransformersLLM(str(folder), max_new_tokens=16, device="cpu", batch_size=4)
    assert not llm.uses_chat_template
    assert llm.prompt(QA) == f"system: {QA[0][1]}\n\nuser: {QA[1][1]}\n\nassistant:"
    batched = llm.complete([llm.request(m) for m in MANY])
    single = TransformersLLM(str(folder), max_new_tokens=16, device="cpu", batch_size=1)
    assert [c.text for c in batched] == [c.text for c in single.complete([single.request(m) for m in MANY])]
    assert llm.model_revision != local_revision(generator_lm)  # another template is another model


def test_identity_pins_the_content_of_the_model_folder(local, generator_lm, judge_lm):
    revision = local_revision(generator_lm)
    assert local.identity == f"{generator_lm}@{revision}"
    (completion,) = local.complete([local.request(PARAPHRASE)])
    assert (completion.model, completion.model_revision) == (str(generator_lm), revision)
    assert local_revision(judge_lm) != revision
    assert "SECRET" not in repr(local) and str(generator_lm) in repr(local)


def test_sampling_is_reproducible_under_a_seed(generator_lm):
    llm = TransformersLLM(str(generator_lm), max_new_tokens=24, temperature=1.0, device="cpu", batch_size=4)

    def sample(seed):
        return [c.text for c in llm.complete([llm.request(m, seed=seed) for m in MANY[:4]])]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_response_cache_in_process(generator_lm, tmp_path):
    spec = {
        "backend": "transformers",
        "model": str(generator_lm),
        "max_new_tokens": 16,
        "device": "cpu",
        "cache": str(tmp_path / "c"),
    }
    llm = build_llm(spec, "generate.methods[0].model", "params.yaml")
    requests = [llm.request(m) for m in MANY[:3]]
    fresh = llm.complete(requests)
    again = build_llm(spec, "generate.methods[0].model", "params.yaml").complete(requests + [llm.request(PARAPHRASE, seed=1)])
    assert [c.cached for c in again] == [True, True, True, False]
    assert [c.text for c in again[:3]] == [c.text for c in fresh]
    assert (tmp_path / "c" / FILENAME).is_file()


def test_a_request_asked_twice_in_one_call_is_generated_once(local):
    completions = local.complete([local.request(QA), local.request(PARAPHRASE), local.request(QA)])
    assert completions[0] == completions[2]


# ---- HTTP: a real transformers serve ------------------------------------------------------------------------------


def test_http_answers_in_order_and_equal_the_local_greedy_answers(llm_server, generator_lm, greedy_one_by_one):
    llm = http_llm(llm_server.base_url, generator_lm, concurrency=4)
    completions = llm.complete([llm.request(m) for m in MANY])
    # The server runs the same weights, chat template and greedy decoding, one request at a time.
    assert [(c.text, c.finish_reason) for c in completions] == [(c.text, c.finish_reason) for c in greedy_one_by_one]
    assert llm.identity == f"{generator_lm}@unknown"
    assert all(c.model == str(generator_lm) and c.model_revision is None for c in completions)


def test_http_sends_the_seed(llm_server, generator_lm):
    llm = OpenAICompatibleLLM(str(generator_lm), llm_server.base_url, max_new_tokens=24, temperature=1.0, concurrency=1)

    def sample(seed):
        return [c.text for c in llm.complete([llm.request(m, seed=seed) for m in MANY[:3]])]

    first = sample(7)
    # transformers serve seeds torch per request: one request at a time, a seed gives the same answers.
    assert sample(7) == first
    assert sample(8) != first


def test_http_cache_makes_a_rerun_free(fault_proxy, generator_lm, tmp_path):
    proxy = fault_proxy()
    requests = [http_llm(proxy.base_url, generator_lm).request(m) for m in MANY[:4]]
    first = http_llm(proxy.base_url, generator_lm, cache=tmp_path, concurrency=2).complete(requests)
    assert proxy.received == 4 and not any(c.cached for c in first)

    rerun = http_llm(proxy.base_url, generator_lm, cache=tmp_path, concurrency=2)
    second = rerun.complete(requests)
    assert proxy.received == 4  # no request reached the server
    assert all(c.cached for c in second) and [c.text for c in second] == [c.text for c in first]
    assert (rerun.cache.hits, rerun.cache.misses) == (4, 0)

    base = requests[0]
    changed = [
        dataclasses.replace(base, temperature=0.5),
        dataclasses.replace(base, seed=base.seed + 1),
        rerun.request(MANY[0] + (("user", "Make it harder."),)),
    ]
    assert not any(c.cached for c in rerun.complete(changed))
    assert proxy.received == 7


def test_http_retries_server_errors(fault_proxy, generator_lm, greedy_one_by_one):
    proxy = fault_proxy(fail_first=2, status=503)
    llm = http_llm(proxy.base_url, generator_lm, concurrency=1, max_retries=3)
    completions = llm.complete([llm.request(m) for m in MANY[:3]])
    assert [c.text for c in completions] == [c.text for c in greedy_one_by_one[:3]]
    assert proxy.received == 5  # the first request was sent three times


def test_http_server_that_keeps_failing_raises_and_keeps_what_succeeded(fault_proxy, llm_server, generator_lm, tmp_path):
    proxy = fault_proxy(fail_from=3, status=500)  # requests 1 and 2 succeed, every later one fails
    llm = http_llm(proxy.base_url, generator_lm, concurrency=1, max_retries=1, cache=tmp_path)
    requests = [llm.request(m) for m in MANY[:4]]
    with pytest.raises(LLMServerError) as failure:
        llm.complete(requests)
    message = str(failure.value)
    assert message.startswith(f"{proxy.base_url}: model '{generator_lm}': HTTP 500: ")
    assert "injected failure" in message and message.endswith("(2 attempts)")
    assert isinstance(failure.value, SynthforgeError)  # the CLI prints the message and exits non-zero
    assert proxy.received == 4  # 2 answers, then the third request twice; the fourth was never sent

    proxy.fail_from = None  # the server is back: a rerun sends only what the failed run had no answer for
    resumed = http_llm(proxy.base_url, generator_lm, cache=tmp_path).complete(requests)
    assert [c.cached for c in resumed] == [True, True, False, False] and proxy.received == 6
    # The cache is per server: the same model name behind another URL may be other weights.
    elsewhere = http_llm(llm_server.base_url, generator_lm, cache=tmp_path).complete(requests)
    assert not any(c.cached for c in elsewhere)


def test_http_timeout(fault_proxy, generator_lm):
    proxy = fault_proxy(delay_s=30)
    llm = http_llm(proxy.base_url, generator_lm, max_retries=1, timeout_s=0.5)
    with pytest.raises(LLMServerError, match=r"timed out after 0.5 s \(2 attempts\)$"):
        llm.complete([llm.request(QA)])
    assert proxy.received == 2


def test_http_connection_refused():
    llm = OpenAICompatibleLLM("some-model", f"http://127.0.0.1:{free_port()}/v1", max_retries=0)
    with pytest.raises(LLMServerError, match=r"model 'some-model': cannot connect: .*\(1 attempts\)$"):
        llm.complete([llm.request(QA)])


def test_api_key_is_sent_but_never_shown_or_stored(fault_proxy, generator_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHFORGE_TEST_KEY", SECRET)
    proxy = fault_proxy(fail_from=2, status=500, echo_headers=True)
    spec = {
        "backend": "openai",
        "model": str(generator_lm),
        "base_url": proxy.base_url,
        "api_key_env": "SYNTHFORGE_TEST_KEY",
        "max_retries": 0,
        "concurrency": 1,
        "cache": str(tmp_path / "cache"),
    }
    llm = build_llm(spec, "judge.checks[0].model", "params.yaml")
    with pytest.raises(LLMServerError) as failure:
        llm.complete([llm.request(QA), llm.request(PARAPHRASE)])
    assert proxy.authorization == f"Bearer {SECRET}"  # the server got the key...
    assert "Bearer ***" in str(failure.value)  # ...and echoed it, redacted here
    assert SECRET not in str(failure.value) and SECRET not in repr(llm)
    files = list((tmp_path / "cache").iterdir())
    assert files and not any(SECRET.encode() in f.read_bytes() for f in files)


# ---- params ----------------------------------------------------------------------------------------------------------

WHERE = "generate.methods[1].model"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gpt2", r"model: expected a mapping with backend and model, got str"),
        ({"model": "m"}, r"model\.backend: must be one of transformers, openai \(missing\)"),
        ({"backend": "vllm", "model": "m"}, r"model\.backend: must be one of transformers, openai \(got 'vllm'\)"),
        ({"backend": "transformers"}, r"model\.model: missing \(the transformers backend needs it\)"),
        ({"backend": "openai", "model": "m"}, r"model\.base_url: missing \(the openai backend needs it\)"),
        (
            {"backend": "transformers", "model": "m", "base_url": "http://x"},
            r"model\.base_url: unknown key for the transformers backend "
            r"\(allowed: backend, model, max_new_tokens, temperature, cache, device, batch_size\)",
        ),
        ({"backend": "transformers", "model": "m", "batch_size": "8"}, r"model\.batch_size: expected an integer, got str"),
        ({"backend": "transformers", "model": "m", "temperature": True}, r"model\.temperature: expected a number, got bool"),
        ({"backend": "transformers", "model": "m", "max_new_tokens": 0}, r"model\.max_new_tokens: must be >= 1"),
        ({"backend": "openai", "model": "m", "base_url": "u", "concurrency": 0}, r"model\.concurrency: must be >= 1"),
        ({"backend": "openai", "model": "m", "base_url": "u", "timeout_s": 0}, r"model\.timeout_s: must be > 0"),
        ({"backend": "openai", "model": "m", "base_url": "u", "api_key_env": SECRET}, r"model\.api_key_env: must be the NAME"),
        (
            {"backend": "openai", "model": "m", "base_url": "u", "api_key_env": "SYNTHFORGE_UNSET_KEY"},
            r"model\.api_key_env: the environment variable SYNTHFORGE_UNSET_KEY is not set",
        ),
        (
            {"backend": "transformers", "model": "models/nowhere/at/all"},
            r"model\.model: models/nowhere/at/all: no such directory",
        ),
    ],
    ids=[
        "not-a-mapping",
        "no-backend",
        "unknown-backend",
        "no-model",
        "no-base-url",
        "key-of-the-other-backend",
        "wrong-type",
        "bool-is-no-number",
        "too-small",
        "no-concurrency",
        "no-timeout",
        "key-pasted-as-env-name",
        "env-var-unset",
        "no-such-model",
    ],
)
def test_spec_errors_name_the_key(spec, message, monkeypatch):
    monkeypatch.delenv("SYNTHFORGE_UNSET_KEY", raising=False)
    with pytest.raises(BadInput, match=rf"^params\.yaml: generate\.methods\[1\]\.{message}") as failure:
        build_llm(spec, WHERE, "params.yaml")
    assert SECRET not in str(failure.value)


def test_corrupt_cache_is_named(generator_lm, tmp_path):
    (tmp_path / FILENAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(BadInput, match=rf"{tmp_path / FILENAME}: not a usable LLM response cache .*delete the file"):
        TransformersLLM(str(generator_lm), device="cpu", cache=tmp_path)


def test_a_token_pasted_as_the_env_var_name_is_never_echoed(monkeypatch):
    token = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"  # looks like a variable name, but it is a key
    monkeypatch.delenv(token, raising=False)
    spec = {"backend": "openai", "model": "m", "base_url": "u", "api_key_env": token}
    with pytest.raises(BadInput, match="the environment variable named there is not set") as failure:
        build_llm(spec, WHERE, "params.yaml")
    assert token not in str(failure.value)


def test_the_cache_key_tells_servers_apart():
    from synthforge.llm.cache import request_key

    request = ChatRequest(messages=(("user", "hi"),))
    keys = {request_key("openai", "m", None, request, scope) for scope in ("http://a/v1", "http://b/v1", None)}
    assert len(keys) == 3
