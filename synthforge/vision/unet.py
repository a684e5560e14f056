"""The small-domain generator family: a class-conditional diffusers `UNet2DModel`, trained on the real images and
adapted with a LoRA (peft), sampled with DDIM and classifier-free guidance.

`adapt` writes:
    models/generator/
      base/            the UNet (diffusers save_pretrained): trained here from scratch, or copied from `base`
      adapter/         the LoRA adapter (peft save_pretrained); its hash goes into every sample's provenance
      scheduler/       the noise schedule
      generator.json   family, options, adapter hash, loss curves

Class conditioning uses one extra "null" class (index K), dropped in at `cfg_dropout` during training, so
sampling can apply classifier-free guidance with `guidance_scale`. Image-to-image starts from the real seed
image noised to `strength` (the Real-Fake / GenDataAgent latent prior), from pure noise when strength is None.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synthforge.errors import BadInput
from synthforge.progress import progress_bar
from synthforge.provenance import sha256_hex
from synthforge.stagedir import atomic_dir
from synthforge.vision.generator import ImageRequest, RealExample

if TYPE_CHECKING:
    import torch

FAMILY = "unet"


@dataclass
class UNetOptions:
    base: str | None = None  # a trained UNet2DModel folder to adapt; None = train one on the real images first
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    base_steps: int = 1500  # training steps of the base model (ignored when `base` is given)
    batch_size: int = 64
    lr: float = 2e-3
    train_timesteps: int = 1000
    cfg_dropout: float = 0.1  # how often the class is replaced by the null class in training
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_steps: int = 300
    lora_lr: float = 1e-3
    lora_target_modules: list[str] = field(default_factory=lambda: ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"])
    # sampling
    sample_steps: int = 40  # DDIM steps
    guidance_scale: float = 2.0  # classifier-free guidance; 1.0 = none
    strength: float | None = 0.9  # image-to-image noise level on the real seed; None = from pure noise
    batch_size_generate: int = 256

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> BadInput:
            return BadInput(f"generator.unet.{key}: {why}, got {getattr(self, key)!r}")

        if len(self.block_out_channels) < 2 or any(c < 1 for c in self.block_out_channels):
            raise bad("block_out_channels", "need at least 2 positive channel counts")
        for key in ("layers_per_block", "batch_size", "train_timesteps", "lora_rank", "lora_alpha", "sample_steps"):
            if getattr(self, key) < 1:
                raise bad(key, "must be at least 1")
        for key in ("base_steps", "lora_steps"):
            if getattr(self, key) < 0:
                raise bad(key, "must not be negative")
        if self.strength is not None and not 0 < self.strength <= 1:
            raise bad("strength", "must be in (0, 1] (or null for generation from noise)")
        if self.guidance_scale < 1:
            raise bad("guidance_scale", "must be at least 1 (1 = no classifier-free guidance)")
        if not 0 <= self.cfg_dropout < 1:
            raise bad("cfg_dropout", "must be in [0, 1)")


def _hash_dir(path: Path) -> str:
    return sha256_hex(b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()))


def _train_tensors(examples: list[RealExample], channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    from synthforge.vision.images import to_tensor

    x = to_tensor([e.image for e in examples], channels, size) * 2 - 1  # diffusion works in [-1, 1]
    y = torch.tensor([e.label for e in examples])
    return x, y


def _fit(model, params, x, y, steps: int, lr: float, options: UNetOptions, null_class: int, seed: int, label: str) -> list:
    """Noise-prediction MSE over random timesteps; returns the loss every 50 steps."""
    import torch
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=options.train_timesteps, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    model.train()
    curve, running = [], 0.0
    with progress_bar(label, steps) as advance:
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(x), (min(options.batch_size, len(x)),), generator=g)
            x0, labels = x[idx], y[idx].clone()
            labels[torch.rand(len(labels), generator=g) < options.cfg_dropout] = null_class
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, options.train_timesteps, (len(x0),), generator=g)
            pred = model(scheduler.add_noise(x0, noise, t), t, class_labels=labels).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            if step % 50 == 0 or step == steps:
                curve.append(round(running / (50 if step % 50 == 0 else step % 50), 5))
                running = 0.0
            advance(1)
    model.eval()
    return curve


def adapt_unet(
    options: UNetOptions,
    examples: list[RealExample],
    class_names: list[str],
    channels: int,
    out: str | Path,
    seed: int,
    real_digest: str | None = None,
) -> dict[str, Any]:
    """Train (or load) the base UNet, fit a LoRA adapter on the real images, write models/generator atomically."""
    import torch
    from diffusers import DDIMScheduler, UNet2DModel
    from peft import LoraConfig, get_peft_model

    if not examples:
        raise BadInput("generator: no real training images to adapt on")
    out = Path(out)
    # The UNet halves the image once per block after the first: round the side up so the skips line up.
    factor = 2 ** (len(options.block_out_channels) - 1)
    size = -(-max(_image_side(e.image) for e in examples) // factor) * factor
    x, y = _train_tensors(examples, channels, size)
    null_class = len(class_names)
    torch.manual_seed(seed)
    with atomic_dir(out) as tmp:
        if options.base:
            base_path = Path(options.base)
            if not (base_path / "config.json").exists():
                raise BadInput(f"generator.unet.base: {base_path} is not a saved UNet2DModel (no config.json)")
            unet = UNet2DModel.from_pretrained(base_path)
            if unet.config.num_class_embeds != null_class + 1 or unet.config.in_channels != channels:
                raise BadInput(
                    f"generator.unet.base: {base_path} has {unet.config.num_class_embeds} class embeddings and "
                    f"{unet.config.in_channels} channels; this data needs {null_class + 1} (classes + null) and {channels}"
                )
            base_curve = []
        else:
            n_blocks = len(options.block_out_channels)
            unet = UNet2DModel(
                sample_size=size,
                in_channels=channels,
                out_channels=channels,
                layers_per_block=options.layers_per_block,
                block_out_channels=tuple(options.block_out_channels),
                down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n_blocks - 2) + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("AttnUpBlock2D",) * (n_blocks - 2) + ("UpBlock2D",),
                num_class_embeds=null_class + 1,
                norm_num_groups=min(8, min(options.block_out_channels)),
            )
            base_curve = _fit(
                unet, unet.parameters(), x, y, options.base_steps, options.lr, options, null_class, seed, "adapt: base"
            )
        unet.save_pretrained(tmp / "base")
        lora = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, target_modules=options.lora_target_modules)
        peft_unet = get_peft_model(unet, lora)
        trainable = [p for p in peft_unet.parameters() if p.requires_grad]
        lora_curve = _fit(
            peft_unet, trainable, x, y, options.lora_steps, options.lora_lr, options, null_class, seed + 1, "adapt: lora"
        )
        peft_unet.save_pretrained(tmp / "adapter")
        DDIMScheduler(
            num_train_timesteps=options.train_timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=True
        ).save_pretrained(tmp / "scheduler")
        meta = {
            "family": FAMILY,
            "model": "unet2d-class-conditional" if not options.base else str(options.base),
            "base_hash": _hash_dir(tmp / "base"),
            "adapter_hash": _hash_dir(tmp / "adapter"),
            "class_names": class_names,
            "channels": channels,
            "image_size": size,
            "seed": seed,
            "options": asdict(options),
            "base_loss": base_curve,
            "lora_loss": lora_curve,
            "trained_on": len(examples),
            "real_digest": real_digest,
        }
        (tmp / "generator.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _image_side(data: bytes) -> int:
    from synthforge.vision.images import decode_image

    return max(decode_image(data).size)


class UNetGenerator:
    """Loads base + LoRA (merged for speed) and turns requests into PNG bytes; the same request, the same image."""

    def __init__(self, model_dir: str | Path, options: UNetOptions, device: str | None = None):
        import torch
        from diffusers import DDIMScheduler, UNet2DModel
        from peft import PeftModel

        model_dir = Path(model_dir)
        meta_file = model_dir / "generator.json"
        if not meta_file.exists():
            raise BadInput(f"{model_dir}: not an adapted generator (generator.json missing; run `synthforge adapt` first)")
        self.meta = json.loads(meta_file.read_text())
        self.options = options
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        unet = UNet2DModel.from_pretrained(model_dir / "base")
        self.unet = PeftModel.from_pretrained(unet, model_dir / "adapter").merge_and_unload().to(self.device).eval()
        self.scheduler = DDIMScheduler.from_pretrained(model_dir / "scheduler")
        self.model = self.meta["model"]
        self.model_revision = self.meta["base_hash"][:16]
        self.adapter_hash = self.meta["adapter_hash"]
        self.null_class = len(self.meta["class_names"])

    def params(self) -> dict[str, Any]:
        o = self.options
        return {"sample_steps": o.sample_steps, "guidance_scale": o.guidance_scale, "strength": o.strength, "scheduler": "ddim"}

    def generate(self, requests: list[ImageRequest]) -> list[bytes]:
        out: list[bytes] = []
        step = self.options.batch_size_generate
        for start in range(0, len(requests), step):
            out += self._batch(requests[start : start + step])
        return out

    def _batch(self, requests: list[ImageRequest]) -> list[bytes]:
        import torch

        from synthforge.vision.images import from_tensor, to_tensor

        size, channels = self.meta["image_size"], self.meta["channels"]
        shape = (channels, size, size)
        # One generator per request: an image does not depend on the batch it was made in.
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(r.seed)) for r in requests])
        self.scheduler.set_timesteps(self.options.sample_steps)
        timesteps = self.scheduler.timesteps
        strength = self.options.strength
        if strength is not None and all(r.init_image is not None for r in requests):
            start = int(round(len(timesteps) * (1 - strength)))
            timesteps = timesteps[start:]
            x0 = to_tensor([r.init_image for r in requests], channels, size) * 2 - 1
            x = self.scheduler.add_noise(x0, noise, timesteps[:1].repeat(len(requests)))
        else:
            x = noise * self.scheduler.init_noise_sigma
        x = x.to(self.device)
        labels = torch.tensor([r.label for r in requests], device=self.device)
        null = torch.full_like(labels, self.null_class)
        g = self.options.guidance_scale
        with torch.no_grad():
            for t in timesteps:
                tt = torch.full((len(requests),), int(t), device=self.device)
                if g == 1.0:
                    eps = self.unet(x, tt, class_labels=labels).sample
                else:
                    both = self.unet(torch.cat([x, x]), torch.cat([tt, tt]), class_labels=torch.cat([labels, null])).sample
                    cond, uncond = both.chunk(2)
                    eps = uncond + g * (cond - uncond)
                x = self.scheduler.step(eps, t, x).prev_sample
        return from_tensor((x.cpu() + 1) / 2)
