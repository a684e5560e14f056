"""VoG benchmark: synthforge's batched VoG against the per-sample loop that computes the same definition.

Both run on the same K checkpoints and images. The baseline is the plain way to write VoG: for each sample
and checkpoint, one forward and one backward of that sample's true-class logit, the gradient's channel mean
stacked over checkpoints, np.std over checkpoints (population, 1/K), mean over pixels. synthforge scores a
whole batch with one backward per checkpoint and accumulates mean and M2 online (Welford). The checkpoints
are a small random-weight CNN (two conv + BatchNorm layers, a Linear head) and copies of it with perturbed
weights; images and labels are seeded noise. The run fails (exit 1) if the scores differ by 1e-5 or more.

    python benchmarks/bench_vog.py                                   # 2,000 digits-sized 1 x 8 x 8 images
    python benchmarks/bench_vog.py --n 500 --size 32 --channels 3    # CIFAR-sized
    python benchmarks/bench_vog.py --target probability --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from synthforge.vision.vog import vog_scores

BASELINE = "per-sample loop"
SYSTEMS = {"synthforge": "synthforge (batched, Welford)", "baseline": BASELINE}
SEED = 20261121
N_CLASSES = 10
TOLERANCE = 1e-5


def make_checkpoints(channels: int, k: int, seed: int = SEED) -> list[nn.Module]:
    """K checkpoints: a random-weight CNN and copies whose weights drift a little further each time."""
    torch.manual_seed(seed)
    base = nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(256, N_CLASSES),
    )
    checkpoints = [base]
    for _ in range(k - 1):
        model = copy.deepcopy(checkpoints[-1])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05 * (p.std() if p.numel() > 1 else 1.0))
        checkpoints.append(model)
    return [m.eval() for m in checkpoints]


def per_sample_vog(models, images: torch.Tensor, labels: torch.Tensor, target: str = "logit") -> np.ndarray:
    """The baseline: VoG as written sample by sample, one backward per sample and checkpoint."""
    device = next(models[0].parameters()).device
    scores = np.empty(len(images), dtype=np.float64)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        maps = []
        for model in models:
            model.eval()
            x = img[None].to(device).requires_grad_(True)
            out = model(x)
            if target == "probability":
                out = torch.softmax(out, dim=1)
            (grad,) = torch.autograd.grad(out[0, int(label)], x)
            maps.append(grad[0].mean(dim=0).cpu().numpy().astype(np.float64))
        scores[i] = np.std(np.stack(maps), axis=0).mean()
    return scores


def timed(fn, repeat: int) -> tuple[np.ndarray, float]:
    """The result and the best wall time of `repeat` runs."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def render(config: dict, results: dict[str, dict], max_abs: float, max_rel: float) -> Table:
    table = Table(
        title=f"VoG, {config['n']:,} images of {config['channels']} x {config['size']} x {config['size']}, "
        f"{config['checkpoints']} checkpoints",
        caption=(
            f"target={config['target']}, batch_size={config['batch_size']}, device={config['device']}, "
            f"torch {torch.__version__} with {config['threads']} threads; best of {config['repeat']}. "
            f"Max |difference| {max_abs:.2e} (must be < {TOLERANCE:g}), max relative {max_rel:.2e}; "
            f"median score {config['median_score']:.3e}"
        ),
    )
    table.add_column("")
    for name in results:
        table.add_column(SYSTEMS[name], justify="right")
    speedup = results["baseline"]["time_s"] / results["synthforge"]["time_s"]
    table.add_row("time (s)", *(f"{r['time_s']:.3f}" for r in results.values()))
    table.add_row("images/s", *(f"{r['images_per_s']:,.0f}" for r in results.values()))
    table.add_row("speed-up", f"{speedup:.1f}x", "1.0x")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--size", type=int, default=8, help="image height and width (default 8, as sklearn digits)")
    parser.add_argument("--channels", type=int, default=1, choices=[1, 3])
    parser.add_argument("--checkpoints", type=int, default=3, help="K, the number of checkpoints (default 3)")
    parser.add_argument("--target", choices=["logit", "probability"], default="logit")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each system; the best time counts")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    models = [m.to(device) for m in make_checkpoints(args.channels, args.checkpoints)]
    gen = torch.Generator().manual_seed(SEED + 1)
    images = torch.rand(args.n, args.channels, args.size, args.size, generator=gen)
    labels = torch.randint(0, N_CLASSES, (args.n,), generator=gen)

    def batched() -> np.ndarray:
        return vog_scores(models, images, labels, target=args.target, batch_size=args.batch_size)

    def looped() -> np.ndarray:
        return per_sample_vog(models, images, labels, target=args.target)

    # Warm-up: first calls pay for kernel selection and allocator growth, which neither system should carry.
    vog_scores(models, images[:8], labels[:8], target=args.target)
    per_sample_vog(models, images[:8], labels[:8], target=args.target)

    raw = {}
    raw["synthforge"] = timed(batched, args.repeat)
    raw["baseline"] = timed(looped, args.repeat)
    ours, theirs = raw["synthforge"][0], raw["baseline"][0]
    diff = np.abs(ours - theirs)
    max_abs = float(diff.max())
    max_rel = float((diff / np.maximum(np.abs(theirs), np.finfo(np.float64).tiny)).max())

    config = {
        "n": args.n,
        "size": args.size,
        "channels": args.channels,
        "checkpoints": args.checkpoints,
        "target": args.target,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "median_score": float(np.median(theirs)),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    results = {name: {"time_s": t, "images_per_s": args.n / t} for name, (_, t) in raw.items()}
    Console().print(render(config, results, max_abs, max_rel))
    if args.json:
        payload = {"config": config, "baseline": BASELINE, "results": results, "max_abs_diff": max_abs, "max_rel_diff": max_rel}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if not max_abs < TOLERANCE:
        raise SystemExit(f"scores differ by {max_abs:.3e} >= {TOLERANCE:g}")


if __name__ == "__main__":
    main()
