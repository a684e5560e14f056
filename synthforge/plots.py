"""Figures for dataset cards, as PNG bytes: bars, histograms and image grids by class or difficulty.

Plots are drawn with matplotlib's object API (a `Figure` on an Agg canvas), never through pyplot, so a library
call neither opens windows nor changes the backend of the user's process. The same data gives the same bytes:
the PNG carries no software version or timestamp, and every figure is drawn with the bundled DejaVu font.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from synthforge.errors import BadInput

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure
    from PIL import Image as PILImage

DIFFICULTY_ORDER = ("easy", "medium", "hard", "adversarial")
# Fixed per level, so "hard" has the same colour in every card: a light-to-dark ramp, adversarial apart in purple.
DIFFICULTY_COLORS = {"easy": "#a6d96a", "medium": "#fdae61", "hard": "#d7191c", "adversarial": "#5e3c99"}
NONE_LABEL = "(none)"
MAX_BARS = 12  # labels or generators drawn one by one; the rest add up to "other"
_NONE_COLOR = "#bdbdbd"
_SPLIT_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#d62728")
_MARKER_COLORS = ("#d62728", "#2ca02c", "#9467bd")
_STYLE = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: the same glyphs, so the same bytes, on every machine
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e0e0e0",
    "axes.axisbelow": True,
}
_WIDTH_IN = 8.0  # 800 px at _DPI
_MAX_LABEL_CHARS = 32
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
    return f"{_label(value, _MAX_TITLE_CHARS)}\nn={count}"


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
    return _png(fig)


def _png(fig: MplFigure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})  # no version string: same bytes across installs
    return buf.getvalue()


@contextlib.contextmanager
def _chart(height_in: float) -> Iterator[MplFigure]:
    """A card-wide figure in the house style; the style applies to what is drawn inside the `with` only."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(_WIDTH_IN, height_in), dpi=_DPI, facecolor="white", layout="constrained")
        FigureCanvasAgg(fig)
        yield fig


