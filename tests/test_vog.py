"""VoG: the batched, Welford-accumulated scores against a per-sample reference; per-class normalisation and the filter."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from synthforge.errors import BadInput
from synthforge.vision.vog import normalize_per_class, select_kept, vog_scores

N_CLASSES = 4
SIZE = 8


def tiny_cnn(channels: int) -> nn.Module:
    # BatchNorm and Dropout on purpose: in train mode they couple samples in a batch / add noise, so scoring that
    # forgot eval mode would miss the reference and depend on the batch's other samples.
    return nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, N_CLASSES),
    )


def make_checkpoints(channels: int, k: int = 3, steps_between: int = 4, seed: int = 0) -> list[nn.Module]:
    """K snapshots of one tiny CNN trained a few SGD steps further each time, as a fine-tuning run saves them."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = tiny_cnn(channels)
    x = torch.rand(32, channels, SIZE, SIZE, generator=gen)
    y = torch.randint(0, N_CLASSES, (32,), generator=gen)
    checkpoints = []
    for _ in range(k):
        model.train()
        for _ in range(steps_between):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            with torch.no_grad():  # plain SGD by hand: importing torch.optim costs seconds (it pulls in dynamo)
                for p in model.parameters():
                    p -= 0.5 * p.grad
        checkpoints.append(copy.deepcopy(model))
    for m in checkpoints:
        m.zero_grad(set_to_none=True)
    return checkpoints


def reference_vog(models, images, labels, target) -> np.ndarray:
    """The plain definition: per sample, per checkpoint, its own backward; np.std over checkpoints; mean over pixels."""
    scores = []
    for img, label in zip(images, labels, strict=True):
        maps = []
        for model in models:
            model.eval()
            x = img[None].clone().requires_grad_(True)
            out = model(x)
            if target == "probability":
                out = torch.softmax(out, dim=1)
            (grad,) = torch.autograd.grad(out[0, int(label)], x)
            maps.append(grad[0].mean(dim=0).numpy().astype(np.float64))
        scores.append(np.std(np.stack(maps), axis=0).mean())
    return np.array(scores)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints() -> dict[int, list[nn.Module]]:
    return {c: make_checkpoints(c) for c in (1, 3)}


def data(channels: int, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, SIZE, SIZE, generator=gen), torch.randint(0, N_CLASSES, (n,), generator=gen)


def module_state(models) -> list[tuple[bool, ...]]:
    return [tuple(m.training for m in model.modules()) for model in models]


# --- vog_scores ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("target", ["logit", "probability"])
def test_batched_scores_equal_per_sample_reference(checkpoints, channels, target):
    models = checkpoints[channels]
    images, labels = data(channels, 23)
    got = vog_scores(models, images, labels, target=target, batch_size=5)  # 5 does not divide 23
    want = reference_vog(models, images, labels, target)
    assert got.dtype == np.float64 and got.shape == (23,)
    assert np.abs(got - want).max() < 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-4)  # also relative: the scores are small numbers
    assert (want > 0).all() and np.unique(want).size == want.size  # the checkpoints really differ per sample


def test_identical_checkpoints_give_exactly_zero(checkpoints):
    model = checkpoints[3][0]
    images, labels = data(3, 10)
    for target in ("logit", "probability"):
        scores = vog_scores([model, copy.deepcopy(model), model], images, labels, target=target, batch_size=4)
        assert (scores == 0.0).all()


def test_score_does_not_depend_on_batch_company(checkpoints):
    models = checkpoints[1]
    images, labels = data(1, 12)
    others, other_labels = data(1, 40, seed=7)
    alone = vog_scores(models, images, labels, batch_size=1)
    mixed = vog_scores(
        models,
        torch.cat([others[:20], images, others[20:]]),
        torch.cat([other_labels[:20], labels, other_labels[20:]]),
        batch_size=64,
    )
    reversed_ = vog_scores(models, images.flip(0), labels.flip(0), batch_size=5)
    np.testing.assert_allclose(mixed[20:32], alone, rtol=1e-6)
    np.testing.assert_allclose(reversed_[::-1], alone, rtol=1e-6)


def test_models_modes_requires_grad_and_grads_left_as_found():
    models = make_checkpoints(3, seed=3)
    models[0].train()
    models[1].eval()
    models[1][3].train()  # one submodule in a mode of its own
    models[2].train()
    models[2][0].weight.requires_grad_(False)  # a frozen layer stays frozen, the others stay trainable
    before = module_state(models)
    flags = [[p.requires_grad for p in m.parameters()] for m in models]
    images, labels = data(3, 9)
    vog_scores(models, images, labels, batch_size=4)
    assert module_state(models) == before
    assert [[p.requires_grad for p in m.parameters()] for m in models] == flags
    assert all(p.grad is None for m in models for p in m.parameters())
    assert images.grad is None and not images.requires_grad


def test_modes_restored_after_a_bad_label():
    models = make_checkpoints(1, seed=4)
    for m in models:
        m.train()
    before = module_state(models)
    images, labels = data(1, 10)
    labels[7] = N_CLASSES
    with pytest.raises(BadInput, match=r"labels\[7\]"):
        vog_scores(models, images, labels, batch_size=4)
    assert module_state(models) == before


def test_scores_under_no_grad_are_the_same(checkpoints):
    images, labels = data(3, 6)
    want = vog_scores(checkpoints[3], images, labels)
    with torch.no_grad():
        got = vog_scores(checkpoints[3], images, labels)
    np.testing.assert_array_equal(got, want)


