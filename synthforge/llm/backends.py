"""Chat LLMs for generation and judging: a local transformers model, or any OpenAI-compatible server.

Both backends take a list of `ChatRequest`s and return one `Completion` each, in order. The response cache sits
in front of both (`_CachedLLM.complete`): requests already answered are served from it, only the others reach
the model, and each answer is stored as soon as it arrives, so an interrupted or failed run resumes where it
stopped and a rerun costs nothing.

`build_llm` makes one from the `model:` mapping of a method or check in params.yaml:

    model:
      backend: transformers      # or openai
      model: models/generator    # local path or hub id (transformers); the served model name (openai)
      max_new_tokens: 256
      temperature: 0.0           # 0 = greedy
      cache: .cache/llm          # response cache folder, relative to the working directory; null (default) = none
      device: null               # transformers: cuda when there is one
      batch_size: 8              # transformers
      base_url: http://127.0.0.1:8000/v1   # openai
      api_key_env: OPENAI_API_KEY          # openai: the NAME of the variable holding the key
      concurrency: 8             # openai: requests in flight
      max_retries: 4             # openai: retries of 408/409/429/5xx and connection errors, with backoff
      timeout_s: 60              # openai: per attempt
"""

from __future__ import annotations

import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from synthforge.errors import BadInput, SynthforgeError
from synthforge.llm.cache import ResponseCache, request_key
from synthforge.llm.models import load_causal_lm, pick_device, resolve_model

ROLES = ("system", "user", "assistant")
Messages = tuple[tuple[str, str], ...]
Store = Callable[[int, str, str | None], None]  # (index among the requests sent, text, finish_reason)


@dataclass(frozen=True)
class ChatRequest:
    messages: Messages  # ((role, content), ...), roles system/user/assistant
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    text: str
    model: str  # model id as configured
    model_revision: str | None
    cached: bool  # served from the response cache
    finish_reason: str | None  # "stop" (end of turn), "length" (max_new_tokens reached), or what the server said


class LLM(Protocol):
    model_id: str
    model_revision: str | None

    @property
    def identity(self) -> str: ...

    def request(self, messages: Sequence[tuple[str, str]], seed: int = 0) -> ChatRequest: ...

    def complete(self, requests: list[ChatRequest], desc: str = "llm") -> list[Completion]: ...


class LLMServerError(SynthforgeError, RuntimeError):
    """An OpenAI-compatible server failed a request for good (after the client's retries). The message names the
    server, the model and what failed; never the API key."""


class _CachedLLM(ABC):
    """What both backends share: the defaults of a request, the identity, and the response cache around `_generate`."""

    backend: str  # part of every cache key
    cache_scope: str | None = None  # where the model runs, when that can change the answer (a server's URL)

    def __init__(
        self, model_id: str, model_revision: str | None, max_new_tokens: int, temperature: float, cache: str | Path | None
    ):
        self.model_id = model_id
        self.model_revision = model_revision
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.cache = ResponseCache(cache) if cache is not None else None

    @property
    def identity(self) -> str:
        """model@revision, as provenance records it ("unknown" when a server does not say)."""
        return f"{self.model_id}@{self.model_revision or 'unknown'}"

    def request(self, messages: Sequence[tuple[str, str]], seed: int = 0) -> ChatRequest:
        """A request with this model's max_new_tokens and temperature."""
        messages = tuple((role, content) for role, content in messages)
        for role, _ in messages:
            if role not in ROLES:
                raise ValueError(f"message role {role!r}: expected one of {', '.join(ROLES)}")
        return ChatRequest(messages, max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed)

    def complete(self, requests: list[ChatRequest], desc: str = "llm") -> list[Completion]:
        """One completion per request, in order. Cached answers are reused; a request asked twice is sent once."""
        from synthforge.progress import progress_bar

        results: list[Completion | None] = [None] * len(requests)
        waiting: dict[str, list[int]] = {}  # cache key -> indices of the requests it answers
        for index, request in enumerate(requests):
            key = request_key(self.backend, self.model_id, self.model_revision, request, self.cache_scope)
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                results[index] = Completion(hit[0], self.model_id, self.model_revision, cached=True, finish_reason=hit[1])
            else:
                waiting.setdefault(key, []).append(index)
        keys = list(waiting)

        with progress_bar(desc, len(requests)) as advance:
            advance(len(requests) - sum(len(indices) for indices in waiting.values()))

            def store(sent: int, text: str, finish_reason: str | None) -> None:
                if self.cache is not None:
                    self.cache.put(keys[sent], text, finish_reason)
                for index in waiting[keys[sent]]:
                    results[index] = Completion(
                        text, self.model_id, self.model_revision, cached=False, finish_reason=finish_reason
                    )
                advance(len(waiting[keys[sent]]))

            if keys:
                self._generate([requests[waiting[key][0]] for key in keys], store)
        return results  # every slot is filled: a hit, or stored, or _generate raised

    @abstractmethod
    def _generate(self, requests: list[ChatRequest], store: Store) -> None:
        """Answer every request, calling store(index, text, finish_reason) as each answer arrives."""


