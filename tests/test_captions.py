"""Captions for image generation: the caption perturber (GenDataAgent 2.3) and the image captioner.

Models are tiny and built here (nothing can be downloaded): a byte-level BPE trained on caption-like answers, a
2-layer GPT-2 trained for a few seconds to write numbered lists of scenes, a GPT-2 that can only stop, and a
ViT + GPT-2 VisionEncoderDecoderModel and a BLIP for captioning. What a real LLM writes is covered by
testing the parser on realistic answers.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from synthforge.errors import BadInput
from synthforge.vision.captions import (
    SYSTEM_PROMPT,
    USER_PROMPT,
    CaptionPerturber,
    ImageCaptioner,
    limit_words,
    parse_versions,
    render_prompt,
)

SUBJECTS = ["a dog", "a cat", "a bird", "a small dog", "an old cat", "a puppy"]
ACTIONS = ["running", "sitting", "sleeping", "walking", "jumping", "resting", "lying", "standing"]
PLACES = [
    "in a field of purple flowers",
    "on a couch",
    "on a plush armchair",
    "by a lake",
    "in the snow",
    "on a wooden porch",
    "under a tree",
    "on a velvet cushion",
    "in the rain",
    "on a sandy beach",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ITEMS = [
    ("american bulldog", "a dog walking through a field of purple flowers"),
    ("Abyssinian", "an Abyssinian cat on a couch"),
    ("robin", "a bird sitting on a branch"),
]


def _answers(n: int, rng: random.Random) -> list[str]:
    """Answers shaped like an LLM's: numbered scenes, one per line."""
    out = []
    for _ in range(n):
        scenes = [f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}" for _ in range(3)]
        out.append("\n".join(f"{i}. {scene}" for i, scene in enumerate(scenes, 1)))
    return out


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = _answers(200, random.Random(0)) + [SYSTEM_PROMPT, USER_PROMPT] + [c for _, c in ITEMS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def _tokenizer(tokenizer_file, chat: bool):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _gpt2_config(tok, **extra):
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        n_positions=512,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained_lm(tokenizer_file):
    """A GPT-2 trained for a couple of seconds on numbered answers, so that it writes something a parser can read."""
    import torch
    from transformers import GPT2LMHeadModel

    tok = _tokenizer(tokenizer_file, chat=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(_gpt2_config(tok))
    texts = [a + tok.eos_token for a in _answers(32, random.Random(1))]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


def _save_lm(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain_lm_dir(tmp_path_factory, trained_lm, tokenizer_file):
    return _save_lm(trained_lm[0], _tokenizer(tokenizer_file, chat=False), tmp_path_factory.mktemp("plain_lm"))


@pytest.fixture(scope="module")
def chat_lm_dir(tmp_path_factory, trained_lm, tokenizer_file):
    return _save_lm(trained_lm[0], _tokenizer(tokenizer_file, chat=True), tmp_path_factory.mktemp("chat_lm"))


@pytest.fixture(scope="module")
def mute_lm_dir(tmp_path_factory, tokenizer_file):
    """A GPT-2 whose every next token is EOS: it never writes a version."""
    import torch
    from transformers import GPT2LMHeadModel

    tok = _tokenizer(tokenizer_file, chat=False)
    model = GPT2LMHeadModel(_gpt2_config(tok))
    with torch.no_grad():  # the final hidden state is a constant aligned with EOS's (tied) output embedding
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(5.0)
        model.transformer.wte.weight[tok.eos_token_id] = 1.0
    return _save_lm(model, tok, tmp_path_factory.mktemp("mute_lm"))


@pytest.fixture(scope="module")
def plain_perturber(plain_lm_dir):
    return CaptionPerturber(str(plain_lm_dir), device="cpu", max_words=6, max_new_tokens=10, batch_size=2)


@pytest.fixture(scope="module")
def chat_perturber(chat_lm_dir):
    return CaptionPerturber(str(chat_lm_dir), device="cpu", max_words=6, max_new_tokens=10)


M = 3  # versions per seed in the model tests


@pytest.fixture(scope="module")
def plain_results(plain_perturber):
    return plain_perturber.perturb(ITEMS, m=M, seed=11)


@pytest.fixture(scope="module")
def chat_results(chat_perturber):
    return chat_perturber.perturb(ITEMS, m=M, seed=11)


def test_the_tiny_lm_learned_to_write_lists(trained_lm):
    assert trained_lm[1] < 1.2  # otherwise the model tests below only ever see gibberish


# ---- the parser, on what real LLMs write ------------------------------------------------------------------

CAPTION = "a dog walking through a field of purple flowers"
CLASS = "american bulldog"


def test_parse_numbered_answer_with_preamble_prefix_quotes_notes_and_sign_off():
    answer = """  Sure! Here are 5 versions of the sentence with subtle changes to the scene:

1. A photo of american bulldog, which is a dog running through a field of purple flowers.
2. A photo of american bulldog, which is a dog sitting in a field of purple flowers (changed "walking" to "sitting")
3. "a dog jumping over a stream"
4. **a dog resting amid a field of purple flowers.**
5. a photo of bulldog which is a dog napping under a tree

I hope these help! Let me know if you need anything else."""
    assert parse_versions(answer, CLASS, CAPTION, max_words=10) == [
        "a dog running through a field of purple flowers",
        "a dog sitting in a field of purple flowers",
        "a dog jumping over a stream",
        "a dog resting amid a field of purple flowers",
        "a dog napping under a tree",
    ]


def test_parse_cuts_long_versions_to_max_words_without_a_dangling_word():
    answer = "1. a dog bounding joyfully across a sunlit meadow full of purple wildflowers while butterflies dance"
    (version,) = parse_versions(answer, CLASS, CAPTION, max_words=10)
    assert version == "a dog bounding joyfully across a sunlit meadow full"  # "of" would dangle
    (short,) = parse_versions(answer, CLASS, CAPTION, max_words=4)
    assert short == "a dog bounding joyfully"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            "1. a cat on a sofa 2. a cat on a rug 3) a cat under a table",
            ["a cat on a sofa", "a cat on a rug", "a cat under a table"],
        ),
        (
            "Version 1: a dog at 5:30 pm in a park\nVersion 2: a dog with 3 puppies",
            ["a dog at 5:30 pm in a park", "a dog with 3 puppies"],
        ),
        (
            "- a dog in the snow\n* a dog on a porch\n• a dog in the rain\nThese are all similar.",
            ["a dog in the snow", "a dog on a porch", "a dog in the rain"],
        ),
        (
            "Here are two versions:\na dog running in the park\n\na dog sitting by a lake\n",
            ["a dog running in the park", "a dog sitting by a lake"],
        ),
        ("1. a dog in the park\n2. a dog in the park.\n3. 'A dog in the park'", ["a dog in the park"]),  # repeats count once
        ("2. a dog in the park\n3) a dog by a lake", ["a dog in the park", "a dog by a lake"]),  # not from 1: lines
    ],
    ids=["inline-numbers", "version-labels", "bullets", "lines-with-chatter", "repeats", "not-from-one"],
)
def test_parse_list_shapes(answer, expected):
    assert parse_versions(answer, CLASS, CAPTION, max_words=10) == expected


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   \n\n",
        "I'm sorry, but I cannot help with that.",
        "1. \n2. ...",
        f"1. {CAPTION}.\n2. A photo of {CLASS}, which is {CAPTION}",
    ],
    ids=["empty", "blank", "refusal", "empty-items", "only-the-original"],
)
def test_parse_finds_nothing_usable(answer):
    assert parse_versions(answer, CLASS, CAPTION, max_words=10) == []


