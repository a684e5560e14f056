"""The Stable Diffusion generator family: LoRA adaptation of an SD 1.x UNet, then text- or image-to-image generation.

GenDataAgent (sections 2.1 and 2.3, appendices D and E) adapts Stable Diffusion v1.5 to the target images with
LoRA on the prompt "a photo of {class_name}, which is {caption}", then generates with that same prompt format
(built from perturbed captions) either from noise or from the real marginal image (image-to-image, strength
0.5 / 0.75 / 0.9), guidance 7.5 when augmenting real data (2.0 for synthetic-only training) and the negative
prompt "distorted, unrealistic, blurry, out of frame". Real-Fake's CLIP image-feature term in the prompt is
not part of this family.

The adapter is written in diffusers' LoRA format (`pytorch_lora_weights.safetensors`, LoRA config in its
metadata), so `StableDiffusionPipeline.load_lora_weights(adapter_dir)` loads it outside synthforge too.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from synthforge.errors import BadInput
from synthforge.llm.models import pick_device
from synthforge.vision.generator import ImageRequest, RealExample

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PARAMS_KEY = "generator.stable_diffusion"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: what load_lora_weights looks for
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: the LoraConfig in the header
MIXED_PRECISION = {"fp16", "bf16", "no"}


@dataclass
class StableDiffusionOptions:
    """`generator.stable_diffusion` in params.yaml (plain types only: parsed by synthforge.params.parse_options)."""

    base: str  # local directory or hub id of a diffusers SD 1.x pipeline (model_index.json at its root)
    revision: str | None = None  # hub revision (branch, tag or commit) of `base`; recorded as the model revision
    resolution: int = 512  # square side in pixels of training crops and generated images (a multiple of 8)
    prompt_template: str = "a photo of {class_name}, which is {caption}"  # paper's prompt, for adapting and generating
    prompt_template_no_caption: str = "a photo of {class_name}"  # used when a request or example has no caption
    negative_prompt: str = "distorted, unrealistic, blurry, out of frame"  # paper, appendix E
    guidance_scale: float = 7.5  # classifier-free guidance: 7.5 to augment real data, 2.0 for synthetic-only training
    strength: float | None = 0.75  # img2img noise strength in (0, 1] (paper: 0.5/0.75/0.9); None = text-to-image
    num_inference_steps: int = 30  # denoising steps (img2img runs strength x this many)
    batch_size: int = 8  # images per pipeline call when generating
    lora_rank: int = 8  # LoRA rank r of the UNet attention projections
    lora_alpha: int = 8  # LoRA alpha; the update is scaled by alpha / rank
    lora_steps: int = 500  # optimisation steps of the adaptation
    lora_lr: float = 1e-4  # AdamW learning rate of the LoRA weights
    train_batch_size: int = 4  # real images per adaptation step
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # UNet modules
    mixed_precision: str = "fp16"  # dtype on CUDA: fp16, bf16 or no (fp32); CPU always runs fp32
    max_grad_norm: float = 1.0  # gradient clipping of the LoRA weights during adaptation

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> BadInput:
            return BadInput(f"{PARAMS_KEY}.{key}: {why}")

        if self.resolution <= 0 or self.resolution % 8:
            raise bad("resolution", f"must be a positive multiple of 8, got {self.resolution}")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise bad("strength", f"must be in (0, 1] or null for text-to-image, got {self.strength}")
        if self.guidance_scale < 0:
            raise bad("guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        for key in ("num_inference_steps", "batch_size", "lora_rank", "lora_alpha", "lora_steps", "train_batch_size"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.lora_lr <= 0:
            raise bad("lora_lr", f"must be > 0, got {self.lora_lr}")
        if not self.lora_target_modules:
            raise bad("lora_target_modules", "must name at least one UNet module")
        if self.mixed_precision not in MIXED_PRECISION:
            raise bad("mixed_precision", f"must be one of {', '.join(sorted(MIXED_PRECISION))}, got {self.mixed_precision!r}")
        for key, fields in (("prompt_template", {"class_name", "caption"}), ("prompt_template_no_caption", {"class_name"})):
            try:
                getattr(self, key).format(**{name: "x" for name in fields})
            except (KeyError, IndexError, ValueError) as exc:
                raise bad(key, f"placeholders may only be {', '.join('{' + f + '}' for f in sorted(fields))} ({exc!r})") from None

    def prompt(self, class_name: str, caption: str | None) -> str:
        """The prompt for one image: the same format when adapting and generating (paper, section 2.3)."""
        if caption is None or not caption.strip():
            return self.prompt_template_no_caption.format(class_name=class_name)
        return self.prompt_template.format(class_name=class_name, caption=caption.strip())


def adapt_stable_diffusion(options: StableDiffusionOptions, examples: list[RealExample], out_dir: Path, seed: int) -> dict:
    """LoRA-adapt the base UNet to the real images; write the adapter to out_dir and return its metadata.

    Standard latent-diffusion training: VAE latents of the image, noise at a random timestep, MSE between the
    UNet's prediction (conditioned on the text embedding of the example's prompt) and the noise (or velocity).
    Only the LoRA weights train; the VAE, text encoder and base UNet stay frozen.
    """
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from synthforge.progress import progress_bar

    if not examples:
        raise BadInput(f"{PARAMS_KEY}: no real examples to adapt on")
    for i, example in enumerate(examples):  # fail before loading the model, not at step 400
        _decode(example.image, _example_name(example, i))
    prompts = [options.prompt(ex.class_name, ex.caption) for ex in examples]

    device = pick_device(None)
    dtype = _weight_dtype(options, device)
    pipe = _load_pipeline(options, dtype=dtype)
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule of the base
    unet = pipe.unet
    for module in (unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.to(device)
    pipe.vae.eval()
    pipe.text_encoder.eval()

    lora_config = LoraConfig(
        r=options.lora_rank,
        lora_alpha=options.lora_alpha,
        init_lora_weights="gaussian",  # A random, B zero: training starts from the base model exactly
        target_modules=list(options.lora_target_modules),
    )
    losses: list[float] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the LoRA init draws from the global generator
        try:
            unet.add_adapter(lora_config)
        except ValueError as exc:  # peft: a target module that the UNet does not have
            raise BadInput(f"{PARAMS_KEY}.lora_target_modules: {exc}") from None
        lora_params = [p for p in unet.parameters() if p.requires_grad]
        for p in lora_params:
            p.data = p.data.float()  # the trained weights stay fp32 even when the frozen base runs in fp16
        unet.train()
        optimizer = torch.optim.AdamW(lora_params, lr=options.lora_lr)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        gen = torch.Generator().manual_seed(seed)  # batches, noise and timesteps: CPU draws, the same on any device
        order = _batch_indices(len(examples), options.train_batch_size, options.lora_steps, gen)
        with progress_bar("adapting Stable Diffusion (LoRA)", options.lora_steps) as advance:
            for batch in order:
                # Decoded per batch: the whole set at 512 x 512 in float32 would not fit in memory.
                pixels = torch.stack(
                    [_square_pixels(examples[i].image, options.resolution, _example_name(examples[i], i)) for i in batch]
                )
                loss = _training_step(pixels, [prompts[i] for i in batch], pipe, noise_scheduler, gen, device, dtype)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(lora_params, options.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
                advance(1)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_adapter(get_peft_model_state_dict(unet), lora_config, out_dir / ADAPTER_FILE)
    tail = losses[-max(1, len(losses) // 10) :]  # mean of the last 10% of steps: one diffusion loss is very noisy
    log.info("LoRA adapter written to %s after %d steps (final loss %.4f)", out_dir, len(losses), np.mean(tail))
    return {
        "family": "stable_diffusion",
        "base": options.base,
        "revision": options.revision,
        "adapter_file": ADAPTER_FILE,
        "adapter_hash": adapter_hash(out_dir),
        "lora": {
            "rank": options.lora_rank,
            "alpha": options.lora_alpha,
            "target_modules": list(options.lora_target_modules),
            "lr": options.lora_lr,
            "train_batch_size": options.train_batch_size,
            "resolution": options.resolution,
            "prompt_template": options.prompt_template,
            "seed": seed,
        },
        "final_loss": float(np.mean(tail)),
        "steps": len(losses),
        "examples": len(examples),
        "device": device.type,
    }


def adapter_hash(adapter_dir: Path) -> str:
    """sha256 of the adapter file's bytes: what provenance records as the adapter's identity."""
    path = Path(adapter_dir) / ADAPTER_FILE
    if not path.is_file():
        raise BadInput(f"{adapter_dir}: no {ADAPTER_FILE} (not a Stable Diffusion LoRA adapter directory)")
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class StableDiffusionGenerator:
    """Turns ImageRequests into PNG bytes with the base pipeline plus, if given, the adapted LoRA weights."""

    def __init__(self, options: StableDiffusionOptions, adapter_dir: Path | None, device: str | None = None):
        self.options = options
        self.model = options.base
        self.model_revision = options.revision
        self.adapter_hash = adapter_hash(adapter_dir) if adapter_dir is not None else None
        self.device = pick_device(device)
        self.dtype = _weight_dtype(options, self.device)
        self._text2img = _load_pipeline(options, dtype=self.dtype)
        if adapter_dir is not None:
            # Into the UNet only: the adapter has no text-encoder part (pipe.load_lora_weights would warn about it).
            self._text2img.unet.load_lora_adapter(str(adapter_dir), prefix="unet", weight_name=ADAPTER_FILE)
        self._text2img.to(self.device)
        self._text2img.set_progress_bar_config(disable=True)
        self._img2img = None  # built on first use; shares every module with the text-to-image pipeline

    def prompt(self, request: ImageRequest) -> str:
        return self.options.prompt(request.class_name, request.caption)

    def params(self) -> dict:
        """The sampling settings every generated sample records."""
        o = self.options
        return {
            "guidance_scale": o.guidance_scale,
            "strength": o.strength,
            "num_inference_steps": o.num_inference_steps,
            "negative_prompt": o.negative_prompt,
            "resolution": o.resolution,
            "prompt_template": o.prompt_template,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def generate(self, requests: list[ImageRequest]) -> list[bytes]:
        """PNG bytes per request, in order. Text-to-image and image-to-image requests are batched separately."""
        use_init = self.options.strength is not None
        groups = {
            "img2img": [i for i, r in enumerate(requests) if use_init and r.init_image is not None],
            "text2img": [i for i, r in enumerate(requests) if not (use_init and r.init_image is not None)],
        }
        out: list[bytes | None] = [None] * len(requests)
        size = self.options.batch_size
        # No progress bar of its own: the generate stage shows one, and rich cannot show two at once.
        for mode, indices in groups.items():
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                images = self._run_batch([requests[i] for i in chunk], img2img=mode == "img2img")
                for i, png in zip(chunk, images, strict=True):
                    out[i] = png
        return out  # type: ignore[return-value]

    def _run_batch(self, batch: list[ImageRequest], img2img: bool) -> list[bytes]:
        import torch

        from synthforge.vision.images import from_tensor

        opts = self.options
        # One CPU generator per request: its latents (and VAE sample) depend on its seed only, whatever the batch.
        common: dict[str, Any] = {
            "prompt": [self.prompt(r) for r in batch],
            "negative_prompt": [opts.negative_prompt] * len(batch) if opts.negative_prompt else None,
            "generator": [torch.Generator().manual_seed(r.seed) for r in batch],
            "guidance_scale": opts.guidance_scale,
            "num_inference_steps": opts.num_inference_steps,
            "output_type": "pt",
        }
        with torch.inference_mode():
            if img2img:
                init = torch.stack([self._init_pixels(r) for r in batch])
                images = self._img2img_pipeline()(image=init, strength=opts.strength, **common).images
            else:
                images = self._text2img(height=opts.resolution, width=opts.resolution, **common).images
        return from_tensor(images)

    def _init_pixels(self, request: ImageRequest):
        where = f"init_image of the request with seed {request.seed} (label {request.label})"
        return _square_pixels(request.init_image, self.options.resolution, where)

    def _img2img_pipeline(self):
        if self._img2img is None:
            from diffusers import StableDiffusionImg2ImgPipeline

            # Built from the same modules (not from_pipe, which casts them all to its own dtype).
            self._img2img = StableDiffusionImg2ImgPipeline(**self._text2img.components, requires_safety_checker=False)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img


def _training_step(pixels, prompts, pipe, noise_scheduler, gen, device, dtype):
    """One noise-prediction MSE loss on a batch of images in [0, 1]."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        x = (pixels * 2 - 1).to(device, dtype=dtype)  # the VAE expects [-1, 1]
        latents = pipe.vae.encode(x).latent_dist.sample(generator=gen) * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        text = pipe.text_encoder(ids.to(device))[0]
        noise = torch.randn(latents.shape, generator=gen).to(device, dtype=dtype)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(prompts),), generator=gen).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        kind = noise_scheduler.config.prediction_type
        target = noise if kind == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = pipe.unet(noisy, t, encoder_hidden_states=text, return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float())


