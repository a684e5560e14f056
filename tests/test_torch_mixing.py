"""synthforge.torch: the real:synthetic proportions of an epoch, the strategies, determinism, DataLoader workers, mix()."""

from __future__ import annotations

import math
import pickle
from collections import Counter

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from synthforge.errors import BadInput
from synthforge.torch import LEVELS, STRATEGIES, ImageTable, MixedDataset, MixedSampler, SyntheticInfo, mix
from synthforge.vision.images import encode_png, to_tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_info(n: int, n_classes: int = 4, **fields) -> SyntheticInfo:
    """n synthetic samples: labels cycle over the classes, difficulty over the four levels."""
    return SyntheticInfo(
        labels=np.arange(n) % n_classes,
        difficulty=[LEVELS[i % len(LEVELS)] for i in range(n)],
        sample_ids=[f"syn-{i}" for i in range(n)],
        **fields,
    )


def split_plan(plan: np.ndarray, n_real: int) -> tuple[np.ndarray, np.ndarray]:
    """(real indices, synthetic indices into the synthetic pool) of one epoch's plan."""
    return plan[plan < n_real], plan[plan >= n_real] - n_real


def draw_counts(sampler: MixedSampler, epochs: int) -> np.ndarray:
    """How often each synthetic sample was drawn over epochs 0..epochs-1."""
    drawn = [split_plan(sampler.plan(e), sampler.n_real)[1] for e in range(epochs)]
    return np.bincount(np.concatenate(drawn), minlength=len(sampler.synthetic))


def assert_follows(counts: np.ndarray, p: np.ndarray, epochs: int) -> None:
    """Each sample's draws over `epochs`, and their total, within 4 binomial standard deviations of epochs * p."""
    expected = epochs * p
    variance = epochs * p * (1 - p)
    assert np.all(np.abs(counts - expected) <= 4 * np.sqrt(variance) + 1e-9), (counts, expected)
    assert abs(counts.sum() - expected.sum()) <= 4 * np.sqrt(variance.sum()) + 1e-9, (counts.sum(), expected.sum())


# -- proportions ------------------------------------------------------------------------------------------


