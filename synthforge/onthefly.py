"""agent: GenDataAgent's on-the-fly loop (Algorithm 1): the classifier asks for the synthetic data it needs while
it trains.

    iterations 1..warmup (Stage 1)   fine-tune the classifier f on the real training images only; the end of each
                                     iteration is a checkpoint (the paper: 3 iterations of 10 epochs, checkpoints
                                     at epochs 10, 20, 30)
    every later iteration (Stage 2)  1. marginal sampling with the current f: the k real training images with the
                                        lowest p(y | x) (eq. 1), m images each (or a budget by class accuracy)
                                     2. online: their captions and m perturbed variants (the `seeds` section's
                                        caption settings, 2.3), then the images from the adapted generator, seeded
                                        per iteration; offline (appendix G): their children in a pool generated
                                        beforehand that no earlier iteration took
                                     3. VoG of every image over the last `vog.checkpoints` checkpoints, normalised
                                        per class; drop_fraction of each class is dropped (2.4, eq. 7)
                                     4. fine-tune f on the real images + the kept images (lines 15-16, eq. 8); its
                                        checkpoint joins the VoG window and the oldest one leaves it

Algorithm 1's line 15, D <- T ∪ (S_c minus the filtered images), takes S_c, the iteration's own batch: each
iteration trains on the real images plus that iteration's kept images, not on everything kept so far. The paper's
ratios read the same way: GenDataAgent (1:0.5) searches as much synthetic data as Real-Fake (1:10) over its 20
iterations (Table 15, Figure 4), so 1:0.5 is the ratio within one iteration (here fraction x m x (1 - drop_fraction)).
`accumulate: true` trains on every image kept so far instead. Each iteration's fine-tuning is one cosine cycle of
`epochs` epochs (the classifier section gives the architecture and the optimiser).

    data/agent/     a stage directory of every image the loop made (online) or took from the pool (offline): kept,
                    or rejected by `agent.vog` with its reason and provenance.vog; one batch_id per iteration (online;
                    pool images keep theirs); every image is tagged `agent-iteration:N` and `agent-mode:MODE`.
                    marginal.parquet: each real training image's marginal score, rank, whether it was selected and
                    how many images it got, per Stage-2 iteration. Offline, pool images no iteration took are
                    rejected as `agent.unselected`, so every pool image leaves the stage once.
    models/agent/   the fine-tuned classifier in the reference classifier's format (config.json, an
                    epoch-NNN.safetensors per iteration, NNN its cumulative epoch, final.safetensors), with
                    stats.json: real-test accuracy and per-class accuracy, and image counts, per iteration.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthforge.errors import BadInput
from synthforge.params import parse_options
from synthforge.provenance import sha256_hex
from synthforge.stagedir import Row, StageInput, StageWriter, atomic_dir, reject, require_columns, stage_fingerprint
from synthforge.stages.seeds import MARGINAL_FIELDS, validate_seed_count
from synthforge.vision import vog

if TYPE_CHECKING:
    import torch

    from synthforge.vision.classifier import ClassifierOptions

MODES = ("online", "offline")
BUDGETS = ("uniform", "accuracy")

# The seeds stage's record of each real image, per iteration (rank 0 = the lowest marginal score that iteration).
MARGINAL_SCHEMA = pa.schema([("iteration", pa.int64()), *MARGINAL_FIELDS])


@dataclass
class AgentVogOptions:
    """params `agent.vog`: the judge's VoG settings, over the loop's own last checkpoints."""

    checkpoints: int = 3  # VoG over the last this-many checkpoints (GenDataAgent: 3; Table 5 tries 4 and 5)
    target: str = "logit"  # gradient of the true class's pre-softmax logit, or of its probability
    direction: str = "drop_lowest"  # GenDataAgent drops the lowest VoG per class; the VoG paper reads high VoG as atypical
    normalization: str = "per_class_zscore"  # or none
    drop_fraction: float = 0.25  # of each class, every iteration (GenDataAgent: 25 / 50 / 75%)
    batch_size: int = 256


@dataclass
class AgentOptions:
    """params `agent`."""

    iterations: int = 5  # Stage-2 (on-the-fly) iterations after the warm-up (GenDataAgent Table 12: 20)
    warmup: int = 3  # Stage-1 iterations on the real images only; their checkpoints open the VoG window
    epochs: int = 10  # fine-tuning epochs per iteration (the paper: 10)
    mode: str = "online"  # online: generate every iteration; offline: take images from a pre-generated pool
    k: int | None = None  # marginal examples per iteration: the k lowest marginal scores; or
    fraction: float | None = None  # this fraction of the real training images (GenDataAgent: 1/5 ... 1/2); 0.2 if neither
    images_per_seed: int = 4  # m: images per marginal example
    budget: str = "uniform"  # uniform: m each; accuracy: m scaled by the class's error on the real test split so far
    accumulate: bool = False  # train on every image kept so far, not only on this iteration's (see the module doc)
    vog: AgentVogOptions = field(default_factory=AgentVogOptions)


def agent_options(params: dict[str, Any]) -> AgentOptions:
    """The validated `agent` section of params."""
    params_file = params.get("__file__", "params.yaml")
    raw = dict(params.get("agent") or {})
    raw_vog = raw.pop("vog", None) or {}
    if not isinstance(raw_vog, dict):
        raise BadInput(f"{params_file}: agent.vog: expected a mapping of VoG settings, got {raw_vog!r}")
    o = parse_options(AgentOptions, raw, "agent", params_file)
    o.vog = parse_options(AgentVogOptions, raw_vog, "agent.vog", params_file)
    _validate(o, params_file)
    return o


def _validate(o: AgentOptions, params_file: str) -> None:
    where = f"{params_file}: agent"
    if o.k is None and o.fraction is None:
        o.fraction = 0.2
    for key in ("iterations", "warmup", "epochs", "images_per_seed"):
        if getattr(o, key) < 1:
            raise BadInput(f"{where}.{key}: must be at least 1, got {getattr(o, key)}")
    if o.mode not in MODES:
        raise BadInput(f"{where}.mode: must be one of {', '.join(MODES)}, got {o.mode!r}")
    if o.budget not in BUDGETS:
        raise BadInput(f"{where}.budget: must be one of {', '.join(BUDGETS)}, got {o.budget!r}")
    validate_seed_count(o.k, o.fraction, where)
    v = o.vog
    for key, allowed in (("target", vog.TARGETS), ("direction", vog.DIRECTIONS), ("normalization", vog.NORMALIZATIONS)):
        if getattr(v, key) not in allowed:
            raise BadInput(f"{where}.vog.{key}: must be one of {', '.join(allowed)}, got {getattr(v, key)!r}")
    if not 0 <= v.drop_fraction < 1:
        raise BadInput(f"{where}.vog.drop_fraction: must be in [0, 1), got {v.drop_fraction}")
    if v.batch_size < 1:
        raise BadInput(f"{where}.vog.batch_size: must be at least 1, got {v.batch_size}")
    if not 2 <= v.checkpoints <= o.warmup:
        raise BadInput(
            f"{where}.vog.checkpoints: VoG compares the last checkpoints, so it needs at least 2 and at most warmup "
            f"({o.warmup}) for the first on-the-fly iteration to have them, got {v.checkpoints}"
        )


def run_agent(
    params: dict[str, Any],
    real: str | Path,
    generator: str | Path | None,
    out: str | Path,
    classifier_out: str | Path,
    pool: str | Path | None = None,
) -> dict[str, Any]:
    """Run the loop on the real data folder `real`; write the stage directory `out` and the classifier folder
    `classifier_out` (both atomically); return the stage's stats.

    Online mode generates with the adapted generator in `generator`; offline mode takes images from `pool`, the
    stage directory of a `synthforge generate` run over many (or all) real training images, and reads no generator.
    """
    from synthforge.progress import progress_bar
    from synthforge.vision.classifier import ClassifierOptions

    params_file = params.get("__file__", "params.yaml")
    o = agent_options(params)
    if o.mode == "offline" and pool is None:
        raise BadInput(
            f"{params_file}: agent.mode is offline: give the pre-generated pool (--pool, a `synthforge generate` output)"
        )
    if o.mode == "online" and pool is not None:
        raise BadInput(f"--pool {pool}: a pool is only read in offline mode; set agent.mode: offline in {params_file}")
    clf_options = parse_options(ClassifierOptions, params.get("classifier") or {}, "classifier", params_file)
    clf_options = replace(clf_options, epochs=o.epochs)
    seed = int(params["seed"])
    data = _Real.read(Path(real), clf_options.image_size)
    source = _Generate(params, generator, data, seed) if o.mode == "online" else _Pool(Path(pool), data)
    fingerprint = stage_fingerprint(
        "agent",
        {"agent": params.get("agent"), "classifier": params.get("classifier"), "seed": seed, **source.settings},
        source.inputs,
    )
    total = o.warmup + o.iterations
    with (
        atomic_dir(classifier_out) as folder,
        StageWriter(out, "agent", source.schema, fingerprint) as writer,
        progress_bar("agent: iterations", total) as advance,
    ):
        learner = _Learner(data, clf_options, seed, folder, o.vog.checkpoints)
        loop = _Loop(o, data, source, learner, writer, fingerprint["fingerprint"][:8])
        for iteration in range(1, total + 1):
            loop.iteration(iteration)
            advance(1)
        if isinstance(source, _Pool):
            source.write_unselected(writer, total)

        learner.save_final(data.info["digest"], o)
        final = loop.history[-1]
        summary = {"test_accuracy": final["test_accuracy"], "per_class_accuracy": final["per_class_accuracy"]}
        clf_stats = {
            "stage": "agent",
            "mode": o.mode,
            "train_images": len(data.x),
            "test_images": len(data.x_test),
            **summary,
            "loss_per_epoch": learner.losses,
            "checkpoints": learner.checkpoints,
            "iterations": loop.history,
        }
        (folder / "stats.json").write_text(json.dumps(clf_stats, indent=2) + "\n")
        marginal = pa.Table.from_pylist(loop.marginal, schema=MARGINAL_SCHEMA)
        pq.write_table(marginal, writer.tmp / "marginal.parquet", compression="zstd")
        writer.metrics = {
            "mode": o.mode,
            "warmup": o.warmup,
            "on_the_fly_iterations": o.iterations,
            "marginal_per_iteration": loop.k,
            "accumulate": o.accumulate,
            "vog": asdict(o.vog),
            "classifier": str(classifier_out),
            **summary,
            "iterations": loop.history,
        }
    return writer.stats


@dataclass
class _Real:
    """The real data folder as the loop uses it: training rows, and both splits as the classifier's tensors."""

    info: dict[str, Any]
    rows: list[Row]
    x: torch.Tensor
    y: np.ndarray
    x_test: torch.Tensor
    y_test: np.ndarray
    size: int

    @classmethod
    def read(cls, real: Path, image_size: int | None) -> _Real:
        import torch

        from synthforge.vision.images import to_tensor
        from synthforge.vision.real import read_real, real_info

        info = real_info(real)
        rows = read_real(real, "train").to_pylist()
        test = read_real(real, "test")
        if not rows:
            raise BadInput(f"{real}: no real training images to fine-tune on")
        largest = info["image_size"]["max"]
        size = image_size or max(largest["width"], largest["height"])  # as the reference classifier sizes its input
        channels = info["channels"]
        x_test = (
            to_tensor(test.column("image").to_pylist(), channels, size) if test.num_rows else torch.zeros(0, channels, size, size)
        )
        return cls(
            info=info,
            rows=rows,
            x=to_tensor([r["image"] for r in rows], channels, size),
            y=np.asarray([r["label"] for r in rows], dtype=np.int64),
            x_test=x_test,
            y_test=np.asarray(test.column("label").to_pylist(), dtype=np.int64),
            size=size,
        )

    @property
    def classes(self) -> list[str]:
        return self.info["class_names"]

    @property
    def channels(self) -> int:
        return self.info["channels"]


