"""Train on a real dataset mixed with a published synthetic version: a `torch.utils.data` dataset and sampler.

    import synthforge
    from torch.utils.data import DataLoader
    from synthforge.torch import mix

    version = synthforge.load("digits-synth", "1.2.0")
    dataset, sampler = mix(real_train, version["train"], ratio=0.5, strategy="class_balanced", seed=0)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler, num_workers=4)
    for epoch in range(20):
        sampler.set_epoch(epoch)  # as with DistributedSampler: without it every epoch repeats epoch 0's plan
        for images, labels in loader:
            ...

`MixedDataset` holds the real samples first, then the synthetic ones; `MixedSampler` decides which of its
indices an epoch visits. The plan is made in the main process, so the batches are the same whatever
`num_workers` is; the workers only decode the images (`ImageTable` decodes in `__getitem__`).

The ratio real:synthetic is 1:r. Each epoch visits every real sample exactly once and makes q = round(r * n_real)
synthetic draws, shuffled together with the real samples. Draws are without replacement while the eligible pool
suffices; when q exceeds it, every eligible sample appears floor(q / pool) times and the remainder is drawn
without replacement.

Strategies, which synthetic samples fill the quota:
- random: uniform over the pool.
- class_balanced: the quota goes to the classes with the fewest samples (real + synthetic) and fills them up to a
  common level (water-filling), so thin classes get the synthetic samples; the last few draws at the level go
  to tied classes at random. Uniform within a class. A class repeats its synthetic samples no more often than
  the epoch as a whole must (ceil(q / pool) times): a class whose pool runs out stays below the level.
- weighted: sample i is drawn with probability proportional to its weight, capped at one draw per epoch (the
  draws of the capped samples go to the others in proportion to their weights), by systematic sampling over a
  random order: the quota is exact and the frequencies follow the weights. A weight of 0 is never drawn.
  `weight_by` picks the weight:
    judge_score: the score of one judge check (`SyntheticInfo.from_rows(judge_check=...)`, default the LLM
      judge); a sample without it gets the mean of the known scores. Scores must be >= 0.
    difficulty: `weights` maps a level (None: untagged) to its weight, over DIFFICULTY_WEIGHTS
      (easy 1, medium 1, hard 2, adversarial 2, untagged 1).
    source ("model@revision" of provenance.generation), method, batch_id: `weights` maps a value to its
      weight; values not named weigh 1.
- curriculum: curriculum="easy_to_hard" admits the difficulty levels present, easiest first (untagged samples
  last), over `epochs` epochs split into equal spans: with S levels, epoch e admits the 1 + floor(e * S / epochs)
  easiest, so all are in from epoch ceil((S - 1) * epochs / S) on. The quota is drawn uniformly from the
  admitted pool (repeating samples when it is small). curriculum="synthetic_after": epochs before
  `synthetic_after` are real only (n_real indices), later ones mix at random.

Determinism: the plan of an epoch depends only on the seed, the epoch and the inputs (a numpy Generator seeded
with [seed, epoch]); the same seed gives the same plans in any process, another seed other plans.
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler

from synthforge.errors import BadInput
from synthforge.vision.images import decode_image, to_tensor

STRATEGIES = ("random", "class_balanced", "weighted", "curriculum")
WEIGHT_BY = ("judge_score", "difficulty", "source", "method", "batch_id")
CURRICULA = ("easy_to_hard", "synthetic_after")
LEVELS = ("easy", "medium", "hard", "adversarial")  # provenance.difficulty, easiest first
DIFFICULTY_WEIGHTS: dict[str | None, float] = {"easy": 1.0, "medium": 1.0, "hard": 2.0, "adversarial": 2.0, None: 1.0}
JUDGE_CHECK = "llm_judge"  # as the review stage reads the judge score; image pipelines score by `vog` (z-scores, can be < 0)


class ImageTable(Dataset):
    """(image float tensor C x H x W in [0, 1], label) pairs from PNG/JPEG bytes, PIL images, datasets.Image
    values ({bytes, path}) or an Arrow column of those. Images are decoded in `__getitem__`, so DataLoader
    workers do the decoding, with the same pixels the classifier and VoG see (synthforge.vision.images)."""

    def __init__(self, images: Sequence, labels: Sequence[int], channels: int, size: int, ids: Sequence[str] | None = None):
        if len(images) != len(labels):
            raise BadInput(f"ImageTable: {len(images)} images but {len(labels)} labels")
        if ids is not None and len(ids) != len(images):
            raise BadInput(f"ImageTable: {len(images)} images but {len(ids)} ids")
        if channels not in (1, 3):
            raise BadInput(f"ImageTable: channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.channels = channels
        self.size = size
        self.ids = ids

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            image = to_tensor([_image_bytes(self.images[index])], self.channels, self.size)[0]
        except ValueError as exc:
            name = f"sample {self.ids[index]}" if self.ids is not None else f"item {index}"
            raise BadInput(f"ImageTable {name}: {exc}") from None
        return image, int(self.labels[index])


def _image_bytes(image: Any) -> bytes:
    """The encoded bytes of one image as datasets, Arrow or PIL hand it over."""
    if hasattr(image, "as_py"):  # an element of an Arrow column
        image = image.as_py()
    if isinstance(image, dict):  # datasets.Image storage
        if image.get("bytes"):
            return image["bytes"]
        if image.get("path"):
            return Path(image["path"]).read_bytes()
        raise ValueError("image has neither bytes nor a path")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if hasattr(image, "save"):  # a PIL image: PNG is lossless, so decoding gives back its pixels
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise ValueError(f"not an image: {type(image).__name__}")


class MixedDataset(ConcatDataset):
    """The real samples, then the synthetic ones: index i < n_real is real[i], else synthetic[i - n_real]."""

    def __init__(self, real: Dataset, synthetic: Dataset):
        super().__init__([real, synthetic])
        self.real = real
        self.synthetic = synthetic
        self.n_real = len(real)


@dataclass(frozen=True, eq=False)
class SyntheticInfo:
    """What the sampler knows of each synthetic sample, one array entry per sample (in MixedDataset's order).
    Only `labels` is required: a missing field means unknown for every sample (None, or NaN scores)."""

    labels: np.ndarray  # int
    difficulty: np.ndarray | None = None  # object: easy|medium|hard|adversarial|None
    judge_score: np.ndarray | None = None  # float: the score of `judge_check`, NaN where it gave none
    source: np.ndarray | None = None  # object: "model@revision" of provenance.generation
    method: np.ndarray | None = None  # object: provenance.generation.method
    batch_id: np.ndarray | None = None  # object: provenance.generation.batch_id
    sample_ids: np.ndarray | None = None  # object: for messages
    judge_check: str | None = None

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or (len(labels) and not np.issubdtype(labels.dtype, np.integer)):
            raise BadInput(f"SyntheticInfo.labels: expected a 1-D sequence of integers, got {labels.dtype} {labels.shape}")
        object.__setattr__(self, "labels", labels.astype(np.int64))
        n = len(labels)
        for name, default, dtype in (
            ("difficulty", None, object),
            ("judge_score", np.nan, np.float64),
            ("source", None, object),
            ("method", None, object),
            ("batch_id", None, object),
            ("sample_ids", None, object),
        ):
            value = getattr(self, name)
            column = np.full(n, default, dtype=dtype) if value is None else np.asarray(value, dtype=dtype)
            if column.shape != (n,):
                raise BadInput(f"SyntheticInfo.{name}: {column.size} values for {n} labels")
            object.__setattr__(self, name, column)
        unknown = sorted({str(d) for d in self.difficulty if d is not None and d not in LEVELS})
        if unknown:
            raise BadInput(f"SyntheticInfo.difficulty: unknown level(s) {', '.join(unknown)} (levels: {', '.join(LEVELS)})")

    def __len__(self) -> int:
        return len(self.labels)

    def _sample_name(self, i: int) -> str:
        return f"sample {self.sample_ids[i]}" if self.sample_ids[i] is not None else f"synthetic sample {i}"

    @classmethod
    def from_rows(cls, rows: Any, judge_check: str = JUDGE_CHECK) -> SyntheticInfo:
        """From a published version's split (a datasets.Dataset), a pa.Table or a list of row dicts: reads only
        the label, sample_id and provenance columns (no image is decoded). `judge_check` names the check whose
        score is `judge_score`: the checks' scales differ (pixel std, VoG z-score, a rubric's scale)."""
        table = _table(rows, ["label"], ["sample_id", "provenance"], "synthetic")
        n = table.num_rows
        prov = table.column("provenance") if "provenance" in table.column_names else pa.chunked_array([pa.nulls(n)])
        generation = _field(prov, "generation")
        model, revision = _field(generation, "model", pa.string()), _field(generation, "model_revision", pa.string())
        source = pc.if_else(pc.is_null(revision), model, pc.binary_join_element_wise(model, revision, "@"))
        return cls(
            labels=_numpy(table.column("label")),
            difficulty=_numpy(_field(prov, "difficulty", pa.string())),
            judge_score=_check_scores(_field(_field(prov, "judge"), "checks"), judge_check, n),
            source=_numpy(source),
            method=_numpy(_field(generation, "method", pa.string())),
            batch_id=_numpy(_field(generation, "batch_id", pa.string())),
            sample_ids=_numpy(table.column("sample_id")) if "sample_id" in table.column_names else None,
            judge_check=judge_check,
        )


def _table(data: Any, columns: list[str], optional: list[str], what: str) -> pa.Table:
    """The named columns of a datasets.Dataset (its rows as selected, images not decoded), a pa.Table or row dicts."""
    if isinstance(data, dict):  # a DatasetDict: the whole version
        raise BadInput(f"{what}: got a dataset with splits {', '.join(map(str, data))}; pass one split, e.g. version['train']")
    if isinstance(data, list):
        present = [c for c in [*columns, *optional] if data and c in data[0]]
        table = pa.Table.from_pylist([{c: row.get(c) for c in present} for row in data])
    elif isinstance(data, pa.Table):
        table = data
    elif hasattr(data, "select_columns") and hasattr(data, "with_format"):
        wanted = [c for c in [*columns, *optional] if c in data.column_names]
        table = data.select_columns(wanted).with_format("arrow")[:]
    else:
        raise BadInput(f"{what}: expected a datasets.Dataset, a pyarrow Table or a list of row dicts, got {type(data).__name__}")
    missing = [c for c in columns if c not in table.column_names]
    if missing and table.num_rows:
        raise BadInput(f"{what}: no {', '.join(missing)} column (columns: {', '.join(table.column_names)})")
    return table


def _field(array: pa.ChunkedArray, name: str, as_type: pa.DataType | None = None) -> pa.ChunkedArray:
    """A struct's child (null where the struct is null); all nulls when the struct has no such field."""
    if pa.types.is_struct(array.type) and array.type.get_field_index(name) >= 0:
        child = pc.struct_field(array, name)
    else:
        child = pa.chunked_array([pa.nulls(len(array))])
    return child.cast(as_type) if as_type is not None else child


