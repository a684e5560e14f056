"""The Stable Diffusion family on a tiny random-weight SD pipeline built from configs (nothing is downloaded)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest

from synthforge.errors import BadInput
from synthforge.vision.generator import ImageRequest, RealExample
from synthforge.vision.images import decode_image, encode_png
from synthforge.vision.stable_diffusion import (
    ADAPTER_FILE,
    StableDiffusionGenerator,
    StableDiffusionOptions,
    adapt_stable_diffusion,
)

RESOLUTION = 16  # the tiny VAE halves it: 8 x 8 latents


def build_tiny_pipeline(path: Path) -> Path:
    """A Stable Diffusion 1.x pipeline with the real component classes and tiny random weights, saved to path."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        sample_size=RESOLUTION,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    # A character-level CLIP BPE (no merges): every byte-level symbol is a token, alone or ending a word.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for symbol in sorted(ByteLevel.alphabet()):
            vocab[symbol + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd") / "pipeline")


@pytest.fixture(scope="module")
def digits() -> list[RealExample]:
    """Real examples: sklearn's 8 x 8 digits upscaled to the tiny resolution, as RGB PNGs; half with captions."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    examples = []
    for i in range(8):
        grey = Image.fromarray((data.images[i] / 16 * 255).astype(np.uint8))
        rgb = np.asarray(grey.resize((RESOLUTION, RESOLUTION), Image.Resampling.BILINEAR).convert("RGB"))
        label = int(data.target[i])
        caption = "a thin handwritten digit on black" if i % 2 else None
        examples.append(RealExample(image=encode_png(rgb), label=label, class_name=f"digit {label}", caption=caption))
    return examples


def tiny_options(base: Path, **overrides) -> StableDiffusionOptions:
    settings = dict(
        base=str(base),
        resolution=RESOLUTION,
        num_inference_steps=4,
        batch_size=3,
        strength=None,
        lora_steps=3,
        lora_lr=1e-2,  # large enough that three steps visibly move the tiny model
        lora_alpha=16,  # alpha != rank: the adapter's scaling must survive saving and loading
        train_batch_size=4,
    )
    return StableDiffusionOptions(**{**settings, **overrides})


@pytest.fixture(scope="module")
def adapted(tiny_sd, digits, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sd_adapter")
    return out, adapt_stable_diffusion(tiny_options(tiny_sd), digits, out, seed=7)


@pytest.fixture(scope="module")
def generator(tiny_sd, adapted) -> StableDiffusionGenerator:
    return StableDiffusionGenerator(tiny_options(tiny_sd), adapted[0], device="cpu")


def request(seed: int, label: int = 3, caption: str | None = "a bold digit", init_image: bytes | None = None) -> ImageRequest:
    return ImageRequest(label=label, class_name=f"digit {label}", seed=seed, caption=caption, init_image=init_image)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(decode_image(png), dtype=np.float64)


def mean_abs_diff(a: bytes, b: bytes) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def assert_same_images(got: list[bytes], expected: list[bytes]) -> None:
    """Image i is expected[i] and no other. Batches of another size may round a pixel by a grey level (the math
    libraries pick other kernels), so this compares pixels, not bytes."""
    assert len(got) == len(expected)
    for i, png in enumerate(got):
        assert np.abs(pixels(png) - pixels(expected[i])).max() <= 2
        assert all(mean_abs_diff(png, other) > 1.0 for j, other in enumerate(expected) if j != i)


# ---- adaptation ---------------------------------------------------------------------------------------------------


def test_adapt_writes_a_trained_lora_adapter(adapted, tiny_sd):
    from safetensors.torch import load_file

    out, meta = adapted
    weights_file = out / ADAPTER_FILE
    assert meta["family"] == "stable_diffusion"
    assert meta["base"] == str(tiny_sd)
    assert meta["steps"] == 3
    assert np.isfinite(meta["final_loss"])
    assert (
        meta["lora"]["rank"] == 8
        and meta["lora"]["alpha"] == 16
        and meta["lora"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    )
    assert meta["adapter_hash"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()

    weights = load_file(weights_file)
    assert weights and all(key.startswith("unet.") and "lora" in key for key in weights)
    up = {k: v for k, v in weights.items() if "lora.up" in k or "lora_B" in k}
    # LoRA's up projection starts at zero: non-zero up weights mean the adapter was actually trained.
    assert up and all(v.abs().sum() > 0 for v in up.values())


def test_adapt_is_reproducible_for_a_seed(adapted, tiny_sd, digits, tmp_path):
    again = adapt_stable_diffusion(tiny_options(tiny_sd), digits, tmp_path / "again", seed=7)
    other = adapt_stable_diffusion(tiny_options(tiny_sd), digits, tmp_path / "other", seed=8)
    assert again["adapter_hash"] == adapted[1]["adapter_hash"]
    assert other["adapter_hash"] != adapted[1]["adapter_hash"]


def test_adapter_loads_into_a_fresh_generator_and_changes_its_images(generator, adapted, tiny_sd):
    base = StableDiffusionGenerator(tiny_options(tiny_sd), None, device="cpu")
    assert generator.adapter_hash == adapted[1]["adapter_hash"]
    assert base.adapter_hash is None
    assert generator.model == str(tiny_sd) and generator.model_revision is None
    reqs = [request(seed=1), request(seed=2, label=5)]
    for adapted_png, base_png in zip(generator.generate(reqs), base.generate(reqs), strict=True):
        assert mean_abs_diff(adapted_png, base_png) > 0.5  # well above rounding noise (< 0.01)


def test_adapter_is_in_diffusers_lora_format(adapted, tiny_sd):
    """Plain diffusers loads it too, with its rank and alpha (so the LoRA scaling is the trained one)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(adapted[0]), adapter_name="synthforge")
    config = pipe.unet.peft_config["synthforge"]
    assert (config.r, config.lora_alpha) == (8, 16)
    assert set(config.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}


