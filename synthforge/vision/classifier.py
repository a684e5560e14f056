"""The reference classifier: trained on the real training split, it scores marginal examples, drives VoG and
tags difficulty.

It saves the checkpoints VoG compares (GenDataAgent: 3, at evenly spaced epochs, like its 10/20/30) and the
final model, as safetensors beside a `config.json`; its per-class accuracy on the real test split goes into
`stats.json`, because a per-class generation budget can follow it.

    models/classifier/
      config.json          architecture, classes, image size, checkpoint names, options
      epoch-010.safetensors ... final.safetensors
      stats.json           accuracy and per-class accuracy on the real test split, loss per epoch
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from synthforge.errors import BadInput
from synthforge.progress import progress_bar
from synthforge.stagedir import atomic_dir

if TYPE_CHECKING:
    import torch


@dataclass
class ClassifierOptions:
    epochs: int = 30
    checkpoints: int = 3  # saved at evenly spaced epochs for VoG
    batch_size: int = 64
    lr: float = 0.05  # SGD with momentum 0.9 and cosine decay
    weight_decay: float = 5e-4
    width: int = 32  # channels of the first conv block
    image_size: int | None = None  # resize to image_size x image_size; None = the real images' own (uniform) size


def build_model(in_channels: int, num_classes: int, width: int) -> torch.nn.Module:
    """A small CNN for small images: two conv blocks, global average pooling, a linear head (the logits VoG uses).

    No batch norm: VoG scores every sample independently, and batch statistics would couple them.
    """
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


@dataclass
class Classifier:
    """A loaded reference classifier: the final model plus what is needed to feed it."""

    model: torch.nn.Module
    config: dict[str, Any]
    path: Path

    @property
    def channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.config["class_names"])

    def tensor(self, images: list[bytes]) -> torch.Tensor:
        from synthforge.vision.images import to_tensor

        return to_tensor(images, self.channels, self.image_size)

    def checkpoints(self, names: list[str] | None = None) -> list[torch.nn.Module]:
        """The saved checkpoints VoG compares (all of them by default), each in eval mode."""
        names = names or self.config["checkpoints"]
        unknown = [n for n in names if n not in self.config["checkpoints"]]
        if unknown:
            raise BadInput(f"{self.path}: no checkpoint(s) {unknown} (have: {self.config['checkpoints']})")
        return [_load_weights(self.path, n, self.config) for n in names]

    def probabilities(self, images: list[bytes], batch_size: int = 512) -> np.ndarray:
        """Softmax over classes, N x K."""
        import torch

        out = []
        with torch.no_grad():
            x = self.tensor(images)
            for start in range(0, len(x), batch_size):
                out.append(torch.softmax(self.model(x[start : start + batch_size]), dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)))


def _load_weights(path: Path, name: str, config: dict) -> torch.nn.Module:
    from safetensors.torch import load_file

    model = build_model(config["in_channels"], len(config["class_names"]), config["width"])
    model.load_state_dict(load_file(path / f"{name}.safetensors"))
    return model.eval()


def load_classifier(path: str | Path) -> Classifier:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise BadInput(f"{path}: not a trained classifier (config.json missing; run `synthforge classifier` first)")
    config = json.loads(config_file.read_text())
    return Classifier(_load_weights(path, "final", config), config, path)


def classifier_digest(path: str | Path) -> str:
    """What identifies a trained classifier for stage fingerprints: its config and final weights."""
    from synthforge.provenance import sha256_hex

    path = Path(path)
    if not (path / "config.json").exists():
        raise BadInput(f"{path}: not a trained classifier (config.json missing; run `synthforge classifier` first)")
    return sha256_hex((path / "config.json").read_bytes() + (path / "final.safetensors").read_bytes())


def marginal_scores(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """GenDataAgent's marginal score: the classifier's probability of the true class (eq. 1)."""
    return probabilities[np.arange(len(labels)), labels]


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Callable[[int], Iterable]:
    """Epoch -> (images, labels) batches in a fresh order drawn from one seeded generator (epochs in sequence)."""
    import torch

    rng = torch.Generator().manual_seed(seed)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(x), generator=rng)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]

    return batches


def fit(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable],
    options: ClassifierOptions,
    after_epoch: Callable[[int], None] | None = None,
    desc: str = "classifier: epochs",
) -> list[float]:
    """Train `model` for options.epochs with SGD (momentum 0.9, weight decay) and cosine decay; the mean loss per epoch.

    batches(epoch) yields (images, labels) for epochs 1..epochs: a shuffled tensor dataset, or a DataLoader whose
    sampler mixes real and synthetic data (synthforge.torch). after_epoch(epoch) runs after each epoch's step.
    """
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=options.lr, momentum=0.9, weight_decay=options.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=options.epochs)
    losses = []
    with progress_bar(desc, options.epochs) as advance:
        for epoch in range(1, options.epochs + 1):
            model.train()
            total, count = 0.0, 0
            for x, y in batches(epoch):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(y)
                count += len(y)
            sched.step()
            losses.append(round(total / max(count, 1), 5))
            if after_epoch is not None:
                after_epoch(epoch)
            advance(1)
    model.eval()
    return losses


def train_classifier(options: ClassifierOptions, real: str | Path, out: str | Path, seed: int) -> dict[str, Any]:
    """Train on real/train.parquet, evaluate on real/test.parquet, write the model folder atomically."""
    import torch
    from safetensors.torch import save_file

    from synthforge.vision.images import to_tensor
    from synthforge.vision.real import read_real, real_info

    if options.checkpoints < 2 or options.checkpoints > options.epochs:
        raise BadInput(
            f"classifier.checkpoints: need 2..epochs ({options.epochs}) checkpoints for VoG, got {options.checkpoints}"
        )
    real, out = Path(real), Path(out)
    info = real_info(real)
    train, test = read_real(real, "train"), read_real(real, "test")
    largest = info["image_size"]["max"]
    size = options.image_size or max(largest["width"], largest["height"])
    channels = info["channels"]
    x_train = to_tensor(train.column("image").to_pylist(), channels, size)
    y_train = torch.tensor(train.column("label").to_pylist())
    x_test = (
        to_tensor(test.column("image").to_pylist(), channels, size) if test.num_rows else torch.zeros(0, channels, size, size)
    )
    y_test = np.asarray(test.column("label").to_pylist(), dtype=np.int64)
    classes = info["class_names"]

    torch.manual_seed(seed)
    model = build_model(channels, len(classes), options.width)
    save_at = {round(options.epochs * (k + 1) / options.checkpoints) for k in range(options.checkpoints)}
    checkpoints: list[str] = []
    with atomic_dir(out) as tmp:

        def save_checkpoint(epoch: int) -> None:
            if epoch in save_at:
                name = f"epoch-{epoch:03d}"
                save_file(model.state_dict(), tmp / f"{name}.safetensors")
                checkpoints.append(name)

        losses = fit(model, shuffled_batches(x_train, y_train, options.batch_size, seed), options, after_epoch=save_checkpoint)
        save_file(model.state_dict(), tmp / "final.safetensors")
        config = {
            "arch": "small-cnn",
            "in_channels": channels,
            "image_size": size,
            "width": options.width,
            "class_names": classes,
            "checkpoints": checkpoints,
            "seed": seed,
            "options": asdict(options),
            "real_digest": info["digest"],
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        with torch.no_grad():
            predicted = model(x_test).argmax(1).numpy() if len(x_test) else np.zeros(0, dtype=int)
        per_class = {
            name: (round(float((predicted[y_test == k] == k).mean()), 4) if (y_test == k).any() else None)
            for k, name in enumerate(classes)
        }
        stats = {
            "stage": "classifier",
            "train_images": len(x_train),
            "test_images": len(x_test),
            "test_accuracy": round(float((predicted == y_test).mean()), 4) if len(y_test) else None,
            "per_class_accuracy": per_class,
            "loss_per_epoch": losses,
            "checkpoints": checkpoints,
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