class _Loop:
    """Algorithm 1 one iteration at a time, and what it records: per-iteration stats and marginal.parquet rows."""

    def __init__(self, o: AgentOptions, data: _Real, source: _Generate | _Pool, learner: _Learner, writer: StageWriter, fp8: str):
        self.o, self.data, self.source, self.learner, self.writer, self.fp8 = o, data, source, learner, writer, fp8
        n = len(data.rows)
        self.k = min(o.k if o.k is not None else max(1, round(o.fraction * n)), n)
        self.history: list[dict[str, Any]] = []
        self.marginal: list[dict[str, Any]] = []
        self.accuracy: dict[int, float | None] = {}  # per class index, on the real test split after the last iteration
        self.kept_x, self.kept_y = data.x[:0], data.y[:0]  # the synthetic images the next fine-tuning adds

    def iteration(self, iteration: int) -> None:
        import torch

        record: dict[str, Any] = {"iteration": iteration, "stage": "warmup" if iteration <= self.o.warmup else "on-the-fly"}
        if iteration > self.o.warmup:
            record |= self.synthesize(iteration)
        x = torch.cat([self.data.x, self.kept_x])
        y = torch.from_numpy(np.concatenate([self.data.y, self.kept_y]))
        losses = self.learner.fine_tune(x, y, iteration)
        test_accuracy, per_class = self.learner.evaluate(self.data.x_test, self.data.y_test)
        self.accuracy = {c: per_class[name] for c, name in enumerate(self.data.classes)}
        record |= {
            "checkpoint": self.learner.checkpoints[-1],
            "trained_on": {"real": len(self.data.x), "synthetic": len(self.kept_x)},
            "loss_per_epoch": losses,
            "test_accuracy": test_accuracy,
            "per_class_accuracy": per_class,
        }
        self.history.append(record)

    def synthesize(self, iteration: int) -> dict[str, Any]:
        """Lines 8-15: marginal examples, their images, VoG; the kept images join the training data."""
        import torch

        from synthforge.stages.seeds import images_per_seed, marginal_ranks, marginal_record
        from synthforge.vision.classifier import marginal_scores

        o, data = self.o, self.data
        scores = marginal_scores(self.learner.probabilities(data.x), data.y)
        rank = marginal_ranks(scores)
        selected = rank < self.k
        n_images = np.zeros(len(data.rows), dtype=np.int64)
        n_images[selected] = images_per_seed(data.y[selected], self.accuracy, o.images_per_seed, o.budget)
        batch_id = f"{self.fp8}-iter-{iteration:02d}"
        rows, n_images = self.source.images(iteration, batch_id, scores, n_images)
        for row in rows:
            tags = {f"agent-iteration:{iteration}", f"agent-mode:{o.mode}"}
            row["provenance"]["tags"] = sorted(set(row["provenance"]["tags"] or []) | tags)
        self.marginal += [
            {"iteration": iteration, **marginal_record(r, scores[i], rank[i], selected[i], n_images[i])}
            for i, r in enumerate(data.rows)
        ]
        x = _image_tensor(rows, data.channels, data.size, f"{self.source.where}: iteration {iteration}")
        y = np.asarray([row["label"] for row in rows], dtype=np.int64)
        kept, vog_record = _vog_filter(rows, x, y, self.learner, o.vog, data.classes)
        self.writer.write(
            [row for row, keep in zip(rows, kept, strict=True) if keep],
            [_vog_rejection(row, o.vog) for row, keep in zip(rows, kept, strict=True) if not keep],
        )
        if o.accumulate:
            self.kept_x, self.kept_y = torch.cat([self.kept_x, x[kept]]), np.concatenate([self.kept_y, y[kept]])
        else:
            self.kept_x, self.kept_y = x[kept], y[kept]
        return {
            "batch_id": batch_id if o.mode == "online" else None,
            "marginal": {
                "selected": int(selected.sum()),
                "mean_score_selected": round(float(scores[selected].mean()), 4),
                "mean_score_all": round(float(scores.mean()), 4),
            },
            "images": len(rows),
            "kept": int(kept.sum()),
            "dropped": int((~kept).sum()),
            "per_class": {
                name: {"images": int((y == c).sum()), "kept": int((y[kept] == c).sum())} for c, name in enumerate(data.classes)
            },
            "vog": vog_record,
        }