def _batch_indices(n: int, batch_size: int, steps: int, gen) -> list[list[int]]:
    """`steps` batches walking through shuffled epochs of the examples (so every image is seen equally often)."""
    import torch

    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(n, generator=gen).tolist()
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _example_name(example: RealExample, index: int) -> str:
    return f"real example {index} (label {example.label}, {example.class_name!r})"


def _decode(data: bytes | None, where: str):
    from synthforge.vision.images import decode_image

    try:
        return decode_image(data or b"")
    except ValueError as exc:
        raise BadInput(f"{where}: {exc}") from None


def _square_pixels(data: bytes | None, size: int, where: str):
    """Image bytes -> float32 3 x size x size in [0, 1]: shorter side resized to size, then centre-cropped
    (Stable Diffusion's training recipe; squashing would distort photographs)."""
    import torch
    from PIL import Image

    img = _decode(data, where).convert("RGB")
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _save_adapter(peft_state: dict, lora_config, path: Path) -> None:
    """Write the UNet LoRA in the layout of diffusers' `StableDiffusionPipeline.save_lora_weights`.

    Written here rather than through diffusers because its header carries two metadata keys, which safetensors
    stores in a random order: the same weights would give different bytes, so a different adapter hash and
    a DVC output that changes on every rerun. One key (the LoRA config that keeps alpha exact) is stable.
    """
    import json

    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    weights = convert_state_dict_to_diffusers({k: v.detach().float().cpu().contiguous() for k, v in peft_state.items()})
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}
    # The "unet." prefix on weights and config is what load_lora_weights / unet.load_lora_adapter(prefix="unet") read.
    weights = {f"unet.{k}": v for k, v in weights.items()}
    config = {f"unet.{k}": v for k, v in config.items()}
    save_file(weights, str(path), metadata={LORA_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)})


