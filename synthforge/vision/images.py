"""How images travel between stages: PNG bytes in an `image` column, an integer `label`, its `label_name`.

Every image stage reads and writes this content schema; tensors for models are made here, in one place, so
the classifier, VoG and the generators all see the same pixels (float32 in [0, 1], N x C x H x W).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

IMAGE_CONTENT_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # PNG bytes; a datasets.Image feature once published
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("caption", pa.string()),  # the caption the prompt was built from (null for class-only generators)
    ]
)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 H x W (grey) or H x W x 3 (RGB) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_image(data: bytes) -> PILImage.Image:
    """PNG/JPEG/... bytes -> a loaded PIL image. Raises ValueError on bytes that are not an image, and on an image
    whose header claims more pixels than Pillow will decode (a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("empty image (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise ValueError("not a readable image: not a format Pillow knows, or damaged") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large to decode: {exc}") from None
    except Exception as exc:  # damaged data: Pillow's decoders raise many types (OSError, SyntaxError, struct.error...)
        raise ValueError(f"not a readable image: {exc}") from None
    return img


def to_array(data: bytes, channels: int, size: int | None = None) -> np.ndarray:
    """Image bytes -> uint8 H x W x C with the given channel count, resized (bilinear) to size x size if given."""
    from PIL import Image

    img = decode_image(data).convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def to_tensor(images: Sequence[bytes], channels: int, size: int | None = None) -> torch.Tensor:
    """A batch of image bytes -> float32 tensor N x C x H x W in [0, 1]."""
    import torch

    batch = np.stack([to_array(b, channels, size) for b in images])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)


def from_tensor(batch: torch.Tensor) -> list[bytes]:
    """float tensor N x C x H x W in [0, 1] -> PNG bytes per image."""
    arr = (batch.detach().float().clamp(0, 1).mul(255).round().to("cpu").numpy()).astype(np.uint8)
    arr = arr.transpose(0, 2, 3, 1)
    return [encode_png(a[:, :, 0] if a.shape[2] == 1 else a) for a in arr]