class TransformersLLM(_CachedLLM):
    """A causal LM run in this process (local path or hub id), in batches with left padding.

    Greedy when temperature is 0; otherwise sampled under torch.manual_seed(seed of the batch's first request),
    so the same requests in the same batches give the same answers."""

    backend = "transformers"

    def __init__(
        self,
        model: str,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        cache: str | Path | None = None,
        device: str | None = None,
        batch_size: int = 8,
        param: str = "model",
    ):

        source, revision = resolve_model(model, f"{param}.model")
        super().__init__(model, revision, max_new_tokens, temperature, cache)
        self.batch_size = batch_size
        self.device = pick_device(device)
        self._param = param
        self._tokenizer, self._model = load_causal_lm(model, source, revision, self.device, f"{param}.model")
        self.uses_chat_template = bool(getattr(self._tokenizer, "chat_template", None))
        eos = self._model.generation_config.eos_token_id
        self._stop_ids = {token for token in (eos if isinstance(eos, list) else [eos]) if token is not None}

    def __repr__(self) -> str:
        return f"TransformersLLM({self.identity!r}, device={str(self.device)!r}, batch_size={self.batch_size})"

    def prompt(self, messages: Messages) -> str:
        """The text the model is given: its chat template with the generation prompt when it has one, else the
        turns as "role: content" paragraphs ending in "assistant:"."""
        if not self.uses_chat_template:
            return "".join(f"{role}: {content}\n\n" for role, content in messages) + "assistant:"
        from jinja2.exceptions import TemplateError

        chat = [{"role": role, "content": content} for role, content in messages]
        try:
            return self._tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            if len(chat) < 2 or chat[0]["role"] != "system":
                raise BadInput(f"{self._param}.model: {self.model_id}: the chat template refuses the messages: {exc}") from None
        # Some templates (Gemma, Mistral v0.1) refuse a system role: the instructions then open the next turn.
        merged = [{"role": chat[1]["role"], "content": f"{chat[0]['content']}\n\n{chat[1]['content']}"}, *chat[2:]]
        try:
            return self._tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            raise BadInput(f"{self._param}.model: {self.model_id}: the chat template refuses the messages: {exc}") from None

    def _generate(self, requests: list[ChatRequest], store: Store) -> None:
        # A batch shares its generation settings: group by them, keeping the order within each group.
        groups: dict[tuple[float, int], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.temperature, request.max_new_tokens), []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                for index, (text, finish_reason) in zip(batch, self._generate_batch([requests[i] for i in batch]), strict=True):
                    store(index, text, finish_reason)

    def _generate_batch(self, requests: list[ChatRequest]) -> list[tuple[str, str]]:
        import torch

        first = requests[0]
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones.
        batch = self._tokenizer(
            [self.prompt(r.messages) for r in requests],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not self.uses_chat_template,
        ).to(self.device)
        self._check_context(batch["attention_mask"].sum(dim=1).tolist(), requests)
        sampling = {"do_sample": True, "temperature": first.temperature} if first.temperature > 0 else {"do_sample": False}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(first.seed)
            with torch.inference_mode():
                out = self._model.generate(
                    **batch, max_new_tokens=first.max_new_tokens, pad_token_id=self._tokenizer.pad_token_id, **sampling
                )
        continuations = out[:, batch["input_ids"].shape[1] :]
        texts = self._tokenizer.batch_decode(continuations, skip_special_tokens=True)
        # A row that stopped early holds its end-of-turn token (and padding after it); one that did not ran out of tokens.
        reasons = ["stop" if self._stop_ids & set(row.tolist()) else "length" for row in continuations]
        return list(zip(texts, reasons, strict=True))

    def _check_context(self, prompt_tokens: list[int], requests: list[ChatRequest]) -> None:
        """A prompt that does not fit the model's context with room for the answer is an error, not a silent cut."""
        limit = getattr(self._model.config, "max_position_embeddings", None)
        if not limit:
            return
        for tokens, request in zip(prompt_tokens, requests, strict=True):
            if tokens + request.max_new_tokens > limit:
                start = " ".join(request.messages[-1][1].split())[:80]
                raise BadInput(
                    f"{self._param}.model: {self.model_id}: a prompt of {tokens} tokens plus max_new_tokens "
                    f"{request.max_new_tokens} exceeds the model's context of {limit} tokens (prompt starting {start!r}); "
                    "use a model with a longer context, shorter prompts or a smaller max_new_tokens"
                )