def test_adapt_refuses_no_examples_and_unreadable_images(tiny_sd, digits, tmp_path):
    with pytest.raises(BadInput, match="no real examples"):
        adapt_stable_diffusion(tiny_options(tiny_sd), [], tmp_path, seed=0)
    broken = [digits[0], dataclasses.replace(digits[1], image=b"not a png")]
    with pytest.raises(BadInput, match="real example 1"):
        adapt_stable_diffusion(tiny_options(tiny_sd), broken, tmp_path, seed=0)


# ---- generation ---------------------------------------------------------------------------------------------------


def test_generate_returns_one_png_per_request_in_order(generator):
    reqs = [request(seed=10 + i, label=i) for i in range(5)]  # batch_size 3: two pipeline calls
    images = generator.generate(reqs)
    assert len(images) == 5
    for png in images:
        img = decode_image(png)
        assert img.format == "PNG" and img.size == (RESOLUTION, RESOLUTION) and img.mode == "RGB"
    assert generator.generate(reqs) == images  # the same requests in the same batches: the same bytes
    # Order: each image is its own request's, whatever else shares its batch. Across batch compositions the
    # math libraries may round differently (a grey level here and there), so compare pixels, not bytes.
    assert_same_images(images, [generator.generate([r])[0] for r in reqs])


def test_different_seeds_and_captions_give_different_images(generator):
    a, b, c = generator.generate([request(seed=1), request(seed=2), request(seed=1, caption="a digit on a red wall")])
    assert mean_abs_diff(a, b) > 5.0
    assert mean_abs_diff(a, c) > 0.3  # the caption reaches the model through the prompt


def test_prompt_follows_the_template(generator, tiny_sd):
    assert generator.prompt(request(seed=0, caption="a bold digit")) == "a photo of digit 3, which is a bold digit"
    assert generator.prompt(request(seed=0, caption=None)) == "a photo of digit 3"
    custom = dataclasses.replace(generator.options, prompt_template="{caption}, a {class_name}")
    assert custom.prompt("digit 3", "a bold digit") == "a bold digit, a digit 3"


