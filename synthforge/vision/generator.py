"""What an image generator is asked for, and the families that can answer.

A family has two halves: `adapt` (train or LoRA-adapt the model on the real training images, writing a model
directory) and a generator loaded from that directory that turns `ImageRequest`s into PNG bytes. The generate
stage only sees this interface, so Stable Diffusion and the small class-conditional UNet are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageRequest:
    label: int
    class_name: str
    seed: int  # per-image seed: the same request gives the same image
    caption: str | None = None  # the (perturbed) caption the prompt is built from; unused by class-only models
    init_image: bytes | None = None  # the real seed image for image-to-image; None = generate from noise


@dataclass(frozen=True)
class RealExample:
    """One real training image as the adapt step sees it."""

    image: bytes
    label: int
    class_name: str
    caption: str | None = None