class _Learner:
    """f: the classifier fine-tuned iteration after iteration, each iteration's checkpoint saved in `folder`, the
    last `window` of them compared by VoG."""

    def __init__(self, data: _Real, options: ClassifierOptions, seed: int, folder: Path, window: int):
        import torch

        from synthforge.vision.classifier import build_model

        torch.manual_seed(seed)
        self.channels, self.classes, self.size = data.channels, data.classes, data.size
        self.model = build_model(self.channels, len(self.classes), options.width)
        self.options, self.seed, self.folder = options, seed, folder
        self.window: deque[str] = deque(maxlen=window)
        self.checkpoints: list[str] = []
        self.losses: list[float] = []

    def fine_tune(self, x: torch.Tensor, y: torch.Tensor, iteration: int) -> list[float]:
        from safetensors.torch import save_file

        from synthforge.vision.classifier import fit, shuffled_batches

        batches = shuffled_batches(x, y, self.options.batch_size, self.seed + iteration)
        losses = fit(self.model, batches, self.options, desc=f"agent: iteration {iteration}")
        name = f"epoch-{iteration * self.options.epochs:03d}"
        save_file(self.model.state_dict(), self.folder / f"{name}.safetensors")
        self.window.append(name)
        self.checkpoints.append(name)
        self.losses += losses
        return losses

    def vog_window(self) -> tuple[list[str], list[torch.nn.Module], str]:
        """The checkpoints VoG compares now (names, models in eval mode) and a digest of their weights."""
        from safetensors.torch import load_file

        from synthforge.vision.classifier import build_model

        names, models = list(self.window), []
        for name in names:
            model = build_model(self.channels, len(self.classes), self.options.width)
            model.load_state_dict(load_file(self.folder / f"{name}.safetensors"))
            models.append(model.eval())
        digest = sha256_hex(b"".join((self.folder / f"{name}.safetensors").read_bytes() for name in names))
        return names, models, digest

    def probabilities(self, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = [torch.softmax(self.model(x[s : s + batch_size]), dim=1).numpy() for s in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def evaluate(self, x: torch.Tensor, y: np.ndarray) -> tuple[float | None, dict[str, float | None]]:
        """Accuracy and per-class accuracy on the real test split (None where there is nothing to measure)."""
        predicted = self.probabilities(x).argmax(1)
        per_class = {
            name: (round(float((predicted[y == c] == c).mean()), 4) if (y == c).any() else None)
            for c, name in enumerate(self.classes)
        }
        return (round(float((predicted == y).mean()), 4) if len(y) else None), per_class

    def save_final(self, real_digest: str, o: AgentOptions) -> None:
        """final.safetensors and config.json as the reference classifier writes them, so load_classifier reads it."""
        from safetensors.torch import save_file

        save_file(self.model.state_dict(), self.folder / "final.safetensors")
        config = {
            "arch": "small-cnn",
            "in_channels": self.channels,
            "image_size": self.size,
            "width": self.options.width,
            "class_names": self.classes,
            "checkpoints": self.checkpoints,
            "seed": self.seed,
            "options": asdict(self.options),
            "real_digest": real_digest,
            "agent": asdict(o),
        }
        (self.folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _image_tensor(rows: list[Row], channels: int, size: int, where: str) -> torch.Tensor:
    import torch

    from synthforge.vision.images import to_array

    arrays = []
    for row in rows:
        try:
            arrays.append(to_array(row["image"], channels, size))
        except ValueError as exc:
            raise BadInput(f"{where}: sample {row['sample_id']}: {exc}") from None
    if not arrays:
        return torch.zeros(0, channels, size, size)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


def _vog_filter(
    rows: list[Row], x: torch.Tensor, labels: np.ndarray, learner: _Learner, o: AgentVogOptions, classes: list[str]
) -> tuple[np.ndarray, dict[str, Any]]:
    """VoG over the learner's last checkpoints, per-class normalisation and drop; fills provenance.vog as the judge's
    VoG check does. Returns the kept mask and what the iteration's stats record."""
    import torch

    names, models, digest = learner.vog_window()
    raw = vog.vog_scores(models, x, torch.from_numpy(labels), o.target, o.batch_size)
    normalized = vog.normalize_per_class(raw, labels, o.normalization)
    kept, thresholds = vog.select_kept(normalized, labels, o.drop_fraction, o.direction)
    for row, score, z, c in zip(rows, raw, normalized, labels, strict=True):
        row["provenance"]["vog"] = {
            "score": float(score),
            "normalized": float(z),
            "direction": o.direction,
            "target": o.target,
            "checkpoints": names,
            "normalization": o.normalization,
            "drop_fraction": o.drop_fraction,
            "class_threshold": thresholds.get(int(c)),
            "classifier": digest,
        }
    return kept, {"checkpoints": names, "class_threshold": {classes[c]: t for c, t in sorted(thresholds.items())}}


def _vog_rejection(row: Row, o: AgentVogOptions) -> Row:
    v = row["provenance"]["vog"]
    side = "lowest" if o.direction == "drop_lowest" else "highest"
    return reject(
        row,
        "agent.vog",
        f"VoG outlier: normalised VoG {v['normalized']:.3f} is among the {side} {o.drop_fraction:.0%} of class "
        f"{row['label_name']} (boundary {v['class_threshold']:.3f}) over checkpoints {', '.join(v['checkpoints'])}",
    )


class _Generate:
    """Online mode: m images per marginal example from the adapted generator, made as the generate stage makes them
    (captions and perturbed variants as the seeds stage writes them), seeded per iteration."""

    def __init__(self, params: dict[str, Any], generator: str | Path | None, data: _Real, seed: int):
        from synthforge.stages.generate_images import ImageMaker, generator_digest
        from synthforge.stages.prepare import load_generator
        from synthforge.stages.seeds import caption_perturber, seed_captions, seeds_options
        from synthforge.vision.images import IMAGE_CONTENT_SCHEMA

        params_file = params.get("__file__", "params.yaml")
        section = params.get("generate") or {}
        if section.get("modality") != "image":
            raise BadInput(
                f"{params_file}: generate.modality: the agent generates images; set it to image (with the sampling options)"
            )
        if generator is None or not Path(generator).is_dir():
            raise BadInput(f"{generator}: no adapted generator there (run `synthforge adapt` first)")
        self.seeds = seeds_options(params)
        self.rows, self.seed = data.rows, seed
        # Every real training image may become marginal, so all are captioned once (GenDataAgent captions T with BLIP-2).
        self.captions, self.caption_model = seed_captions(self.seeds, self.rows, np.ones(len(self.rows), dtype=bool))
        self.perturber = caption_perturber(self.seeds)  # loaded once, asked every iteration
        family, gen = load_generator(params, generator)
        self.maker = ImageMaker(family, gen, data.info["source_id"])
        self.batch_size = int(section.get("batch_size", 256))
        self.schema = IMAGE_CONTENT_SCHEMA
        self.where = str(generator)
        self.settings = {key: params.get(key) for key in ("seeds", "generator", "generate")}
        self.inputs = {"real": data.info["digest"], "generator": generator_digest(generator)}

    def images(self, iteration: int, batch_id: str, scores: np.ndarray, n_images: np.ndarray) -> tuple[list[Row], np.ndarray]:
        from synthforge.progress import progress_bar
        from synthforge.stages.generate_images import plan_images
        from synthforge.stages.seeds import caption_variants

        selected = n_images > 0
        variants, variants_model = caption_variants(
            self.seeds, self.rows, self.captions, selected, n_images, self.seed + iteration, self.perturber
        )
        jobs = []
        for i in map(int, np.flatnonzero(selected)):
            real = self.rows[i]
            seed_row = {
                "real_id": real["real_id"],
                "label": real["label"],
                "label_name": real["label_name"],
                "marginal_score": float(scores[i]),
                "n_images": int(n_images[i]),
                "caption": self.captions[i],
                "caption_model": self.caption_model,
                "variants": variants.get(i),
                "variants_model": variants_model if i in variants else None,
            }
            jobs += plan_images(seed_row, real, self.seed, iteration)
        rows: list[Row] = []
        with progress_bar(f"agent: iteration {iteration} images", len(jobs)) as advance:
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start : start + self.batch_size]
                rows += self.maker.make(chunk, batch_id, {"iteration": iteration, "mode": "online"})
                advance(len(chunk))
        return rows, n_images


class _Pool:
    """Offline mode (appendix G): each marginal example's children in a pool generated beforehand, up to m of them,
    each taken by one iteration at most; what no iteration takes leaves as `agent.unselected`."""

    def __init__(self, pool: Path, data: _Real):
        import pyarrow.dataset as ds

        self.source = StageInput.open(pool)
        require_columns(self.source, ("image", "label", "label_name"), f"--pool {pool}")
        index = ds.dataset(self.source.shards(), format="parquet").to_table(columns=["sample_id", "label", "provenance"])
        real_ids = {r["real_id"] for r in data.rows}
        n_classes = len(data.classes)
        self.children: dict[str, list[str]] = {}  # real id -> its children in pool order
        self.order: dict[str, int] = {}
        for entry in index.to_pylist():
            sid = entry["sample_id"]
            if not 0 <= entry["label"] < n_classes:
                raise BadInput(f"{pool}: sample {sid}: label {entry['label']} is not one of the real data's {n_classes} classes")
            parents = entry["provenance"]["generation"]["parent_ids"]
            if parents and parents[0] in real_ids:
                self.children.setdefault(parents[0], []).append(sid)
            self.order[sid] = len(self.order)
        if not self.children:
            raise BadInput(
                f"{pool}: none of its {len(self.order)} samples has a parent among the {len(data.rows)} real training "
                f"images ({data.info['source_id']}); make the pool from this real data (seeds + generate)"
            )
        self.rows = data.rows
        self.used: set[str] = set()
        self.schema = self.source.schema
        self.where = str(pool)
        self.settings: dict[str, Any] = {}
        self.inputs = {"real": data.info["digest"], self.source.stage: self.source.fingerprint}

    def images(self, iteration: int, batch_id: str, scores: np.ndarray, n_images: np.ndarray) -> tuple[list[Row], np.ndarray]:
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        taken = np.zeros(len(self.rows), dtype=np.int64)
        chosen: list[str] = []
        for i in map(int, np.flatnonzero(n_images)):
            unused = [sid for sid in self.children.get(self.rows[i]["real_id"], []) if sid not in self.used]
            chosen += unused[: n_images[i]]
            taken[i] = min(len(unused), n_images[i])
        self.used.update(chosen)
        dataset = ds.dataset(self.source.shards(), format="parquet")
        rows = dataset.to_table(filter=pc.field("sample_id").isin(chosen)).to_pylist() if chosen else []
        return sorted(rows, key=lambda r: self.order[r["sample_id"]]), taken

    def write_unselected(self, writer: StageWriter, iterations: int) -> None:
        """The pool images no iteration took, rejected with why: every pool image leaves the stage once."""
        for rows in self.source.iter_rows():
            writer.write(
                [],
                [
                    reject(row, "agent.unselected", self._why_unselected(row, iterations))
                    for row in rows
                    if row["sample_id"] not in self.used
                ],
            )

    def _why_unselected(self, row: Row, iterations: int) -> str:
        parents = row["provenance"]["generation"]["parent_ids"]
        if not parents or parents[0] not in self.children:
            return f"not taken: its parent {parents[0] if parents else '(none)'} is not a real training image of this run"
        return (
            f"not taken: its parent {parents[0]} was not a marginal example often enough in the {iterations} iterations "
            "to use all its pool images"
        )