def _integer_ticks(axis: Any) -> None:
    """Sample counts are whole numbers: no 2.5 samples on an axis."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def top_values(counts: Mapping[Any, int], order: Sequence[Any], limit: int) -> tuple[list[Any], list[Any]]:
    """The `limit` values of `order` with the most samples (ties by that order), kept in `order`, and the others,
    the ones a figure adds up to "other"."""
    shown = set(sorted(order, key=lambda v: -counts.get(v, 0))[:limit])
    return [v for v in order if v in shown], [v for v in order if v not in shown]


def _label(value: Any, limit: int = _MAX_LABEL_CHARS) -> str:
    text = NONE_LABEL if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def difficulty_by_split(counts: Mapping[str, Mapping[str | None, int]]) -> bytes:
    """Samples per split (one bar each, in the given order), stacked by difficulty level in fixed colours.

    counts: {split: {difficulty or None: samples}}; samples without a difficulty stack last, in grey.
    """
    levels = [lv for lv in (*DIFFICULTY_ORDER, None) if any(c.get(lv) for c in counts.values())]
    splits = list(counts)
    with _chart(3.2) as fig:
        ax = fig.add_subplot()
        bottom = np.zeros(len(splits))
        for level in levels:
            heights = np.array([counts[s].get(level, 0) for s in splits])
            ax.bar(
                splits, heights, bottom=bottom, width=0.6, label=_label(level), color=DIFFICULTY_COLORS.get(level, _NONE_COLOR)
            )
            bottom += heights
        for x, total in enumerate(bottom):
            ax.text(x, total, f"{int(total)}", ha="center", va="bottom")
        ax.set_ylabel("samples")
        _integer_ticks(ax.yaxis)
        ax.set_ylim(0, bottom.max() * 1.12)
        ax.grid(axis="x", visible=False)
        ax.legend(title="difficulty", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        return _png(fig)


def label_shares_by_split(counts: Mapping[str, Mapping[Any, int]], order: Sequence[Any], top: int = MAX_BARS) -> bytes:
    """The share of each label within each split, as grouped horizontal bars (one colour per split).

    counts: {split: {label: samples}}; order: the labels in the order to draw them (e.g. class-id order). When
    there are more than `top` labels, the most frequent `top` are drawn and the rest add up to "other".
    """
    totals = Counter()
    for by_label in counts.values():
        totals.update(by_label)
    shown, rest = top_values(totals, order, top)
    rows = [_label(v) for v in shown] + (["other"] if rest else [])
    splits = list(counts)
    bar = 0.8 / len(splits)  # each label's group of bars fills 0.8 of its row
    with _chart(1.0 + 0.12 * len(rows) * (len(splits) + 1)) as fig:
        ax = fig.add_subplot()
        y = np.arange(len(rows))
        for i, split in enumerate(splits):
            n = sum(counts[split].values()) or 1
            shares = [counts[split].get(v, 0) / n * 100 for v in shown]
            if rest:
                shares.append(sum(counts[split].get(v, 0) for v in rest) / n * 100)
            ax.barh(
                y - 0.4 + (i + 0.5) * bar,
                shares,
                height=bar,
                label=f"{split} (n={n})",
                color=_SPLIT_COLORS[i % len(_SPLIT_COLORS)],
            )
        ax.set_yticks(y, rows)
        ax.invert_yaxis()
        ax.set_xlabel("share of the split's samples (%)")
        ax.grid(axis="y", visible=False)
        ax.legend(title="split", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        return _png(fig)


def count_bars(counts: Mapping[str, int], xlabel: str, top: int = MAX_BARS) -> bytes:
    """One horizontal bar per key with its count at the end, largest first; beyond `top` keys the rest are "other"."""
    ordered = sorted(counts, key=lambda k: (-counts[k], k))
    shown, rest = ordered[:top], ordered[top:]
    rows = [(_label(k, 2 * _MAX_LABEL_CHARS), counts[k]) for k in shown]
    if rest:
        rows.append((f"other ({len(rest)})", sum(counts[k] for k in rest)))
    with _chart(1.2 + 0.3 * len(rows)) as fig:
        ax = fig.add_subplot()
        bars = ax.barh([r[0] for r in rows], [r[1] for r in rows], height=0.6, color=_SPLIT_COLORS[0])
        ax.bar_label(bars, padding=3)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        _integer_ticks(ax.xaxis)
        ax.set_xlim(0, max(r[1] for r in rows) * 1.15)
        ax.grid(axis="y", visible=False)
        return _png(fig)


def _bins(values: np.ndarray) -> np.ndarray | int:
    """One bin per integer for integer scores (a 1-5 rubric shows five bars), else at most 30 even bins."""
    lo, hi = float(values.min()), float(values.max())
    if np.all(values == np.round(values)) and hi - lo <= 30:
        return np.arange(lo - 0.5, hi + 1.5)
    return min(30, len(np.histogram_bin_edges(values, bins="auto")) - 1)


def histograms(panels: Sequence[tuple[str, Sequence[float], Mapping[str, float]]]) -> bytes:
    """Score histograms as small multiples, up to three a row: (title, values, {marker label: x}) per panel;
    markers are dashed lines (e.g. the pass threshold `min_score = 3`)."""
    if not panels:
        raise BadInput("histograms: no panel to draw")
    cols = min(3, len(panels))
    n_rows = -(-len(panels) // cols)
    with _chart(0.4 + 2.4 * n_rows) as fig:
        axes = fig.subplots(n_rows, cols, squeeze=False).ravel()
        for ax, (title, values, markers) in zip(axes, panels, strict=False):
            values = np.asarray(values, dtype=np.float64)
            ax.hist(values, bins=_bins(values), color=_SPLIT_COLORS[0], edgecolor="white", linewidth=0.5)
            for (label, x), color in zip(sorted(markers.items()), _MARKER_COLORS, strict=False):
                ax.axvline(x, color=color, linestyle="--", linewidth=1.2, label=f"{label} = {x:g}")
            if markers:
                ax.legend(loc="best", frameon=False)
            ax.set_title(f"{_label(title)} (n={len(values)})")
            ax.set_xlabel("score")
            ax.set_ylabel("samples")
            _integer_ticks(ax.yaxis)
        for ax in axes[len(panels) :]:
            ax.set_axis_off()
        return _png(fig)


def vog_distributions(scores: Sequence[float], by_class: Sequence[tuple[Any, Sequence[float], float | None]]) -> bytes:
    """VoG of the published samples: a histogram of the raw score (left) and, per class, the normalised score as a
    box with the class's drop boundary as a red bar (right). by_class: (class, normalised scores, boundary)."""
    with _chart(max(3.0, 1.0 + 0.32 * len(by_class))) as fig:
        raw, per_class = fig.subplots(1, 2, width_ratios=(1, 1.3))
        scores = np.asarray(scores, dtype=np.float64)
        raw.hist(scores, bins=_bins(scores), color=_SPLIT_COLORS[0], edgecolor="white", linewidth=0.5)
        raw.set_title(f"VoG score (n={len(scores)})")
        raw.set_xlabel("variance of gradients")
        raw.set_ylabel("samples")
        _integer_ticks(raw.yaxis)
        y = np.arange(len(by_class))
        per_class.boxplot(
            [np.asarray(v, dtype=np.float64) for _, v, _ in by_class],
            positions=y,
            orientation="horizontal",
            widths=0.6,
            showfliers=True,
            flierprops={"markersize": 3},
        )
        boundaries = [(i, t) for i, (_, _, t) in enumerate(by_class) if t is not None]
        if boundaries:
            per_class.scatter(
                [t for _, t in boundaries],
                [i for i, _ in boundaries],
                marker="|",
                s=200,
                color="#d62728",
                label="drop boundary",
                zorder=3,
            )
            per_class.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        per_class.set_yticks(y, [_label(c) for c, _, _ in by_class])
        per_class.invert_yaxis()
        per_class.set_title("normalised VoG per class")
        per_class.set_xlabel("normalised VoG")
        return _png(fig)