def test_limit_words():
    assert limit_words("  a dog   on a  couch ", 10) == "a dog on a couch"
    assert limit_words("a dog on a couch with a red blanket", 5) == "a dog on a couch"
    assert limit_words("a dog, the cat and the bird", 3) == "a dog"


# ---- prompts --------------------------------------------------------------------------------------------


def test_prompts_are_the_papers():
    system = SYSTEM_PROMPT.format(m=5)
    assert system.startswith("You are an editor tasked with subtly altering the scene described after a comma")
    assert "no more than 10 words" in system and "Respond with 5 versions." in system
    user = USER_PROMPT.format(class_name="Abyssinian", caption="an Abyssinian cat on a couch")
    assert 'Given the sentence "a photo of Abyssinian, which is an Abyssinian cat on a couch"' in user
    assert user.endswith("to depict a similar yet different scenario.")


def test_plain_prompt_without_chat_template(tokenizer_file):
    prompt = render_prompt(_tokenizer(tokenizer_file, chat=False), "robin", "a bird on a branch", 3)
    assert prompt.startswith(SYSTEM_PROMPT.format(m=3))
    assert USER_PROMPT.format(class_name="robin", caption="a bird on a branch") in prompt
    assert prompt.endswith("1.")


def test_template_without_system_role_gets_the_instructions_in_the_user_turn(tokenizer_file):
    tok = _tokenizer(tokenizer_file, chat=False)
    tok.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
    )
    prompt = render_prompt(tok, "robin", "a bird on a branch", 3)
    assert prompt.startswith("[user] " + SYSTEM_PROMPT.format(m=3))
    assert USER_PROMPT.format(class_name="robin", caption="a bird on a branch") in prompt