def test_img2img_starts_from_the_init_image_when_strength_is_set(tiny_sd, adapted, digits):
    first, second = digits[0].image, digits[3].image

    def outputs(strength: float | None) -> tuple[bytes, bytes, bytes]:
        gen = StableDiffusionGenerator(tiny_options(tiny_sd, strength=strength), adapted[0], device="cpu")
        return tuple(gen.generate([request(seed=4, init_image=first), request(seed=4, init_image=second), request(seed=4)]))

    text_first, text_second, text_plain = outputs(None)
    assert text_first == text_second == text_plain  # text-to-image ignores the init image

    low_first, low_second, _ = outputs(0.25)
    high_first, high_second, _ = outputs(1.0)
    assert mean_abs_diff(low_first, text_first) > 1.0
    # At low strength the output keeps much of its init image; at full strength noise has replaced most of it.
    assert mean_abs_diff(low_first, low_second) > 3 * mean_abs_diff(high_first, high_second)


def test_mixed_batch_keeps_order_and_matches_single_requests(tiny_sd, adapted, digits):
    gen = StableDiffusionGenerator(tiny_options(tiny_sd, strength=0.5), adapted[0], device="cpu")
    reqs = [
        request(seed=1, init_image=digits[0].image),
        request(seed=2),
        request(seed=3, init_image=digits[1].image),
        request(seed=4),
    ]
    assert_same_images(gen.generate(reqs), [gen.generate([r])[0] for r in reqs])


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_missing_or_invalid_base_is_bad_input(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BadInput, match=r"generator\.stable_diffusion\.base: .*no-such-model"):
        StableDiffusionGenerator(StableDiffusionOptions(base=str(missing)), None, device="cpu")
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    with pytest.raises(BadInput, match=r"generator\.stable_diffusion\.base: .*empty.*model_index\.json"):
        adapt_stable_diffusion(StableDiffusionOptions(base=str(not_a_pipeline)), [_any_example()], tmp_path / "out", seed=0)


def test_unknown_lora_target_module_is_bad_input(tiny_sd, digits, tmp_path):
    with pytest.raises(BadInput, match=r"generator\.stable_diffusion\.lora_target_modules"):
        adapt_stable_diffusion(tiny_options(tiny_sd, lora_target_modules=["no_such_proj"]), digits, tmp_path, seed=0)


def test_adapter_dir_without_weights_is_bad_input(tiny_sd, tmp_path):
    with pytest.raises(BadInput, match=ADAPTER_FILE):
        StableDiffusionGenerator(tiny_options(tiny_sd), tmp_path, device="cpu")


@pytest.mark.parametrize(
    ("option", "value"),
    [("strength", 1.5), ("strength", 0.0), ("resolution", 20), ("prompt_template", "a {species}"), ("mixed_precision", "fp8")],
)
def test_bad_options_name_the_key(option, value):
    with pytest.raises(BadInput, match=rf"generator\.stable_diffusion\.{option}"):
        StableDiffusionOptions(base="unused", **{option: value})


def test_options_parse_from_params():
    from synthforge.params import parse_options

    raw = {"name": "stable_diffusion", "base": "models/sd15", "strength": None, "lora_target_modules": ["to_q", "to_v"]}
    opts = parse_options(StableDiffusionOptions, raw, "generator.stable_diffusion", "params.yaml")
    assert opts.strength is None and opts.lora_target_modules == ["to_q", "to_v"] and opts.guidance_scale == 7.5
    with pytest.raises(BadInput, match="guidance_scale"):
        parse_options(StableDiffusionOptions, {**raw, "guidance_scale": "high"}, "generator.stable_diffusion", "params.yaml")


def _any_example() -> RealExample:
    return RealExample(image=encode_png(np.zeros((8, 8, 3), dtype=np.uint8)), label=0, class_name="digit 0")