_VERDICT_COLORS = {"helps": "#1a9641", "hurts": "#d7191c"}  # any other verdict (no effect, too few seeds) in grey
_MAX_SETTING_CHARS = 20


def _setting_colors(settings: Iterable[str]) -> dict[str, str]:
    """The same colour for a setting in every evaluation figure: by its position among the settings."""
    return {name: _SPLIT_COLORS[i % len(_SPLIT_COLORS)] for i, name in enumerate(settings)}


def per_class_accuracy_bars(per_class: Mapping[str, Mapping[str, Mapping[str, Any]]], class_names: Sequence[str]) -> bytes:
    """Accuracy per class, one group of horizontal bars per class (in `class_names` order) and one bar per setting:
    the mean over seeds, with a line of one standard deviation either side.

    per_class: {setting: {class: summary}}, a summary being `synthforge.metrics.summarize` output (mean, std, n),
    i.e. {setting: compare(...)["settings"][setting]["per_class_accuracy"]}. A class without samples has no bar.
    """
    if not per_class or not class_names:
        raise BadInput("per_class_accuracy_bars: no setting or no class to draw")
    colors = _setting_colors(per_class)
    bar = 0.8 / len(per_class)
    with _chart(1.0 + 0.12 * len(class_names) * (len(per_class) + 1)) as fig:
        ax = fig.add_subplot()
        y = np.arange(len(class_names))
        for i, (setting, by_class) in enumerate(per_class.items()):
            summaries = [by_class.get(c) or {} for c in class_names]
            means = [np.nan if s.get("mean") is None else s["mean"] for s in summaries]
            stds = [s.get("std") or 0.0 for s in summaries]
            seeds = max((s.get("n", 0) for s in summaries), default=0)
            ax.barh(
                y - 0.4 + (i + 0.5) * bar,
                means,
                height=bar,
                xerr=stds,
                error_kw={"elinewidth": 1, "capsize": 2},
                label=f"{_label(setting)} ({seeds} seeds)",
                color=colors[setting],
            )
        ax.set_yticks(y, [_label(c) for c in class_names])
        ax.invert_yaxis()
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("accuracy on the class's test samples (mean over seeds ± 1 std)")
        ax.grid(axis="y", visible=False)
        ax.legend(title="setting", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        return _png(fig)


def metrics_by_setting(
    settings: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] | None = None, level: str | None = None
) -> bytes:
    """One panel per metric, two a row: each setting's value per seed as dots and its mean as a bar-wide line,
    the baseline's mean as a dashed line across, and above each other setting its verdict and mean change.

    settings: `synthforge.metrics.compare(...)["settings"]`: {setting: {"overall": {metric: summary},
    "by_difficulty": {level: {metric: summary}}, "verdicts": {metric: verdict}, "verdicts_by_difficulty": ...}};
    the setting without "verdicts" is the baseline. metrics: the panels, by default every metric of "overall" in
    its order. level: draw one difficulty level's figures instead of the overall ones. A metric undefined in every
    run (top-5 with 5 classes or fewer) gets no panel.
    """

    def scope(summary: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        return summary.get(key, {}) if level is None else summary.get(f"{key}_by_difficulty", {}).get(level, {})

    def values(summary: Mapping[str, Any], metric: str) -> list[float]:
        by_metric = summary["overall"] if level is None else summary["by_difficulty"].get(level, {})
        return [v for v in by_metric.get(metric, {}).get("values", []) if v is not None]

    if not settings:
        raise BadInput("metrics_by_setting: no setting to draw")
    metrics = list(next(iter(settings.values()))["overall"]) if metrics is None else list(metrics)
    drawn = [m for m in metrics if any(values(s, m) for s in settings.values())]
    if not drawn:
        where = "overall" if level is None else f"at difficulty {level!r}"
        raise BadInput(f"metrics_by_setting: none of the metrics {metrics} has a value {where}")
    colors = _setting_colors(settings)
    names = list(settings)
    x = np.arange(len(names))
    cols = min(2, len(drawn))
    n_rows = -(-len(drawn) // cols)
    with _chart(0.6 + 2.6 * n_rows) as fig:
        axes = fig.subplots(n_rows, cols, squeeze=False).ravel()
        for ax, metric in zip(axes, drawn, strict=False):
            for i, name in enumerate(names):
                seeds = values(settings[name], metric)
                if not seeds:
                    continue
                offsets = np.linspace(-0.15, 0.15, len(seeds)) if len(seeds) > 1 else np.zeros(1)
                ax.scatter(i + offsets, seeds, s=14, color=colors[name], zorder=3)
                mean = float(np.mean(seeds))
                ax.hlines(mean, i - 0.3, i + 0.3, color=colors[name], linewidth=2.5, zorder=2)
                if "verdicts" not in settings[name]:
                    ax.axhline(mean, color="#7f7f7f", linestyle="--", linewidth=0.8, zorder=1)
                judged = scope(settings[name], "verdicts").get(metric)
                if judged:
                    delta = "" if judged["delta"] is None else f"\n{judged['delta']:+.3f}"
                    ax.text(
                        i,
                        1.0,
                        judged["verdict"].replace("no measurable", "no measurable\n") + delta,
                        transform=ax.get_xaxis_transform(),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color=_VERDICT_COLORS.get(judged["verdict"], "#7f7f7f"),
                    )
            ax.set_title(metric, pad=30)
            ax.set_xticks(x, [_label(n, _MAX_SETTING_CHARS) for n in names], rotation=15, ha="right")
            ax.set_xlim(-0.6, len(names) - 0.4)
            ax.grid(axis="x", visible=False)
        for ax in axes[len(drawn) :]:
            ax.set_axis_off()
        if level is not None:
            fig.suptitle(f"difficulty: {level}")
        return _png(fig)