class OpenAICompatibleLLM(_CachedLLM):
    """A model behind an OpenAI-compatible chat completions endpoint (vLLM, TGI, Ollama, `transformers serve`).

    The openai client retries 408/409/429/5xx and connection errors with exponential backoff (honouring
    Retry-After) up to max_retries times, each attempt limited to timeout_s seconds. `concurrency` requests are
    in flight at once. The API key is read from the environment variable named api_key_env and kept only in the
    client: it is in no message, cache entry or repr."""

    backend = "openai"

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key_env: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        cache: str | Path | None = None,
        concurrency: int = 8,
        max_retries: int = 4,
        timeout_s: float = 60.0,
        param: str = "model",
    ):
        from openai import OpenAI

        api_key = None
        if api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                # Echo the name only when it looks like one: a key pasted here by mistake must not reach a log.
                name = api_key_env if re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", api_key_env) else "named there"
                raise BadInput(f"{param}.api_key_env: the environment variable {name} is not set (it should hold the API key)")
        super().__init__(model, None, max_new_tokens, temperature, cache)
        self.base_url = base_url
        self.cache_scope = base_url.rstrip("/")  # two servers may serve different weights under one model name
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        # Local servers want no key, but the client insists on one.
        self._client = OpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=max_retries, timeout=timeout_s)

    def __repr__(self) -> str:
        return f"OpenAICompatibleLLM({self.model_id!r}, base_url={self.base_url!r}, concurrency={self.concurrency})"

    def _generate(self, requests: list[ChatRequest], store: Store) -> None:
        failed = threading.Event()

        def send(request: ChatRequest) -> tuple[str, str | None] | None:
            if failed.is_set():
                return None  # a request failed for good: send no more, the error is on its way
            try:
                return self._send(request)
            except LLMServerError:
                failed.set()
                raise

        failure: LLMServerError | None = None
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="llm") as pool:
            futures = {pool.submit(send, request): index for index, request in enumerate(requests)}
            try:
                # Answers that arrive, also after a failure, are stored before the error is raised: a rerun resumes.
                for future in as_completed(futures):
                    try:
                        answer = future.result()
                    except LLMServerError as exc:
                        failure = failure or exc
                        continue
                    if answer is not None:
                        store(futures[future], *answer)
            except BaseException:  # Ctrl-C: let the requests in flight end, send no more
                failed.set()
                raise
        if failure is not None:
            raise failure

    def _send(self, request: ChatRequest) -> tuple[str, str | None]:
        import openai

        attempts = f"{1 + self.max_retries} attempts"
        try:
            response = self._client.chat.completions.create(
                model=self.model_id,
                messages=[{"role": role, "content": content} for role, content in request.messages],
                max_tokens=request.max_new_tokens,
                temperature=request.temperature,
                seed=request.seed,
            )
        except openai.APITimeoutError:
            what = f"timed out after {self.timeout_s:g} s ({attempts})"
        except openai.APIConnectionError as exc:
            what = f"cannot connect: {exc.__cause__ or exc} ({attempts})"
        except openai.APIStatusError as exc:
            retried = exc.status_code in (408, 409, 429) or exc.status_code >= 500
            what = f"HTTP {exc.status_code}: {_excerpt(exc.response.text)}" + (f" ({attempts})" if retried else "")
        else:
            if not response.choices:
                what = "the response has no choices"
            else:
                choice = response.choices[0]
                return choice.message.content or "", choice.finish_reason
        raise LLMServerError(self._redact(f"{self.base_url}: model {self.model_id!r}: {what}"))

    def _redact(self, message: str) -> str:
        # A server may echo what it was sent; the key must not reach a log through it.
        key = self._client.api_key
        return message.replace(key, "***") if key and key != "unused" else message


