"""Variance of Gradients (VoG, Agarwal et al. 2022) as GenDataAgent uses it to filter synthetic images.

For each image, the gradient of the true class's pre-softmax logit (or its softmax probability) with respect
to the input pixels is taken at each of K classifier checkpoints and averaged over channels. VoG is the
per-pixel population standard deviation of these K gradient maps (1/K, as in eq. 6 of GenDataAgent and the
original VoG code), averaged over pixels. Scores are then z-normalised within each class, and a fraction of
each class is dropped: GenDataAgent drops the LOWEST-VoG samples (it reads low VoG as out of distribution);
the VoG paper reads HIGH VoG as atypical, so the direction is a setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from synthforge.errors import BadInput

if TYPE_CHECKING:
    import torch

VogTarget = Literal["logit", "probability"]
Normalization = Literal["per_class_zscore", "none"]
Direction = Literal["drop_lowest", "drop_highest"]

TARGETS: tuple[str, ...] = ("logit", "probability")
NORMALIZATIONS: tuple[str, ...] = ("per_class_zscore", "none")
DIRECTIONS: tuple[str, ...] = ("drop_lowest", "drop_highest")


def vog_scores(
    models: Sequence[torch.nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    target: VogTarget = "logit",
    batch_size: int = 256,
) -> np.ndarray:
    """Raw VoG per image (float64, length N) over the K >= 2 checkpoints in `models`.

    images: float N x C x H x W (in [0, 1] by the package's convention); labels: N integer class indices.
    Each model maps a batch to logits (B x classes), or to an object whose `.logits` are (transformers).
    The models are scored in eval mode with frozen parameters; afterwards each submodule is back in the
    train/eval mode it had and each parameter has its own `requires_grad` again; no `.grad` is written.
    """
    import torch

    labels = torch.as_tensor(labels)  # a numpy vector of labels is accepted too
    _check_vog_inputs(models, images, labels, target, batch_size)
    n = images.shape[0]
    k = len(models)
    scores = np.empty(n, dtype=np.float64)
    if n == 0:
        return scores

    acc_device = _device_of(models[0], images)
    acc_dtype = torch.float32 if acc_device.type == "mps" else torch.float64  # MPS has no float64
    saved_modes = [(m, m.training) for model in models for m in model.modules()]
    saved_flags = [(p, p.requires_grad) for model in models for p in model.parameters()]
    try:
        for model in models:
            # Eval mode makes every sample independent of its batch (BatchNorm running stats, no dropout),
            # which is what lets one backward pass of the batch's sum give each sample its own gradient.
            model.eval()
            # Only the input gradient is wanted: frozen weights save the forward's bookkeeping for theirs.
            model.requires_grad_(False)
        with torch.enable_grad():
            for start in range(0, n, batch_size):
                batch = images[start : start + batch_size]
                batch_labels = labels[start : start + batch_size]
                # Welford over the checkpoints: only mean and M2 of this batch's gradient maps are held.
                mean = torch.zeros(batch.shape[0], *batch.shape[2:], dtype=acc_dtype, device=acc_device)
                m2 = torch.zeros_like(mean)
                for count, model in enumerate(models, start=1):
                    grad_map = _input_gradient(model, batch, batch_labels, target, start).to(acc_device, acc_dtype)
                    delta = grad_map - mean
                    mean += delta / count
                    m2 += delta * (grad_map - mean)
                per_pixel_std = torch.sqrt(m2 / k)  # population std, 1/K
                scores[start : start + batch.shape[0]] = per_pixel_std.mean(dim=(1, 2)).cpu().numpy()
    finally:
        for module, was_training in saved_modes:
            module.training = was_training
        for param, required_grad in saved_flags:
            param.requires_grad_(required_grad)
    return scores


def _input_gradient(model: torch.nn.Module, batch: torch.Tensor, labels: torch.Tensor, target: str, start: int) -> torch.Tensor:
    """Channel-mean gradient (B x H x W) of each sample's true-class logit or probability w.r.t. its pixels."""
    import torch

    device = _device_of(model, batch)
    x = batch.detach().to(device).requires_grad_(True)
    logits = model(x)
    logits = getattr(logits, "logits", logits)  # transformers' image classifiers return an output object
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise BadInput(f"vog: the model must return logits of shape (batch, classes); got {tuple(logits.shape)}")
    y = labels.to(device=device, dtype=torch.long)
    bad = ((y < 0) | (y >= logits.shape[1])).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise BadInput(f"vog: labels[{start + i}] = {int(y[i])} is not a class of a model with {logits.shape[1]} outputs")
    out = logits if target == "logit" else torch.softmax(logits, dim=1)
    picked = out.gather(1, y[:, None]).sum()
    (grad,) = torch.autograd.grad(picked, x)  # not .backward(): nothing is accumulated into any .grad
    return grad.mean(dim=1)


def _device_of(model: torch.nn.Module, fallback: torch.Tensor) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback.device


def _check_vog_inputs(models: Sequence, images: torch.Tensor, labels: torch.Tensor, target: str, batch_size: int) -> None:
    import torch

    if len(models) < 2:
        raise BadInput(f"vog: models needs at least 2 checkpoints to measure a variance, got {len(models)}")
    if target not in TARGETS:
        raise BadInput(f"vog: target must be one of {', '.join(TARGETS)}; got {target!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise BadInput(f"vog: batch_size must be a positive integer; got {batch_size!r}")
    if images.ndim != 4:
        raise BadInput(f"vog: images must be N x C x H x W; got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise BadInput(f"vog: images must be a float tensor in [0, 1] (see vision.images.to_tensor); got {images.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise BadInput(f"vog: labels must be a vector of {images.shape[0]} class indices; got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise BadInput(f"vog: labels must be integer class indices; got {labels.dtype}")


def normalize_per_class(scores: np.ndarray, labels: np.ndarray, method: Normalization) -> np.ndarray:
    """Scores z-normalised within each class (population std, as the original VoG code), float64.

    A class whose scores are all equal (or that holds one sample) gets 0.0 for every sample, never NaN.
    method="none" returns the scores unchanged (as float64).
    """
    if method not in NORMALIZATIONS:
        raise BadInput(f"vog: normalization method must be one of {', '.join(NORMALIZATIONS)}; got {method!r}")
    scores, labels = _check_scores_labels(scores, labels)
    if method == "none":
        return scores.copy()
    out = np.zeros_like(scores)
    classes, inverse = np.unique(labels, return_inverse=True)
    for c in range(len(classes)):
        members = inverse == c
        values = scores[members]
        # Exact equality, not std == 0: equal floats can still give a tiny nonzero std by rounding of the mean.
        if values.max() == values.min():
            continue
        out[members] = (values - values.mean()) / values.std()
    return out


def select_kept(
    scores: np.ndarray,
    labels: np.ndarray,
    drop_fraction: float,
    direction: Direction = "drop_lowest",
) -> tuple[np.ndarray, dict[int, float | None]]:
    """Drop round(drop_fraction * n_c) samples of each class c: its lowest scores (or highest), ties by index.

    Rounding is half up (0.5 -> 1), so a 25% drop of a 2-sample class drops one. Returns the boolean kept mask
    and, per class, the boundary score: the last score dropped (the largest dropped one for drop_lowest,
    the smallest for drop_highest; every kept sample lies on the far side of it or ties it), None when the
    class drops nothing.
    """
    if direction not in DIRECTIONS:
        raise BadInput(f"vog: direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
    if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, int | float | np.floating | np.integer):
        raise BadInput(f"vog: drop_fraction must be a number in [0, 1); got {drop_fraction!r}")
    if not 0.0 <= float(drop_fraction) < 1.0:
        raise BadInput(f"vog: drop_fraction must be in [0, 1); got {drop_fraction!r}")
    scores, labels = _check_scores_labels(scores, labels)

    kept = np.ones(scores.shape[0], dtype=bool)
    thresholds: dict[int, float | None] = {}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)  # ascending, so the secondary sort key below breaks ties by index
        n_drop = math.floor(float(drop_fraction) * idx.size + 0.5)
        if n_drop == 0:
            thresholds[int(c)] = None
            continue
        key = scores[idx] if direction == "drop_lowest" else -scores[idx]
        order = np.lexsort((idx, key))  # primary: key ascending; ties: lower index first
        dropped = idx[order[:n_drop]]
        kept[dropped] = False
        thresholds[int(c)] = float(scores[dropped[-1]])
    return kept, thresholds


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1:
        raise BadInput(f"vog: scores must be one score per sample (1-D); got shape {scores.shape}")
    if labels.shape != scores.shape:
        raise BadInput(f"vog: labels must have one entry per score ({scores.shape[0]}); got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise BadInput(f"vog: labels must be integer class indices; got dtype {labels.dtype}")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise BadInput(f"vog: scores[{bad[0]}] is {scores[bad[0]]}; scores must be finite")
    return scores, labels