def _spy_on_prompts(perturber, monkeypatch) -> list[str]:
    """Record the prompts the model is actually given (decoded from generate's input ids, padding removed)."""
    sent: list[str] = []
    model, tok = perturber._model, perturber._tokenizer
    generate = model.generate

    def spy(**kwargs):
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"], strict=True):
            sent.append(tok.decode(ids[mask.bool()]))
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return sent


def test_chat_template_is_what_the_model_sees(chat_perturber, monkeypatch):
    sent = _spy_on_prompts(chat_perturber, monkeypatch)
    chat_perturber.perturb(ITEMS[:2], m=2, seed=0)
    tok = chat_perturber._tokenizer
    for class_name, caption in ITEMS[:2]:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT.format(m=2)},
            {"role": "user", "content": USER_PROMPT.format(class_name=class_name, caption=caption)},
        ]
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) in sent
    assert all(p.startswith("<|system|>\n") and p.endswith("<|assistant|>\n") for p in sent)


def test_plain_prompt_is_what_the_model_sees(plain_perturber, monkeypatch):
    sent = _spy_on_prompts(plain_perturber, monkeypatch)
    plain_perturber.perturb(ITEMS[:1], m=2, seed=0)
    assert sent[0] == render_prompt(plain_perturber._tokenizer, *ITEMS[0], 2)
    assert "<|system|>" not in sent[0] and sent[0].endswith("1.")


# ---- perturbing with a model ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_m_short_variants_per_item(which, request):
    perturber = request.getfixturevalue(f"{which}_perturber")
    results = request.getfixturevalue(f"{which}_results")
    assert len(results) == len(ITEMS)
    for (_, caption), variants in zip(ITEMS, results, strict=True):
        assert len(variants) == M
        parsed = [v for v in variants if v.parsed]
        assert parsed, "the trained tiny model writes numbered scenes: some must parse"
        for v in parsed:
            assert v.text and len(v.text.split()) <= perturber.max_words
            assert v.text.lower() != caption.lower() and v.text in v.raw
        assert len({v.text for v in parsed}) == len(parsed)  # no version twice for one seed


def test_same_seed_same_variants_other_seed_different(plain_perturber, plain_results):
    assert plain_perturber.perturb(ITEMS, m=M, seed=11) == plain_results
    assert plain_perturber.perturb(ITEMS, m=M, seed=12) != plain_results


def test_model_id_and_revision_are_recorded(plain_perturber, chat_perturber, plain_lm_dir, chat_lm_dir):
    assert plain_perturber.model_id == str(plain_lm_dir) and chat_perturber.model_id == str(chat_lm_dir)
    assert re.fullmatch(r"[0-9a-f]{16}", plain_perturber.model_revision)
    # Same weights, different chat template: a different model as far as the prompts are concerned.
    assert plain_perturber.model_revision != chat_perturber.model_revision
    assert CaptionPerturber(str(plain_lm_dir), device="cpu").model_revision == plain_perturber.model_revision


def test_unparseable_output_keeps_the_raw_caption(mute_lm_dir, monkeypatch):
    perturber = CaptionPerturber(str(mute_lm_dir), device="cpu", max_new_tokens=4)
    calls = []
    generate = perturber._model.generate
    monkeypatch.setattr(perturber._model, "generate", lambda **kw: calls.append(kw["num_return_sequences"]) or generate(**kw))
    results = perturber.perturb(ITEMS[:2], m=3, seed=0)
    for (_, caption), variants in zip(ITEMS[:2], results, strict=True):
        assert len(variants) == 3
        assert all(not v.parsed and v.text == caption for v in variants)
    assert calls == [1, 3, 3]  # one answer each, then two rounds of 3 more samples before giving up


def test_unreachable_hub_model_is_bad_input(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **_):
        raise OSError(f"Cannot resolve revision 'main' for model {repo_id!r}: the Hub could not be reached")

    monkeypatch.setattr(huggingface_hub, "resolve_revision", offline)
    with pytest.raises(BadInput, match=r"seeds\.captions\.model: someone/blip: .*cannot be resolved: .*could not be reached"):
        ImageCaptioner("someone/blip")