def _excerpt(body: str, limit: int = 300) -> str:
    body = " ".join(body.split())
    return body if len(body) <= limit else body[:limit] + "..."


# The keys of a `model:` mapping: expected types, what they are called in messages, and the smallest value allowed.
_COMMON = {
    "backend": ((str,), "a string", None),
    "model": ((str,), "a string", None),
    "max_new_tokens": ((int,), "an integer", 1),
    "temperature": ((int, float), "a number", 0),
    "cache": ((str, type(None)), "a folder path or null", None),
}
_OWN = {
    "transformers": {
        "device": ((str, type(None)), "a device name or null", None),
        "batch_size": ((int,), "an integer", 1),
    },
    "openai": {
        "base_url": ((str,), "a URL", None),
        "api_key_env": ((str, type(None)), "an environment variable name or null", None),
        "concurrency": ((int,), "an integer", 1),
        "max_retries": ((int,), "an integer", 0),
        "timeout_s": ((int, float), "a number", None),
    },
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def build_llm(spec: dict, where: str, params_file: str) -> LLM:
    """The LLM a `model:` mapping describes; `where` is its key path (`generate.methods[1].model`) for messages.

    The value of api_key_env is never echoed in errors: it may be a key pasted there by mistake."""
    param = f"{params_file}: {where}"
    if not isinstance(spec, dict):
        raise BadInput(f"{param}: expected a mapping with backend and model, got {type(spec).__name__}")
    backend = spec.get("backend")
    if backend not in _OWN:
        got = "missing" if backend is None else f"got {backend!r}"
        raise BadInput(f"{param}.backend: must be one of {', '.join(_OWN)} ({got})")
    allowed = {**_COMMON, **_OWN[backend]}
    for key, value in spec.items():
        if key not in allowed:
            raise BadInput(f"{param}.{key}: unknown key for the {backend} backend (allowed: {', '.join(allowed)})")
        types, described, minimum = allowed[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise BadInput(f"{param}.{key}: expected {described}, got {type(value).__name__}")
        if minimum is not None and value < minimum:
            raise BadInput(f"{param}.{key}: must be >= {minimum}")
    for key in ("model", "base_url") if backend == "openai" else ("model",):
        if not spec.get(key):
            raise BadInput(f"{param}.{key}: missing (the {backend} backend needs it)")
    if "timeout_s" in spec and spec["timeout_s"] <= 0:
        raise BadInput(f"{param}.timeout_s: must be > 0")
    if spec.get("api_key_env") is not None and not _ENV_NAME.fullmatch(spec["api_key_env"]):
        raise BadInput(f"{param}.api_key_env: must be the NAME of the environment variable that holds the key, not the key")

    options = {key: value for key, value in spec.items() if key not in ("backend", "model")}
    if backend == "transformers":
        return TransformersLLM(spec["model"], param=param, **options)
    return OpenAICompatibleLLM(spec["model"], options.pop("base_url"), param=param, **options)


_SHARED: dict[str, LLM] = {}


def shared_llm(spec: dict[str, Any], where: str, params_file: str) -> LLM:
    """One loaded model per spec in a process: two methods naming the same generator share its weights."""
    from synthforge.provenance import canonical_json

    key = canonical_json(spec)
    if key not in _SHARED:
        _SHARED[key] = build_llm(spec, where, params_file)
    return _SHARED[key]
