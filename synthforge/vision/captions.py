"""Captions for image generation: caption the real images, then perturb each marginal seed's caption.

GenDataAgent (section 2.3, appendix A) builds every image prompt as "a photo of {class name}, which is
{caption}", the caption coming from BLIP-2. Images generated from one caption with different seeds look alike,
so for each marginal seed an LLM (Llama-2 in the paper) rewrites the scene after the comma m times, each
version limited to about 10 words because longer rewrites drift into outliers.

`ImageCaptioner` writes the captions when the dataset has none (any transformers image-to-text model: BLIP,
BLIP-2, GIT, a VisionEncoderDecoderModel). `CaptionPerturber` asks a causal LM for the m versions with the
paper's prompts, parses them out of whatever the model wrote, and keeps the raw output and whether it parsed
with every variant.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from synthforge.errors import BadInput
from synthforge.llm.models import hub_revision, load_causal_lm, load_dtype, pick_device, resolve_model

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# The paper's prompts (section 2.3), with the number of versions, the class name and the raw caption left open.
SYSTEM_PROMPT = (
    "You are an editor tasked with subtly altering the scene described after a comma in a sentence. "
    "The goal is to change the scene slightly in no more than 10 words. Respond with {m} versions."
)
USER_PROMPT = (
    'Given the sentence "a photo of {class_name}, which is {caption}", slightly alter the scene described after '
    "the comma to depict a similar yet different scenario."
)
PLAIN_ANSWER_START = "1."  # ends the prompt of a model without a chat template, so it starts a numbered list
MAX_ROUNDS = 3  # one answer per seed, then at most two rounds of extra samples for seeds still short of m versions

PERTURB_PARAM = "seeds.perturb.model"
CAPTIONS_PARAM = "seeds.captions.model"


@dataclass(frozen=True)
class CaptionVariant:
    text: str  # the perturbed scene (what goes after "which is"); at most max_words words when parsed
    raw: str  # the model output it was parsed from (every output for the seed when parsed is False)
    parsed: bool  # False: no usable version could be parsed and the seed's own caption was kept as text


def build_messages(class_name: str, caption: str, m: int) -> list[dict[str, str]]:
    """The paper's system and user messages for one seed."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT.format(m=m)},
        {"role": "user", "content": USER_PROMPT.format(class_name=class_name, caption=caption)},
    ]


def render_prompt(tokenizer: Any, class_name: str, caption: str, m: int) -> str:
    """The text sent to the model: its chat template over the two messages when it has one, else a plain prompt
    (system, user, then "1." so that a base model continues a numbered list)."""
    messages = build_messages(class_name, caption, m)
    if getattr(tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:
            # Some templates (Gemma, Mistral v0.1) refuse a system role: the instructions then open the user turn.
            merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return f"{messages[0]['content']}\n\n{messages[1]['content']}\n\n{PLAIN_ANSWER_START}"


# An item marker: "1." "2)" "3:" "(4)" "Version 5:" "**6.**" at the start of a line or after whitespace.
_MARKER = re.compile(r"(?:(?<=\s)|^)(?:\*\*)?(?:(?:version|option)\s*)?\(?(\d{1,2})[.):](?:\*\*)?(?=\s)", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*•·]|\u2013|\u2014)\s+")
_LEADING_NUMBER = re.compile(r"^\(?\d{1,2}[.):]+\s*")  # a numbered line outside a 1, 2, 3 list ("2. ..." alone)
# Lines that talk about the answer instead of being one (only filtered when the versions are not numbered).
_CHATTER = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|here (?:are|is)|i|i'm|i've|i'd|as an ai|note|hope|these versions|let me)\b",
    re.IGNORECASE,
)
_QUOTES = "\"'`“”‘’«»"
_TRAILING_NOTE = re.compile(r"\s*\([^()]*\)\s*$")  # "(changed 'walking' to 'running')"
# Words a cut sentence should not end on.
_DANGLING = {"a", "an", "the", "of", "and", "or", "with", "in", "on", "at", "to", "by", "for", "from", "while", "its", "their"}


def parse_versions(output: str, class_name: str, caption: str, max_words: int) -> list[str]:
    """The usable scene descriptions in one model answer, in order, each cut to max_words words.

    Takes a numbered list when there is one (1., 2., 3. ... consecutive, on separate lines or inline), else the
    bulleted lines, else every line that is not chatter ("Sure! Here are 5 versions:"), less a leading number.
    Repeats of the prompt's "a photo of X, which is" prefix, quotes, markdown, trailing notes in parentheses and
    final punctuation are removed. Empty results, repeats, and the original caption itself (no perturbation at
    all) are dropped.
    """
    candidates = _numbered_items(output)
    if candidates is None:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        bullets = [_BULLET.sub("", line) for line in lines if _BULLET.match(line)]
        candidates = bullets or [
            _LEADING_NUMBER.sub("", line) for line in lines if not line.endswith(":") and not _CHATTER.match(line)
        ]

    original = _normalise(caption)
    seen: set[str] = set()
    versions: list[str] = []
    for candidate in candidates:
        text = limit_words(_clean(candidate, class_name), max_words)
        key = _normalise(text)
        if not any(ch.isalpha() for ch in text) or key == original or key in seen:
            continue
        seen.add(key)
        versions.append(text)
    return versions