def _weight_dtype(options: StableDiffusionOptions, device) -> torch.dtype:
    import torch

    if device.type != "cuda" or options.mixed_precision == "no":
        return torch.float32  # half precision on CPU is slow and poorly supported
    return torch.float16 if options.mixed_precision == "fp16" else torch.bfloat16


def _load_pipeline(options: StableDiffusionOptions, dtype):
    """The base text-to-image pipeline (no safety checker); BadInput when `base` is not a loadable SD pipeline."""
    from diffusers import StableDiffusionPipeline

    base = options.base
    local = Path(base).expanduser()
    is_local = local.exists()
    if is_local and not (local / "model_index.json").is_file():
        raise BadInput(f"{PARAMS_KEY}.base: {base}: not a diffusers pipeline directory (no model_index.json)")
    if not is_local and (base.startswith((".", "/", "~")) or base.count("/") != 1):
        raise BadInput(f"{PARAMS_KEY}.base: {base}: no such directory (and not a hub id of the form owner/name)")
    source = str(local) if is_local else base
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, revision=options.revision, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError, TypeError, KeyError) as exc:  # missing files, offline hub, wrong pipeline layout
        what = "a local directory" if is_local else "not a local directory; as a hub id"
        raise BadInput(f"{PARAMS_KEY}.base: {base}: cannot load a Stable Diffusion pipeline ({what}): {exc}") from None
    return pipe