STRATEGY_OPTIONS = {
    "random": {},
    "class_balanced": {},
    "weighted": {"weight_by": "difficulty"},
    "curriculum": {"epochs": 2},
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("ratio, n_synthetic", [(0.1, 5), (0.5, 25), (1.0, 50)])
def test_an_epoch_visits_each_real_sample_once_and_ratio_times_as_many_distinct_synthetic(strategy, ratio, n_synthetic):
    n_real = 50
    info = synthetic_info(80)
    sampler = MixedSampler(np.arange(n_real) % 4, info, ratio, strategy, seed=3, **STRATEGY_OPTIONS[strategy])
    for epoch in (2, 7):  # past the curriculum's pacing: its pool is every sample
        sampler.set_epoch(epoch)
        plan = np.array(list(sampler))
        real, synthetic = split_plan(plan, n_real)
        assert sorted(real) == list(range(n_real))
        assert len(synthetic) == n_synthetic == len(plan) - n_real
        assert len(set(synthetic)) == n_synthetic and synthetic.max() < 80  # no repeat while the pool suffices
        assert len(sampler) == len(plan)
        assert not np.array_equal(plan[:n_real], np.arange(n_real))  # real and synthetic are shuffled together


def test_a_quota_beyond_the_pool_repeats_every_sample_evenly():
    sampler = MixedSampler(np.zeros(20, dtype=int), synthetic_info(8), ratio=1.0)  # 20 draws from 8
    for epoch in range(3):
        counts = Counter(split_plan(sampler.plan(epoch), 20)[1].tolist())
        assert sorted(counts) == list(range(8))
        assert sorted(counts.values()) == [2] * 4 + [3] * 4


def test_ratio_zero_is_real_only():
    sampler = MixedSampler([0, 1, 2], synthetic_info(0), ratio=0.0)
    assert sorted(sampler.plan(0)) == [0, 1, 2] and len(sampler) == 3


# -- class_balanced -----------------------------------------------------------------------------------------


def test_class_balanced_fills_the_thinnest_classes_to_one_level():
    # real per class: 2, 6, 4; synthetic pool per class: 10, 10, 1.
    real = [0] * 2 + [1] * 6 + [2] * 4
    info = SyntheticInfo(labels=[0] * 10 + [1] * 10 + [2] * 1)
    by_class = lambda plan: np.bincount(info.labels[split_plan(plan, 12)[1]], minlength=3)  # noqa: E731

    # 7 draws: class 2 takes its one sample, classes 0 and 1 rise to 7 each.
    sampler = MixedSampler(real, info, 7 / 12, "class_balanced", seed=1)
    for epoch in range(5):
        assert by_class(sampler.plan(epoch)).tolist() == [5, 1, 1]

    # 6 draws: level 6, and the last draw goes to class 0 or class 1, at random per epoch.
    sampler = MixedSampler(real, info, 6 / 12, "class_balanced", seed=1)
    seen = {tuple(by_class(sampler.plan(epoch)).tolist()) for epoch in range(20)}
    assert seen == {(5, 0, 1), (4, 1, 1)}


def test_class_balanced_repeats_a_thin_class_no_more_than_the_epoch_must():
    # 10 draws from a pool of 6 need each sample at most twice: the thin class gets its 2 samples twice each
    # (total 5), the rest goes to the other class.
    real = [0] + [1] * 9
    info = SyntheticInfo(labels=[0, 0, 1, 1, 1, 1])
    sampler = MixedSampler(real, info, 1.0, "class_balanced", seed=0)
    counts = Counter(split_plan(sampler.plan(0), 10)[1].tolist())
    assert counts[0] == counts[1] == 2
    assert sum(counts[i] for i in range(2, 6)) == 6 and max(counts[i] for i in range(2, 6)) == 2


# -- weighted ---------------------------------------------------------------------------------------------


def test_weighted_draw_frequencies_follow_the_weights_and_zero_is_never_drawn():
    sources = np.array(["a@1"] * 10 + ["b@1"] * 10 + ["c@2"] * 10, dtype=object)
    info = SyntheticInfo(labels=np.zeros(30, dtype=int), source=sources)
    sampler = MixedSampler(np.zeros(20, dtype=int), info, 0.5, "weighted", weight_by="source", weights={"a@1": 0, "c@2": 3})
    epochs = 400
    counts = draw_counts(sampler, epochs)
    assert counts.sum() == 10 * epochs
    assert counts[:10].sum() == 0
    # 10 draws per epoch over weights 10 x 1 + 10 x 3: inclusion 10/40 and 30/40, a sample three times as often.
    assert_follows(counts[10:20], np.full(10, 1 / 4), epochs)
    assert_follows(counts[20:], np.full(10, 3 / 4), epochs)


def test_weighted_caps_a_heavy_sample_at_one_draw_per_epoch():
    info = SyntheticInfo(labels=np.zeros(10, dtype=int), batch_id=["heavy"] + ["light"] * 9)
    sampler = MixedSampler(np.zeros(10, dtype=int), info, 0.5, "weighted", weight_by="batch_id", weights={"heavy": 100})
    for epoch in range(50):
        drawn = split_plan(sampler.plan(epoch), 10)[1]
        assert len(drawn) == 5 == len(set(drawn.tolist())) and 0 in drawn
    assert_follows(draw_counts(sampler, 300)[1:], np.full(9, 4 / 9), 300)


def test_weighted_by_judge_score_gives_unscored_samples_the_mean_score():
    scores = np.array([0.0, 1.0, 3.0, np.nan] * 5)  # known mean 4/3
    info = SyntheticInfo(labels=np.zeros(20, dtype=int), judge_score=scores, judge_check="llm_judge")
    sampler = MixedSampler(np.zeros(30, dtype=int), info, 0.1, "weighted", weight_by="judge_score")
    epochs = 400
    counts = draw_counts(sampler, epochs)
    weights = np.array([0.0, 1.0, 3.0, 4 / 3] * 5)
    assert counts[weights == 0].sum() == 0
    assert_follows(counts, 3 * weights / weights.sum(), epochs)


def test_weighted_by_difficulty_defaults_hard_and_adversarial_to_twice_easy():
    info = synthetic_info(40)  # 10 per level
    sampler = MixedSampler(np.zeros(40, dtype=int), info, 0.1, "weighted", weight_by="difficulty")
    weights = np.array([1.0, 1.0, 2.0, 2.0] * 10)
    assert_follows(draw_counts(sampler, 400), 4 * weights / weights.sum(), 400)


# -- curriculum -------------------------------------------------------------------------------------------


def test_easy_to_hard_admits_one_more_level_per_span_of_epochs():
    info = synthetic_info(40)  # 10 per level
    sampler = MixedSampler(np.zeros(20, dtype=int), info, 2.0, "curriculum", curriculum="easy_to_hard", epochs=4)
    for epoch, admitted in [(0, 1), (1, 2), (2, 3), (3, 4), (9, 4)]:
        counts = Counter(split_plan(sampler.plan(epoch), 20)[1].tolist())
        assert {info.difficulty[i] for i in counts} == set(LEVELS[:admitted])
        pool = 10 * admitted  # 40 draws spread evenly over the admitted pool
        assert sum(counts.values()) == 40 and set(counts.values()) <= {40 // pool, -(-40 // pool)}


def test_easy_to_hard_admits_untagged_samples_last():
    info = SyntheticInfo(labels=np.zeros(6, dtype=int), difficulty=["hard", "easy", None, "hard", "easy", None])
    sampler = MixedSampler(np.zeros(6, dtype=int), info, 1.0, "curriculum", curriculum="easy_to_hard", epochs=3)
    levels = [{info.difficulty[i] for i in split_plan(sampler.plan(e), 6)[1]} for e in range(3)]
    assert levels == [{"easy"}, {"easy", "hard"}, {"easy", "hard", None}]


def test_synthetic_after_trains_on_real_only_before_that_epoch():
    info = synthetic_info(40)
    sampler = MixedSampler(np.zeros(30, dtype=int), info, 0.5, "curriculum", curriculum="synthetic_after", synthetic_after=2)
    for epoch, length in [(0, 30), (1, 30), (2, 45), (5, 45)]:
        sampler.set_epoch(epoch)
        plan = np.array(list(sampler))
        assert len(sampler) == len(plan) == length
        assert sorted(plan[plan < 30]) == list(range(30))


# -- determinism ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plans_depend_on_seed_and_epoch_only(strategy):
    def make(seed: int) -> MixedSampler:
        return MixedSampler(np.arange(40) % 3, synthetic_info(60), 0.5, strategy, seed=seed, **STRATEGY_OPTIONS[strategy])

    a, b, other = make(7), make(7), make(8)
    for epoch in range(3):
        assert np.array_equal(a.plan(epoch), b.plan(epoch))
        assert not np.array_equal(a.plan(epoch), other.plan(epoch))
    assert not np.array_equal(a.plan(0), a.plan(1))
    first = list(a)
    assert list(a) == first  # the same epoch again
    a.set_epoch(1)
    assert list(a) == a.plan(1).tolist() != first


# -- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": -0.5}, r"ratio: must be a finite number >= 0"),
        ({"strategy": "stratified"}, r"unknown 'stratified' \(options: random, class_balanced, weighted, curriculum\)"),
        ({"strategy": "weighted"}, r"weight_by: unknown None \(options: judge_score, difficulty, source"),
        ({"strategy": "weighted", "weight_by": "vog"}, r"weight_by: unknown 'vog'"),
        ({"strategy": "random", "weight_by": "difficulty"}, r"only read by strategy 'weighted'"),
        ({"strategy": "weighted", "weight_by": "difficulty", "weights": {"hard": -1}}, r"weights\['hard'\]: must be a finite"),
        ({"strategy": "weighted", "weight_by": "difficulty", "weights": {"hrad": 2}}, r"weights: 'hrad' is not a difficulty"),
        ({"strategy": "weighted", "weight_by": "source", "weights": {"m@1": 1}}, r"weights: 'm@1' is not a source"),
        ({"strategy": "weighted", "weight_by": "judge_score"}, r"no synthetic sample has a score from the judge check"),
        ({"strategy": "curriculum"}, r"epochs: curriculum 'easy_to_hard' needs"),
        ({"strategy": "curriculum", "curriculum": "hard_first", "epochs": 3}, r"curriculum: unknown 'hard_first'"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(kwargs, message):
    with pytest.raises(BadInput, match=message):
        MixedSampler(**{"real_labels": [0, 1], "synthetic": synthetic_info(4), "ratio": 1.0, **kwargs})


def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(BadInput, match=r"asks for 2 synthetic draws per epoch, but no synthetic sample was given"):
        MixedSampler([0, 1], synthetic_info(0), 1.0)
    with pytest.raises(BadInput, match=r"no synthetic sample has a weight above 0"):
        MixedSampler([0, 1], synthetic_info(4), 1.0, "weighted", weight_by="difficulty", weights=dict.fromkeys(LEVELS, 0))
    with pytest.raises(BadInput, match=r"SyntheticInfo.difficulty: 3 values for 2 labels"):
        SyntheticInfo(labels=[0, 1], difficulty=["easy", "hard", "easy"])
    with pytest.raises(BadInput, match=r"unknown level\(s\) trivial"):
        SyntheticInfo(labels=[0], difficulty=["trivial"])
    info = SyntheticInfo(labels=[0, 1], judge_score=[0.5, -1.2], sample_ids=["s0", "s1"], judge_check="vog")
    with pytest.raises(BadInput, match=r"sample s1 has score -1.2 from check 'vog'; weights must be finite and >= 0"):
        MixedSampler([0, 1], info, 0.5, "weighted", weight_by="judge_score")
    with pytest.raises(BadInput, match=r"ImageTable: 2 images but 1 labels"):
        ImageTable([b"", b""], [0], 1, 8)


# -- images, DataLoader, mix() ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits as grey PNG bytes, with their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pngs = [encode_png((img * 255 / 16).round().astype(np.uint8)) for img in data.images[:60]]
    return pngs, data.target[:60].astype(int)


def test_dataloader_batches_are_the_same_with_and_without_workers(digits):
    pngs, labels = digits
    real = ImageTable(pngs[:24], labels[:24], channels=1, size=8)
    synthetic_images = [{"bytes": b, "path": None} for b in pngs[24:]]  # as datasets.Image stores them
    synthetic = ImageTable(synthetic_images, labels[24:], channels=1, size=8)
    dataset = MixedDataset(real, synthetic)
    info = SyntheticInfo(labels=labels[24:])
    sampler = MixedSampler(labels[:24], info, 0.5, "class_balanced", seed=5)
    assert len(pickle.loads(pickle.dumps(dataset))) == 60  # workers started by spawn get a pickled copy

    def batches(num_workers: int, epoch: int) -> list:
        sampler.set_epoch(epoch)
        return list(DataLoader(dataset, batch_size=5, sampler=sampler, num_workers=num_workers))

    for epoch in (0, 1):
        serial, parallel = batches(0, epoch), batches(2, epoch)
        assert len(serial) == len(parallel) == math.ceil(36 / 5)
        for (x0, y0), (x2, y2) in zip(serial, parallel, strict=True):
            assert torch.equal(x0, x2) and torch.equal(y0, y2)
        # The batches are the plan's samples, decoded as the classifier decodes them.
        plan = sampler.plan(epoch)
        assert torch.equal(torch.cat([y for _, y in serial]), torch.as_tensor(labels[plan]))
        assert torch.equal(torch.cat([x for x, _ in serial]), to_tensor([pngs[i] for i in plan], 1, 8))


def published_split(pngs: list[bytes], labels: np.ndarray) -> datasets.Dataset:
    """Rows shaped like a published version's split: datasets.Image, ClassLabel, the provenance struct."""
    levels = ["easy", "hard", None]
    rows = [
        {
            "sample_id": f"s{i:03d}",
            "image": png,
            "label": int(label),
            "provenance": {
                "difficulty": levels[i % 3],
                "judge": {
                    "verdict": "pass",
                    "checks": [
                        {"name": "image_format", "verdict": "pass", "score": 40.0},
                        {"name": "llm_judge", "verdict": "pass", "score": float(i % 4) if i % 5 else None},
                    ],
                },
                "generation": {
                    "method": "unet",
                    "model": "digits-unet",
                    "model_revision": None if i % 2 else "abc123",
                    "batch_id": f"batch-{i // 10}",
                },
            },
        }
        for i, (png, label) in enumerate(zip(pngs, labels, strict=True))
    ]
    ds = datasets.Dataset.from_list(rows)
    ds = ds.cast_column("image", datasets.Image())
    return ds.cast_column("label", datasets.ClassLabel(names=[str(d) for d in range(10)]))


def test_synthetic_info_reads_labels_and_provenance_from_a_dataset_a_table_or_rows(digits):
    pngs, labels = digits
    ds = published_split(pngs[:20], labels[:20]).select(range(19, -1, -1))  # rows selected through an index
    infos = [
        SyntheticInfo.from_rows(ds),
        SyntheticInfo.from_rows(ds.with_format("arrow")[:]),
        SyntheticInfo.from_rows(ds.cast_column("image", datasets.Image(decode=False)).to_list()),
    ]
    ids = [19 - k for k in range(20)]
    for info in infos:
        assert info.sample_ids.tolist() == [f"s{i:03d}" for i in ids]
        assert info.labels.tolist() == labels[ids].tolist()
        assert info.difficulty.tolist() == [["easy", "hard", None][i % 3] for i in ids]
        expected = [float(i % 4) if i % 5 else math.nan for i in ids]  # the llm_judge check's, not image_format's
        np.testing.assert_array_equal(info.judge_score, expected)
        assert info.source.tolist() == ["digits-unet" if i % 2 else "digits-unet@abc123" for i in ids]
        assert info.batch_id.tolist() == [f"batch-{i // 10}" for i in ids]
    vog = SyntheticInfo.from_rows(ds, judge_check="image_format")
    assert vog.judge_score.tolist() == [40.0] * 20


def test_mix_over_a_published_split_trains_end_to_end(digits):
    pngs, labels = digits
    real = datasets.Dataset.from_dict({"image": pngs[:30], "label": labels[:30]}).cast_column("image", datasets.Image())
    synthetic = published_split(pngs[30:], labels[30:])
    dataset, sampler = mix(real, synthetic, ratio=0.5, strategy="weighted", seed=2, weight_by="judge_score")
    assert len(dataset) == 60 and len(sampler) == 45

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = []
        for images, targets in DataLoader(dataset, batch_size=16, sampler=sampler):
            assert images.shape[1:] == (1, 8, 8) and images.dtype == torch.float32
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen.append(targets)
        plan = sampler.plan(epoch)
        assert torch.equal(torch.cat(seen), torch.as_tensor(labels[plan]))
        drawn = split_plan(plan, 30)[1]
        assert len(drawn) == 15 and all((i % 4) or not (i % 5) for i in drawn)  # a judge score of 0: never drawn

    with pytest.raises(BadInput, match=r"got a dataset with splits train; pass one split"):
        mix(real, datasets.DatasetDict({"train": synthetic}), ratio=0.5)
    table = pa.table({"image": pa.array([pngs[0]]), "label": [3]})  # data/real/train.parquet's columns
    small, _ = mix(table, synthetic, ratio=1.0)
    image, label = small[0]
    assert label == 3 and torch.equal(image, to_tensor([pngs[0]], 1, 8)[0])