def test_bad_inputs_name_the_param(tmp_path, plain_perturber):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BadInput, match=rf"seeds\.perturb\.model: {re.escape(str(missing))}: no such directory"):
        CaptionPerturber(str(missing))
    with pytest.raises(BadInput, match=r"seeds\.captions\.model: .*no-such-model: no such directory"):
        ImageCaptioner(str(missing))
    with pytest.raises(BadInput, match=r"my\.key: .*no config\.json"):
        CaptionPerturber(str(tmp_path), param="my.key")
    with pytest.raises(BadInput, match=r"seeds\.perturb\.model: not/a/hub-id: no such directory \(and not a hub id"):
        CaptionPerturber("not/a/hub-id")
    with pytest.raises(BadInput, match=r"seeds\.perturb\.m: must be >= 1"):
        plain_perturber.perturb(ITEMS, m=0, seed=0)
    with pytest.raises(BadInput, match=r"seed 1 \('robin'\) has an empty caption"):
        plain_perturber.perturb([ITEMS[0], ("robin", "  ")], m=2, seed=0)


# ---- captioning -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ved_dir(tmp_path_factory, tokenizer_file):
    import torch
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor

    tok = _tokenizer(tokenizer_file, chat=False)
    encoder = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    decoder = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok), is_decoder=True, add_cross_attention=True
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ved")
    VisionEncoderDecoderModel(config=config).save_pretrained(path)
    tok.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory, tokenizer_file):
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = _tokenizer(tokenizer_file, chat=False)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        encoder_hidden_size=32,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        sep_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("blip")
    BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, projection_dim=32)).save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(path)
    return path


def _pngs() -> list[bytes]:
    from synthforge.vision.images import encode_png

    rng = np.random.default_rng(0)
    grey = [rng.integers(0, 256, (20, 24), dtype=np.uint8) for _ in range(2)]
    rgb = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(3)]
    return [encode_png(a) for a in grey + rgb]


@pytest.mark.parametrize("which", ["ved_dir", "blip_dir"])
def test_captions_one_string_per_image_deterministic(which, request):
    path = request.getfixturevalue(which)
    captioner = ImageCaptioner(str(path), device="cpu", max_new_tokens=6, batch_size=2)
    images = _pngs()
    captions = captioner.caption(images)
    assert len(captions) == len(images) and all(isinstance(c, str) for c in captions)
    assert all(c == " ".join(c.split()) for c in captions)  # no stray whitespace or newlines in a prompt-to-be
    assert captioner.caption(images) == captions
    assert captioner.model_id == str(path) and re.fullmatch(r"[0-9a-f]{16}", captioner.model_revision)


def test_unreadable_image_is_bad_input(ved_dir):
    captioner = ImageCaptioner(str(ved_dir), device="cpu", max_new_tokens=2)
    with pytest.raises(BadInput, match=r"image 1: not a readable image"):
        captioner.caption([_pngs()[0], b"not a png"])


def test_seeds_stage_perturbs_captions_and_each_image_records_its_variant_and_model(digits, plain_lm_dir, tmp_path):
    """GenDataAgent 2.3 through the pipeline: m variants per marginal seed, one per generated image, in provenance."""
    import contextlib
    import shutil

    import yaml
    from conftest import read_rows

    from synthforge.params import load_params
    from synthforge.stages.generate_images import run_generate_images
    from synthforge.stages.seeds import run_seeds

    root, _ = digits
    work = tmp_path / "proj"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("registry", "generated", "judged", "deduped", "tagged", "split"))
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["seeds"] = {"fraction": None, "k": 3, "images_per_seed": 2, "budget": "uniform", "perturb_model": str(plain_lm_dir)}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with contextlib.chdir(work):
        p = load_params("params.yaml")
        stats = run_seeds(p, "data/real", "models/classifier", "data/seeds")
        run_generate_images(p, "data/seeds", "data/real", "models/generator", "data/generated")
    assert stats["perturb_model"] == str(plain_lm_dir)
    rows = read_rows(work / "data" / "generated")
    assert len(rows) == 6
    for row in rows:
        caption = row["provenance"]["generation"]["caption"]
        assert caption["raw"] == row["label_name"] and caption["model"] == str(plain_lm_dir)
        assert caption["parsed"] is not None and 0 < len(caption["perturbed"].split()) <= 10
        assert row["caption"] == caption["perturbed"]  # the caption the prompt is built from
    by_seed: dict[str, set] = {}
    for row in rows:
        by_seed.setdefault(row["provenance"]["generation"]["parent_ids"][0], set()).add(row["caption"])
    assert len(by_seed) == 3