def limit_words(text: str, max_words: int) -> str:
    """At most max_words whitespace-separated words; a cut text loses the dangling words and commas at its end."""
    words = text.split()
    if len(words) <= max_words:
        return " ".join(words)
    words = words[:max_words]
    while words and (words[-1].lower().strip(",;:") in _DANGLING or not words[-1].strip(",;:")):
        words.pop()
    return " ".join(words).rstrip(",;:")


def _numbered_items(output: str) -> list[str] | None:
    """The first line of each item of the list numbered 1, 2, 3, ... in the output; None when there is no such list."""
    markers = list(_MARKER.finditer(output))
    chain: list[re.Match[str]] = []
    for marker in markers:
        number = int(marker.group(1))
        if (not chain and number == 1) or (chain and number == int(chain[-1].group(1)) + 1):
            chain.append(marker)
    if not chain:
        return None
    ends = [m.start() for m in chain[1:]] + [len(output)]
    # First line only: text after the last item ("I hope these help!") sits on the lines below it.
    return [output[m.end() : end].strip().split("\n", 1)[0] for m, end in zip(chain, ends, strict=True)]


def _clean(candidate: str, class_name: str) -> str:
    text = candidate.replace("**", "").replace("__", "").strip()
    text = text.strip(_QUOTES + " ")
    # The model often repeats the whole sentence: keep what follows "which is".
    # With the class name a comma is enough; with another subject "which is" must follow, so that a scene that
    # itself starts "a picture of ..." stays whole.
    with_class = rf"of\s+{re.escape(class_name)}\s*(?:,\s*(?:which\s+is\s+)?|\s+which\s+is\s+)"
    any_subject = r"of\s+[^,]*?\s*,?\s*which\s+is\s+"
    prefix = re.compile(rf"^(?:an?\s+)?(?:photo|picture|image)\s+(?:{with_class}|{any_subject})", re.IGNORECASE)
    text = prefix.sub("", text)
    text = re.sub(r"^which\s+is\s+", "", text, flags=re.IGNORECASE)
    text = text.strip(_QUOTES + " ")
    text = _TRAILING_NOTE.sub("", text)
    return text.rstrip(".!;:, ").strip(_QUOTES + " ")


def _normalise(text: str) -> str:
    return " ".join(text.lower().rstrip(".!").split())