class LogitsOutput(nn.Module):
    """A classifier that returns an object with `.logits`, as transformers' image classifiers do."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return SimpleNamespace(logits=self.inner(x))


def test_models_returning_an_output_object_score_the_same(checkpoints):
    images, labels = data(3, 7)
    wrapped = [LogitsOutput(m) for m in checkpoints[3]]
    np.testing.assert_array_equal(vog_scores(wrapped, images, labels), vog_scores(checkpoints[3], images, labels))


def test_vog_bad_input_names_the_param(checkpoints):
    models = checkpoints[1]
    images, labels = data(1, 4)
    with pytest.raises(BadInput, match="checkpoints"):
        vog_scores(models[:1], images, labels)
    with pytest.raises(BadInput, match="target"):
        vog_scores(models, images, labels, target="loss")
    with pytest.raises(BadInput, match="batch_size"):
        vog_scores(models, images, labels, batch_size=0)
    with pytest.raises(BadInput, match="images"):
        vog_scores(models, images[0], labels)
    with pytest.raises(BadInput, match="images"):
        vog_scores(models, (images * 255).to(torch.uint8), labels)
    with pytest.raises(BadInput, match="labels"):
        vog_scores(models, images, labels[:3])
    with pytest.raises(BadInput, match="labels"):
        vog_scores(models, images, labels.float())


# --- normalize_per_class ------------------------------------------------------------------------------


def test_per_class_zscore_and_degenerate_classes():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 17 + [2] * 5 + [3] + [4] * 6)
    scores = rng.gamma(2.0, 3.0, size=labels.size) * (labels + 1)  # classes on different scales
    scores[labels == 4] = 0.1  # constant class: its float mean is not exactly 0.1, its std not exactly 0
    z = normalize_per_class(scores, labels, "per_class_zscore")
    for c in (0, 1, 2):
        assert z[labels == c].mean() == pytest.approx(0.0, abs=1e-12)
        assert z[labels == c].std() == pytest.approx(1.0)
        # z-scoring keeps the order within a class
        assert (np.argsort(z[labels == c], kind="stable") == np.argsort(scores[labels == c], kind="stable")).all()
    assert (z[labels == 3] == 0.0).all() and (z[labels == 4] == 0.0).all()
    assert np.isfinite(z).all()
    np.testing.assert_array_equal(normalize_per_class(scores, labels, "none"), scores)


def test_normalize_bad_input():
    with pytest.raises(BadInput, match="method"):
        normalize_per_class(np.zeros(3), np.zeros(3, dtype=int), "minmax")
    with pytest.raises(BadInput, match="labels"):
        normalize_per_class(np.zeros(3), np.zeros(2, dtype=int), "none")
    with pytest.raises(BadInput, match=r"scores\[1\]"):
        normalize_per_class(np.array([0.0, np.nan, 1.0]), np.zeros(3, dtype=int), "per_class_zscore")


# --- select_kept --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("direction", ["drop_lowest", "drop_highest"])
def test_select_kept_drops_round_fraction_per_class_at_the_chosen_end(fraction, direction):
    rng = np.random.default_rng(1)
    sizes = {0: 8, 1: 13, 2: 6, 5: 2}  # class 5 is small: round(f * 2) is 0 or 2 or 1
    labels = rng.permutation(np.concatenate([np.full(n, c) for c, n in sizes.items()]))
    scores = rng.normal(size=labels.size)
    kept, thresholds = select_kept(scores, labels, fraction, direction)
    assert set(thresholds) == set(sizes)
    for c, n in sizes.items():
        members = labels == c
        dropped, kept_scores = scores[members & ~kept], scores[members & kept]
        assert dropped.size == math.floor(fraction * n + 0.5)  # round half up
        if dropped.size == 0:
            assert thresholds[c] is None
        elif direction == "drop_lowest":
            assert kept_scores.size == 0 or dropped.max() < kept_scores.min()
            assert thresholds[c] == dropped.max()
        else:
            assert kept_scores.size == 0 or dropped.min() > kept_scores.max()
            assert thresholds[c] == dropped.min()


def test_select_kept_ties_broken_by_index_and_zero_fraction():
    scores = np.array([1.0, 5.0, 1.0, 1.0, 5.0, 1.0])
    labels = np.array([0, 0, 0, 0, 0, 0])
    kept, thr = select_kept(scores, labels, 0.5, "drop_lowest")
    assert kept.tolist() == [False, True, False, False, True, True] and thr == {0: 1.0}
    kept, thr = select_kept(scores, labels, 0.5, "drop_highest")
    assert kept.tolist() == [False, False, True, True, False, True] and thr == {0: 1.0}
    kept, thr = select_kept(scores, labels, 0.0)
    assert kept.all() and thr == {0: None}


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"drop_fraction": 1.0}, "drop_fraction"),
        ({"drop_fraction": -0.1}, "drop_fraction"),
        ({"drop_fraction": "0.5"}, "drop_fraction"),
        ({"drop_fraction": float("nan")}, "drop_fraction"),
        ({"drop_fraction": 0.5, "direction": "lowest"}, "direction"),
    ],
)
def test_select_kept_bad_params_raise(kwargs, param):
    with pytest.raises(BadInput, match=param):
        select_kept(np.arange(4.0), np.array([0, 0, 1, 1]), **kwargs)
