"""Figures for dataset cards, as PNG bytes: image grids by class or difficulty (histograms belong here too).

Plots are drawn with matplotlib's object API (a `Figure` on an Agg canvas), never through pyplot, so a library
call neither opens windows nor changes the backend of the user's process.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from synthforge.errors import BadInput

if TYPE_CHECKING:
    from PIL import Image as PILImage

DIFFICULTY_ORDER = ("easy", "medium", "hard", "adversarial")
_DPI = 100
_PAD = 2  # pixels between thumbnails
_ROW_GAP = 10  # pixels between grid rows
_MAX_TITLE_CHARS = 28

Row = dict[str, Any]


def _key_function(key: str | Callable[[Row], Hashable]) -> Callable[[Row], Hashable]:
    return key if callable(key) else (lambda row: row.get(key))


def _ordered_groups(rows: Iterable[Row], key_of: Callable[[Row], Hashable], order: Sequence[Hashable]) -> list[tuple[Any, list]]:
    """(key value, rows) with the values of `order` first, in that order, then others by name, then None."""
    groups: dict[Hashable, list[Row]] = {}
    for row in rows:
        groups.setdefault(key_of(row), []).append(row)
    rank = {value: i for i, value in enumerate(order)}
    ranked = sorted(groups, key=lambda v: (v is None, rank.get(v, len(rank)), str(v)))
    return [(value, groups[value]) for value in ranked]


def _thumbnail(image: PILImage.Image, size: int) -> PILImage.Image:
    """Fit into size x size. Small images grow by a whole factor with nearest-neighbour so pixels stay square and
    sharp (an 8x8 digit becomes 64x64 blocks, not a blur); large ones shrink smoothly."""
    from PIL import Image

    longest = max(image.size)
    if longest <= size:
        factor = max(1, size // longest)
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    scale = size / longest
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)


def _decode(row: Row, image_column: str) -> PILImage.Image:
    from synthforge.vision.images import decode_image

    try:
        return decode_image(row[image_column])
    except ValueError as exc:
        raise BadInput(f"sample {row.get('sample_id')}: column {image_column!r}: {exc}") from None


def _strip(images: list[PILImage.Image], mode: str, size: int, per_row: int) -> np.ndarray:
    """One row of thumbnails on a white background, each centred in its size x size cell."""
    channels = 3 if mode == "RGB" else 1
    strip = np.full((size, per_row * (size + _PAD) - _PAD, channels), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        thumb = np.asarray(_thumbnail(image.convert(mode), size), dtype=np.uint8)
        thumb = thumb[:, :, None] if thumb.ndim == 2 else thumb
        top = (size - thumb.shape[0]) // 2
        left = i * (size + _PAD) + (size - thumb.shape[1]) // 2
        strip[top : top + thumb.shape[0], left : left + thumb.shape[1]] = thumb
    return strip[:, :, 0] if channels == 1 else strip


def _row_title(value: Any, count: int) -> str:
    text = "(none)" if value is None else str(value)
    if len(text) > _MAX_TITLE_CHARS:
        text = text[: _MAX_TITLE_CHARS - 1] + "…"
    return f"{text}\nn={count}"


def image_grid_by(
    rows: Iterable[Row],
    key: str | Callable[[Row], Hashable],
    *,
    order: Sequence[Hashable] = (),
    per_row: int = 8,
    thumb_px: int = 64,
    title: str | None = None,
    image_column: str = "image",
) -> bytes:
    """A PNG with one row of up to `per_row` thumbnails for each value of `key`, the value and its count at the left.

    key: a content column (e.g. "label_name") or a function of the row (e.g. its provenance difficulty).
    order: key values drawn first, in this order (e.g. DIFFICULTY_ORDER); other values follow by name, None last.
    The thumbnails of a value are its first `per_row` rows by sample_id, so the figure is the same on every run.
    Rows without an image are left out.
    """
    if per_row < 1 or thumb_px < 4:
        raise BadInput(f"image_grid_by: per_row must be >= 1 and thumb_px >= 4 (got {per_row}, {thumb_px})")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_image = [row for row in rows if row.get(image_column) is not None]
    if not with_image:
        raise BadInput(f"image_grid_by: no row has an image in column {image_column!r}")
    groups = _ordered_groups(with_image, _key_function(key), order)
    shown = []
    for value, members in groups:
        first = sorted(members, key=lambda r: str(r.get("sample_id")))[:per_row]
        shown.append((value, len(members), [_decode(r, image_column) for r in first]))
    # Grey stays grey (drawn with a grey colormap); any colour image makes the whole figure RGB.
    mode = "L" if all(img.mode in ("1", "L", "I", "I;16", "F") for _, _, images in shown for img in images) else "RGB"
    strips = [(_row_title(value, count), _strip(images, mode, thumb_px, per_row)) for value, count, images in shown]

    # Lay the figure out in pixels so each thumbnail is drawn 1:1, with no resampling by matplotlib.
    title_px = 36 if title else 8
    label_px = 16 + 8 * max(len(line) for text, _ in strips for line in text.splitlines())
    strip_w = strips[0][1].shape[1]
    width, height = label_px + strip_w + 8, title_px + len(strips) * (thumb_px + _ROW_GAP) + 4
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    if title:
        fig.text(8 / width, 1 - 10 / height, title, ha="left", va="top", fontsize=12, weight="bold")
    for i, (text, strip) in enumerate(strips):
        top = title_px + i * (thumb_px + _ROW_GAP)
        bottom = 1 - (top + thumb_px) / height
        ax = fig.add_axes((label_px / width, bottom, strip_w / width, thumb_px / height))
        ax.imshow(strip, cmap="gray" if mode == "L" else None, vmin=0, vmax=255, interpolation="nearest", aspect="auto")
        ax.set_axis_off()
        fig.text((label_px - 8) / width, bottom + thumb_px / 2 / height, text, ha="right", va="center", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})  # no version string: same bytes across installs
    return buf.getvalue()
