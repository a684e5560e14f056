"""Tiny language models and a real OpenAI-compatible server for the LLM tests (a pytest plugin, see conftest).

Nothing can be downloaded, so the models are built here: one byte-level BPE trained on the formats below, and
two 2-layer GPT-2s trained for a few seconds each on chat-formatted examples (loss on the answers only).

- `generator_lm` answers a user turn that asks for a question and answer about a passage (QA_USER) with JSON
  `{"question": "...", "answer": "..."}`, and one that asks to paraphrase or rewrite a text (PARAPHRASE_USER)
  with a one-paragraph rewrite.
- `judge_lm` answers a request to judge or grade a sample against a rubric (JUDGE_USER) with JSON
  `{"score": N, "difficulty": "easy|medium|hard", "rationale": "..."}`, N in 1..5.

They are not smart: they learned the shapes, so their outputs often parse, and the words inside are whatever
the model saw most. The words that pick the task (question, answer, passage / paraphrase, rewrite / judge,
rubric, score) matter most; prompts far from the ones below parse less often.

`llm_server` serves any of them through a real `transformers serve` on 127.0.0.1, and `fault_proxy` puts a proxy
in front of it that fails or stalls requests on demand.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
EOS = "</s>"  # the end of an assistant turn

SUBJECTS = ["The old mill", "The river", "A small village", "The lighthouse", "The library", "The orchard", "The bridge"]
VERBS = [("stands", "stand"), ("sits", "sit"), ("lies", "lie"), ("grew", "grow"), ("opened", "open")]
PLACES = ["near the coast", "beside the forest", "on a quiet hill", "at the end of the road", "in the valley"]
TIMES = ["since 1850", "for many years", "every summer", "after the storm", "in the spring"]
FACTS = [
    "It is known for its red roof",
    "Visitors come to see the garden",
    "The walls are made of stone",
    "Farmers sell apples there",
    "It was rebuilt after a fire",
]

QA_SYSTEM = [
    "You write exam questions grounded in a source passage.",
    "You are a careful question writer.",
    "You generate evaluation items.",
]
QA_USER = [
    "Write one question and its answer about this passage. Reply with JSON with keys question and answer.\n\nPassage: {p}",
    "Passage: {p}\n\nAsk a question that the passage answers, and give the answer, as JSON.",
    "Read the passage and write a question and answer about it.\n\n{p}",
    "Using only the passage below, write a question whose answer is in it. "
    'Respond with JSON {{"question": ..., "answer": ...}}.\n\nPassage: {p}',
    "Source document:\n{p}\n\nGenerate a question-answer pair grounded in the document.",
    "Create a quiz question about the text and answer it.\nText: {p}",
]
PARAPHRASE_SYSTEM = ["You rewrite text without changing its meaning.", "You are an editor.", "You are a helpful assistant."]
PARAPHRASE_USER = [
    "Paraphrase the following text in one paragraph:\n\n{p}",
    "Rewrite this text with other words, keeping its meaning:\n\n{p}",
    "Text: {p}\n\nParaphrase it.",
    "Rephrase the passage below in your own words. Reply with the rewrite only.\n\n{p}",
    "Write a paraphrase of: {p}",
]
JUDGE_SYSTEM = ["You are a strict judge of evaluation data.", "You grade samples against a rubric.", "You are an evaluator."]
JUDGE_USER = [
    "Rubric: {r}\n\nSample:\n{s}\n\nScore the sample from 1 to 5 and rate its difficulty. Reply with JSON.",
    "Judge this sample against the rubric.\nRubric: {r}\nSample: {s}",
    'Grade the sample below.\n\nCriteria: {r}\n\n{s}\n\nAnswer with JSON {{"score": 1-5, "difficulty": ..., "rationale": ...}}.',
]
RUBRICS = ["The answer is correct and supported.", "The question is clear.", "The text is fluent and safe."]
RATIONALES = ["The answer is supported by the passage.", "The question is vague.", "The wording is clear.", "It is too easy."]


def _turns(rng: random.Random, systems: list[str], user: str) -> list[tuple[str, str]]:
    """A user turn, after a system turn two times in three (callers may or may not send one)."""
    system = rng.choice([*systems, None])
    return ([("system", system)] if system else []) + [("user", user)]


def _passage(rng: random.Random) -> tuple[str, dict[str, str]]:
    parts = {
        "subject": rng.choice(SUBJECTS),
        "verb": rng.choice(VERBS),
        "place": rng.choice(PLACES),
        "time": rng.choice(TIMES),
        "fact": rng.choice(FACTS),
    }
    text = f"{parts['subject']} {parts['verb'][0]} {parts['place']} {parts['time']}. {parts['fact']}."
    return text, parts


def _qa_example(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    text, parts = _passage(rng)
    subject = parts["subject"][0].lower() + parts["subject"][1:]
    question, answer = rng.choice(
        [(f"Where does {subject} {parts['verb'][1]}?", parts["place"]), (f"What is true of {subject}?", parts["fact"])]
    )
    return _turns(rng, QA_SYSTEM, rng.choice(QA_USER).format(p=text)), json.dumps({"question": question, "answer": answer})


def _paraphrase_example(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    text, parts = _passage(rng)
    subject = parts["subject"][0].lower() + parts["subject"][1:]
    place = parts["place"][0].upper() + parts["place"][1:]
    rewrite = f"{place}, {subject} {parts['verb'][0]} {parts['time']}, and {parts['fact'][0].lower()}{parts['fact'][1:]}."
    return _turns(rng, PARAPHRASE_SYSTEM, rng.choice(PARAPHRASE_USER).format(p=text)), rewrite


def _judge_example(rng: random.Random) -> tuple[list[tuple[str, str]], str]:
    text, _ = _passage(rng)
    question = rng.choice(["Where is it?", "What is true of it?", "When was it built?"])
    sample = f"Question: {question}\nAnswer: {text.split('. ')[1]}"
    messages = _turns(rng, JUDGE_SYSTEM, rng.choice(JUDGE_USER).format(r=rng.choice(RUBRICS), s=sample))
    verdict = {
        "score": rng.randint(1, 5),
        "difficulty": rng.choice(["easy", "medium", "hard"]),
        "rationale": rng.choice(RATIONALES),
    }
    return messages, json.dumps(verdict)


def _render(messages: list[tuple[str, str]]) -> str:
    """CHAT_TEMPLATE with the generation prompt, written out (the tokenizer does not exist yet when the corpus is made)."""
    return "".join(f"<|{role}|>\n{content}\n" for role, content in messages) + "<|assistant|>\n"


def _examples(make: Callable[[random.Random], tuple[list[tuple[str, str]], str]], n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt as the chat template renders it, answer) pairs."""
    rng = random.Random(seed)
    return [(_render(messages), answer) for messages, answer in (make(rng) for _ in range(n))]


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained on the three formats, with the chat template and `</s>` as end of turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        prompt + answer
        for make in (_qa_example, _paraphrase_example, _judge_example)
        for prompt, answer in _examples(make, 150, 0)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<s>", EOS, "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    folder = tmp_path_factory.mktemp("chat_tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>", eos_token=EOS, pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def _train_lm(tokenizer_dir: Path, examples: list[tuple[str, str]], seed: int, steps: int, batch_size: int, out: Path) -> Path:
    """A 2-layer GPT-2 trained on (prompt, answer) pairs with the loss on the answers (and their end of turn) only."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the one_torch_thread fixture
    try:
        torch.manual_seed(seed)
        config = GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=2,
            n_positions=2048,  # room for a citation case's passages and the judge's prompt around it
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
        rows = []
        for prompt, answer in examples:
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rng = random.Random(seed)
        model.train()
        for _ in range(steps):
            batch = rng.sample(rows, batch_size)
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            lengths = torch.tensor([len(ids) for ids, _ in batch])
            attention_mask = (torch.arange(width) < lengths[:, None]).long()
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.generation_config.do_sample = True  # as chat models ship: a server samples unless asked for temperature 0
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def generator_lm(tmp_path_factory, chat_tokenizer_dir) -> Path:
    """Folder of a tiny chat GPT-2 that writes Q&A JSON about a passage, or a paraphrase, as asked."""
    examples = _examples(_qa_example, 300, 1) + _examples(_paraphrase_example, 300, 2)
    return _train_lm(chat_tokenizer_dir, examples, seed=1, steps=160, batch_size=16, out=tmp_path_factory.mktemp("generator_lm"))


@pytest.fixture(scope="session")
def judge_lm(tmp_path_factory, chat_tokenizer_dir) -> Path:
    """Folder of another tiny chat GPT-2 (other weights, other revision) that answers judge prompts with a JSON verdict."""
    return _train_lm(
        chat_tokenizer_dir,
        _examples(_judge_example, 300, 3),
        seed=2,
        steps=200,
        batch_size=8,
        out=tmp_path_factory.mktemp("judge_lm"),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT/v1
    log: Path


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory) -> Server:
    """A real `transformers serve` on 127.0.0.1 for the session; requests name a model by its local folder."""
    port = free_port()
    log = tmp_path_factory.mktemp("llm_server") / "serve.log"
    executable = Path(sys.executable).parent / "transformers"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # the machine is shared; a tiny model gains nothing from threads
    }
    command = [str(executable), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer /health within 120 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield Server(base_url=f"http://127.0.0.1:{port}/v1", log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class FaultProxy:
    """What the proxy does to each request it receives (numbered from 1), and how many it received."""

    upstream: str  # host:port of the real server
    fail_first: int = 0  # requests 1..fail_first get `status`
    fail_from: int | None = None  # requests from this one on get `status`
    status: int = 503
    delay_s: float = 0.0  # wait this long before forwarding (beyond the client's timeout: it gives up)
    echo_headers: bool = False  # failures echo the request's headers, as some debugging servers do
    base_url: str = ""
    received: int = 0
    authorization: str | None = None  # the Authorization header of the last request
    stopped: threading.Event = field(default_factory=threading.Event)  # set when the fixture tears the proxy down
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_number(self, authorization: str | None) -> int:
        with self._lock:
            self.received += 1
            self.authorization = authorization
            return self.received

    def fails(self, number: int) -> bool:
        return number <= self.fail_first or (self.fail_from is not None and number >= self.fail_from)


def _proxy_handler(proxy: FaultProxy):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            number = proxy.next_number(self.headers.get("Authorization"))
            if proxy.fails(number):
                error = {"error": f"injected failure of request {number}"}
                if proxy.echo_headers:
                    error["headers"] = dict(self.headers.items())
                payload = json.dumps(error).encode()
                # retry-after-ms keeps the client's backoff short; it is an OpenAI client header, honoured like Retry-After.
                self._reply(proxy.status, payload, {"Content-Type": "application/json", "retry-after-ms": "10"})
                return
            if proxy.delay_s and proxy.stopped.wait(proxy.delay_s):
                return
            conn = http.client.HTTPConnection(proxy.upstream, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection"}}
                conn.request("POST", self.path, body=body, headers=headers)
                response = conn.getresponse()
                self._reply(
                    response.status, response.read(), {"Content-Type": response.getheader("Content-Type", "application/json")}
                )
            finally:
                conn.close()

        def _reply(self, status: int, payload: bytes, headers: dict[str, str]):
            with contextlib.suppress(OSError):  # the client may have given up (timeout tests)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        def log_message(self, format, *args):  # the test output stays clean
            pass

    return Handler


@pytest.fixture
def fault_proxy(llm_server):
    """Factory: `fault_proxy(fail_first=0, fail_from=None, status=503, delay_s=0, echo_headers=False)` -> a FaultProxy
    with `.base_url` on 127.0.0.1 in front of llm_server; every proxy made is stopped after the test."""
    started = []

    def start(**behaviour) -> FaultProxy:
        proxy = FaultProxy(upstream=llm_server.base_url.removeprefix("http://").removesuffix("/v1"), **behaviour)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(proxy))
        server.daemon_threads = True
        proxy.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append((proxy, server))
        return proxy

    yield start
    for proxy, server in started:
        proxy.stopped.set()
        server.shutdown()
        server.server_close()