class CaptionPerturber:
    """m perturbed versions of each seed's caption from a transformers causal LM (local path or hub id)."""

    def __init__(
        self,
        model: str,
        device: str | None = None,
        max_words: int = 10,
        max_new_tokens: int = 48,
        temperature: float = 0.9,
        batch_size: int = 8,
        param: str = PERTURB_PARAM,
    ):

        group = param.rsplit(".", 1)[0]
        for key, value in (("max_words", max_words), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if value < 1:
                raise BadInput(f"{group}.{key}: must be >= 1, got {value}")
        if temperature <= 0:
            raise BadInput(f"{group}.temperature: must be > 0 (sampling is what makes the versions differ), got {temperature}")
        self.model_id = model
        self.max_words = max_words
        self.max_new_tokens = max_new_tokens  # per requested version: an answer listing m versions may use m x this
        self.temperature = temperature
        self.batch_size = batch_size
        self._param = param
        source, self.model_revision = resolve_model(model, param)
        self.device = pick_device(device)
        self._tokenizer, self._model = load_causal_lm(model, source, self.model_revision, self.device, param)
        self.uses_chat_template = bool(getattr(self._tokenizer, "chat_template", None))

    def prompt(self, class_name: str, caption: str, m: int) -> str:
        """The text the model is given for one seed (see render_prompt)."""
        return render_prompt(self._tokenizer, class_name, caption, m)

    def perturb(self, items: list[tuple[str, str]], m: int, seed: int) -> list[list[CaptionVariant]]:
        """m variants per (class_name, caption), in order; the same items, m, seed and batch size give the same variants.

        Every seed gets one sampled answer; seeds with fewer than m usable versions get more samples
        (num_return_sequences) for up to MAX_ROUNDS rounds; what is still missing is filled with the seed's own
        caption, marked parsed=False (the caption is kept whole: the word limit reins in the LLM, not the data).
        """
        import torch

        from synthforge.progress import progress_bar

        group = self._param.rsplit(".", 1)[0]
        if m < 1:
            raise BadInput(f"{group}.m: must be >= 1, got {m}")
        for index, (class_name, caption) in enumerate(items):
            if not caption or not caption.strip():
                raise BadInput(f"{group}: seed {index} ({class_name!r}) has an empty caption: there is no scene to perturb")
        prompts = [self.prompt(class_name, caption.strip(), m) for class_name, caption in items]
        found: list[list[tuple[str, str]]] = [[] for _ in items]  # (version, raw output) per seed
        raws: list[list[str]] = [[] for _ in items]
        pending = list(range(len(items)))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            with progress_bar("perturbing captions", len(items)) as advance:
                for round_index in range(MAX_ROUNDS):
                    if not pending:
                        break
                    # First round: one answer (it lists m versions). Later: as many answers as versions still missing.
                    samples = 1 if round_index == 0 else max(m - len(found[i]) for i in pending)
                    chunk_size = max(1, self.batch_size // samples)
                    for start in range(0, len(pending), chunk_size):
                        chunk = pending[start : start + chunk_size]
                        answers = self._generate([prompts[i] for i in chunk], samples, m)
                        for i, outputs in zip(chunk, answers, strict=True):
                            class_name, caption = items[i]
                            for raw in outputs:
                                raws[i].append(raw)
                                self._collect(found[i], raw, class_name, caption, m)
                    done = [i for i in pending if len(found[i]) >= m]
                    advance(len(done))
                    pending = [i for i in pending if len(found[i]) < m]
                advance(len(pending))

        results = []
        for i, (_, caption) in enumerate(items):
            variants = [CaptionVariant(text=text, raw=raw, parsed=True) for text, raw in found[i]]
            if len(variants) < m:
                log.warning("seed %d: %d of %d versions parsed; the raw caption fills the rest", i, len(variants), m)
                fallback = CaptionVariant(text=caption.strip(), raw="\n\n".join(raws[i]), parsed=False)
                variants += [fallback] * (m - len(variants))
            results.append(variants)
        return results

    def _collect(self, found: list[tuple[str, str]], raw: str, class_name: str, caption: str, m: int) -> None:
        answer = raw if self.uses_chat_template else PLAIN_ANSWER_START + raw  # the plain prompt ended with "1."
        seen = {_normalise(text) for text, _ in found}
        for text in parse_versions(answer, class_name, caption, self.max_words):
            if len(found) < m and _normalise(text) not in seen:
                seen.add(_normalise(text))
                found.append((text, raw))

    def _generate(self, prompts: list[str], samples: int, m: int) -> list[list[str]]:
        """`samples` sampled answers per prompt (decoded continuations only)."""
        import torch

        # A chat template writes its own BOS and special tokens; a plain prompt gets the tokenizer's usual ones.
        add_special = not self.uses_chat_template
        batch = self._tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special).to(self.device)
        with torch.inference_mode():
            out = self._model.generate(
                **batch,
                do_sample=True,
                temperature=self.temperature,
                max_new_tokens=self.max_new_tokens * m,
                num_return_sequences=samples,
                pad_token_id=self._tokenizer.pad_token_id,
            )
        texts = self._tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return [texts[i * samples : (i + 1) * samples] for i in range(len(prompts))]  # generate groups by prompt


class ImageCaptioner:
    """Greedy captions from a transformers image-to-text model (BLIP, BLIP-2, GIT, VisionEncoderDecoderModel)."""

    def __init__(
        self, model: str, device: str | None = None, max_new_tokens: int = 30, batch_size: int = 16, param: str = CAPTIONS_PARAM
    ):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        group = param.rsplit(".", 1)[0]
        for key, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if value < 1:
                raise BadInput(f"{group}.{key}: must be >= 1, got {value}")
        self.model_id = model
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        source, self.model_revision = resolve_model(model, param)
        revision = hub_revision(source, self.model_revision)
        self.device = pick_device(device)
        try:
            self._model = AutoModelForImageTextToText.from_pretrained(source, revision=revision, dtype=load_dtype(self.device))
            processor = AutoProcessor.from_pretrained(source, revision=revision)
            if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
                self._image_processor, self._tokenizer = processor, processor.tokenizer  # BLIP, BLIP-2, GIT
            else:  # a VisionEncoderDecoderModel has no processor class: its two halves are saved side by side
                self._image_processor = AutoImageProcessor.from_pretrained(source, revision=revision)
                self._tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        except (OSError, ValueError, KeyError) as exc:
            raise BadInput(f"{param}: {model}: cannot load an image-to-text model with its processor: {exc}") from None
        self._model.to(self.device).eval()

    def caption(self, images: list[bytes]) -> list[str]:
        """One caption per image (PNG/JPEG bytes, grey or colour), in order."""
        import torch

        from synthforge.progress import progress_bar
        from synthforge.vision.images import decode_image

        captions: list[str] = []
        with progress_bar("captioning images", len(images)) as advance:
            for start in range(0, len(images), self.batch_size):
                pictures = []
                for index in range(start, min(start + self.batch_size, len(images))):
                    try:
                        pictures.append(decode_image(images[index]).convert("RGB"))  # grey and RGBA: the models want RGB
                    except ValueError as exc:
                        raise BadInput(f"image {index}: {exc}") from None
                inputs = self._image_processor(images=pictures, return_tensors="pt").to(self.device)
                inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
                with torch.inference_mode():
                    out = self._model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
                # Decoder-only captioners return their image/BOS tokens too; they are special tokens and drop here.
                texts = self._tokenizer.batch_decode(out, skip_special_tokens=True)
                captions += [" ".join(text.split()) for text in texts]
                advance(len(pictures))
        return captions