def _numpy(array: pa.ChunkedArray) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False) if array.num_chunks else np.zeros(0)


def _check_scores(checks: pa.ChunkedArray, name: str, n: int) -> np.ndarray:
    """Per row, the mean score of the judge checks called `name` (NaN where none gave a score)."""
    total, count = np.zeros(n), np.zeros(n)
    offset = 0
    for chunk in checks.chunks:
        if pa.types.is_list(chunk.type):
            flat = pc.list_flatten(chunk)
            rows = pc.list_parent_indices(chunk).to_numpy() + offset
            scores = _field(pa.chunked_array([flat]), "score", pa.float64()).to_numpy(zero_copy_only=False)
            named = pc.fill_null(pc.equal(_field(pa.chunked_array([flat]), "name", pa.string()), name), False)
            keep = named.to_numpy(zero_copy_only=False) & ~np.isnan(scores)
            total += np.bincount(rows[keep], scores[keep], minlength=n)
            count += np.bincount(rows[keep], minlength=n)
        offset += len(chunk)
    with np.errstate(invalid="ignore"):
        return total / count


class MixedSampler(Sampler[int]):
    """The indices of a `MixedDataset` that one epoch visits: every real sample once and round(ratio * n_real)
    synthetic draws by `strategy` (see the module's docstring). Call `set_epoch` at the start of each epoch."""

    def __init__(
        self,
        real_labels: Sequence[int],
        synthetic: SyntheticInfo,
        ratio: float,
        strategy: str = "random",
        seed: int = 0,
        *,
        weight_by: str | None = None,
        weights: Mapping[Any, float] | None = None,
        curriculum: str = "easy_to_hard",
        epochs: int | None = None,
        synthetic_after: int = 0,
    ):
        real_labels = np.asarray(real_labels)
        if real_labels.ndim != 1 or not len(real_labels) or not np.issubdtype(real_labels.dtype, np.integer):
            raise BadInput("real_labels: expected a non-empty 1-D sequence of integers (the ratio is relative to them)")
        if not isinstance(ratio, numbers.Real) or not math.isfinite(ratio) or ratio < 0:
            raise BadInput(f"ratio: must be a finite number >= 0 (synthetic draws per real sample), got {ratio!r}")
        if strategy not in STRATEGIES:
            raise BadInput(f"strategy: unknown {strategy!r} (options: {', '.join(STRATEGIES)})")
        if not isinstance(seed, numbers.Integral) or seed < 0:
            raise BadInput(f"seed: must be an integer >= 0, got {seed!r}")
        _check_options(strategy, weight_by, weights, curriculum, epochs, synthetic_after)
        self.real_labels = real_labels.astype(np.int64)
        self.synthetic = synthetic
        self.ratio = ratio
        self.strategy = strategy
        self.seed = seed
        self.curriculum = curriculum
        self.epochs = epochs
        self.synthetic_after = synthetic_after
        self.epoch = 0
        self.n_real = len(real_labels)
        self.quota = round(ratio * self.n_real)

        self.weights = _sample_weights(synthetic, weight_by, weights) if strategy == "weighted" else None
        pool = np.flatnonzero(self.weights > 0) if self.weights is not None else np.arange(len(synthetic))
        if self.quota and not len(pool):
            which = "has a weight above 0" if len(synthetic) else "was given"
            raise BadInput(f"ratio {ratio} asks for {self.quota} synthetic draws per epoch, but no synthetic sample {which}")
        self.pool = pool
        if strategy == "curriculum" and curriculum == "easy_to_hard":
            # Stage of each sample: the rank of its level among those present, untagged samples last.
            ranks = np.array([LEVELS.index(d) if d is not None else len(LEVELS) for d in synthetic.difficulty], dtype=np.int64)
            self.stages = np.unique(ranks, return_inverse=True)[1].reshape(-1)
        if strategy == "class_balanced":
            classes = np.union1d(self.real_labels, synthetic.labels)
            self.real_counts = np.bincount(np.searchsorted(classes, self.real_labels), minlength=len(classes))
            self.class_pools = [np.flatnonzero(synthetic.labels == c) for c in classes]

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration plans (as DistributedSampler): it seeds the plan and paces curricula."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_real + (0 if self._real_only(self.epoch) else self.quota)

    def __iter__(self) -> Iterator[int]:
        return iter(self.plan(self.epoch).tolist())

    def plan(self, epoch: int) -> np.ndarray:
        """The MixedDataset indices of one epoch, in visiting order."""
        if not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise BadInput(f"epoch: must be an integer >= 0, got {epoch!r}")
        rng = np.random.default_rng([self.seed, int(epoch)])
        drawn = np.zeros(0, dtype=np.int64) if self._real_only(epoch) else self._draw_synthetic(rng, epoch)
        return rng.permutation(np.concatenate([np.arange(self.n_real), self.n_real + drawn]))

    def _real_only(self, epoch: int) -> bool:
        delayed = self.strategy == "curriculum" and self.curriculum == "synthetic_after"
        return not self.quota or (delayed and epoch < self.synthetic_after)

    def _draw_synthetic(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        if self.strategy == "class_balanced":
            quota = self._class_quota(rng)
            return np.concatenate([_draw(rng, pool, k) for pool, k in zip(self.class_pools, quota, strict=True)])
        if self.strategy == "weighted":
            return _draw(rng, self.pool, self.quota, self.weights[self.pool])
        if self.strategy == "curriculum" and self.curriculum == "easy_to_hard":
            n_stages = int(self.stages.max()) + 1
            admitted = min(n_stages, 1 + epoch * n_stages // self.epochs)
            return _draw(rng, np.flatnonzero(self.stages < admitted), self.quota)
        return _draw(rng, self.pool, self.quota)

    def _class_quota(self, rng: np.random.Generator) -> np.ndarray:
        """Synthetic draws per class that bring the classes' totals to one level (water-filling)."""
        n, q = self.real_counts, self.quota
        cap = np.array([len(p) for p in self.class_pools]) * -(-q // len(self.pool))

        def placed(level: int) -> int:
            return int(np.clip(level - n, 0, cap).sum())

        low, high = 0, int((n + cap).max())  # the highest level whose fill fits in the quota
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if placed(mid) <= q else (low, mid - 1)
        quota = np.clip(low - n, 0, cap)
        rising = np.flatnonzero((n + quota == low) & (quota < cap))  # the classes that one more level would raise
        quota[rng.choice(rising, q - int(quota.sum()), replace=False)] += 1
        return quota


def _check_options(strategy, weight_by, weights, curriculum, epochs, synthetic_after) -> None:
    if strategy == "weighted":
        if weight_by not in WEIGHT_BY:
            raise BadInput(f"weight_by: unknown {weight_by!r} (options: {', '.join(WEIGHT_BY)})")
    elif weight_by is not None or weights is not None:
        raise BadInput(f"weight_by/weights: only read by strategy 'weighted', not {strategy!r}")
    if strategy == "curriculum" and curriculum not in CURRICULA:
        raise BadInput(f"curriculum: unknown {curriculum!r} (options: {', '.join(CURRICULA)})")
    easy_to_hard = strategy == "curriculum" and curriculum == "easy_to_hard"
    if easy_to_hard and (not isinstance(epochs, numbers.Integral) or epochs < 1):
        raise BadInput(f"epochs: curriculum 'easy_to_hard' needs the number of epochs it paces over (>= 1), got {epochs!r}")
    if epochs is not None and not easy_to_hard:
        raise BadInput("epochs: only read by strategy 'curriculum' with curriculum 'easy_to_hard'")
    if not isinstance(synthetic_after, numbers.Integral) or synthetic_after < 0:
        raise BadInput(f"synthetic_after: must be an integer >= 0, got {synthetic_after!r}")
    if synthetic_after and not (strategy == "curriculum" and curriculum == "synthetic_after"):
        raise BadInput("synthetic_after: only read by strategy 'curriculum' with curriculum 'synthetic_after'")


def _sample_weights(info: SyntheticInfo, weight_by: str, weights: Mapping[Any, float] | None) -> np.ndarray:
    if weight_by == "judge_score":
        if weights is not None:
            raise BadInput("weights: not read with weight_by 'judge_score' (the scores are the weights)")
        scores = info.judge_score
        known = ~np.isnan(scores)
        if not known.any():
            raise BadInput(
                f"weight_by 'judge_score': no synthetic sample has a score from the judge check {info.judge_check!r} "
                "(mix(judge_check=...) or SyntheticInfo.from_rows(judge_check=...) picks the check)"
            )
        if (bad := np.flatnonzero(known & ~(np.isfinite(scores) & (scores >= 0)))).size:
            i = bad[0]
            raise BadInput(
                f"weight_by 'judge_score': {info._sample_name(i)} has score {scores[i]:g} from check {info.judge_check!r}; "
                "weights must be finite and >= 0"
            )
        return np.where(known, scores, scores[known].mean())
    values = getattr(info, weight_by)
    table = dict(DIFFICULTY_WEIGHTS) if weight_by == "difficulty" else {}
    allowed = set(DIFFICULTY_WEIGHTS) if weight_by == "difficulty" else set(values)
    for key, weight in (weights or {}).items():
        if key not in allowed:
            options = ", ".join(sorted(map(str, allowed))[:20])
            raise BadInput(f"weights: {key!r} is not a {weight_by} of the synthetic samples (present: {options})")
        if not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
            raise BadInput(f"weights[{key!r}]: must be a finite number >= 0, got {weight!r}")
        table[key] = float(weight)
    return np.array([table.get(v, 1.0) for v in values], dtype=np.float64)


def _draw(rng: np.random.Generator, pool: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """k draws from pool: each member floor(k / len(pool)) times, the rest without replacement (uniform, or
    with inclusion probabilities proportional to `weights`)."""
    if not k:
        return np.zeros(0, dtype=np.int64)
    copies, rest = divmod(k, len(pool))
    if weights is None:
        picked = rng.choice(pool, rest, replace=False)
    else:
        picked = pool[_systematic(rng, _inclusion(weights, rest))]
    return np.concatenate([np.repeat(pool, copies), picked]).astype(np.int64)


def _inclusion(weights: np.ndarray, k: int) -> np.ndarray:
    """Probabilities that sum to k (< len(weights)), none above 1, proportional to the weights below the cap."""
    p = np.zeros(len(weights))
    capped = np.zeros(len(weights), dtype=bool)
    while True:
        free = ~capped
        p[free] = (k - capped.sum()) * weights[free] / weights[free].sum()
        over = free & (p > 1)
        if not over.any():
            return p
        capped |= over
        p[over] = 1.0


def _systematic(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """round(sum(p)) distinct indices, index i with probability p[i]: evenly spaced points over the cumulated p of
    a random order."""
    order = rng.permutation(len(p))
    edges = np.cumsum(p[order])
    k = round(edges[-1])
    edges[-1] = k  # no rounding error past the last point
    return order[np.searchsorted(edges, rng.random() + np.arange(k), side="right")]


def mix(
    real: Any,
    synthetic: Any,
    ratio: float,
    strategy: str = "random",
    seed: int = 0,
    *,
    channels: int | None = None,
    size: int | None = None,
    judge_check: str = JUDGE_CHECK,
    **sampler_options: Any,
) -> tuple[MixedDataset, MixedSampler]:
    """A dataset and sampler for a DataLoader (`DataLoader(dataset, sampler=sampler, ...)`).

    real: a datasets.Dataset or pa.Table with `image` and `label` columns (data/real/train.parquet), or a pair
    (images, labels). synthetic: a published version's split (`synthforge.load(name, version)["train"]`), a
    pa.Table or row dicts with image, label and provenance. channels and size default to the first real image's.
    The rest (weight_by, weights, curriculum, epochs, synthetic_after) goes to MixedSampler.
    """
    if isinstance(real, tuple):
        real_images, real_labels = real
    else:
        table = _table(real, ["image", "label"], [], "real")
        real_images, real_labels = table.column("image"), _numpy(table.column("label"))
    synthetic_table = _table(synthetic, ["image", "label"], ["sample_id", "provenance"], "synthetic")
    info = SyntheticInfo.from_rows(synthetic_table, judge_check=judge_check)
    if channels is None or size is None:
        if not len(real_images):
            raise BadInput("real: no images (the ratio is relative to them)")
        first = decode_image(_image_bytes(real_images[0]))
        if size is None and first.width != first.height:
            raise BadInput(f"real: the first image is {first.width}x{first.height}, not square: pass size=")
        channels = channels or (1 if len([b for b in first.getbands() if b != "A"]) == 1 else 3)
        size = size or first.width
    images = synthetic_table.column("image") if synthetic_table.num_rows else []
    dataset = MixedDataset(
        ImageTable(real_images, real_labels, channels, size),
        ImageTable(images, info.labels, channels, size, ids=info.sample_ids),
    )
    return dataset, MixedSampler(real_labels, info, ratio, strategy, seed, **sampler_options)
