"""seeds: GenDataAgent's feedback step. Score every real training image with the reference classifier (the
marginal score, the probability of its true class), take the k lowest (or a fraction) as seeds, decide how
many images each seed gets, and give each seed its caption variants.

    data/seeds/seeds.parquet   one row per real training image: marginal score, rank, selected, n_images,
                               caption, caption variants (text, raw model output, parsed) and the caption model
    data/seeds/stats.json      what was selected, per class, and the budget per class

Every real image is kept in the table (selected or not) so the choice can be inspected and plotted.

Budgets (`seeds.budget`):
  uniform   every selected seed gets images_per_seed (m) images
  accuracy  m scaled per seed by its class's error rate relative to the mean error
  file      exact per-class totals from a budget file (`synthforge gaps` writes one: data/gaps/budget.json). A
            class's images are spread as evenly as possible over its selected seeds, the lowest marginal score
            first taking the remainder. A class whose selected seeds are too few to carry its budget at m images
            each (none at all, say) takes its next-lowest-scoring real images as further seeds; a class with fewer
            images budgeted than selected seeds uses only its lowest-scoring ones, one image each. So `selected`
            marks exactly the seeds that get images, and a seed gets more than m only when its class has too few
            real images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthforge.errors import BadInput
from synthforge.params import parse_options
from synthforge.provenance import sha256_hex
from synthforge.stagedir import atomic_dir

VARIANT_TYPE = pa.struct([("text", pa.string()), ("raw", pa.string()), ("parsed", pa.bool_())])
# What marginal sampling records of each real training image; the on-the-fly loop records the same per iteration.
MARGINAL_FIELDS = [
    ("real_id", pa.string()),
    ("label", pa.int64()),
    ("label_name", pa.string()),
    ("marginal_score", pa.float64()),
    ("rank", pa.int64()),  # 0 = the lowest marginal score
    ("selected", pa.bool_()),
    ("n_images", pa.int64()),  # images planned for it (the loop: made, or taken from the pool)
]
SEEDS_SCHEMA = pa.schema(
    [
        *MARGINAL_FIELDS,
        ("caption", pa.string()),
        ("caption_model", pa.string()),
        ("variants", pa.list_(VARIANT_TYPE)),
        ("variants_model", pa.string()),
    ]
)


@dataclass
class SeedsOptions:
    k: int | None = None  # the k lowest-scoring real images; or
    fraction: float | None = None  # this fraction of the training set (GenDataAgent: 1/5, 1/4, 1/2); 0.2 if neither
    images_per_seed: int = 4  # m: images (caption variants) per seed
    budget: str = "uniform"  # uniform: m per seed; accuracy: classes the classifier gets wrong more get more; file
    budget_file: str | None = None  # budget=file: JSON with per_class {class name: images} (`synthforge gaps`)
    caption_source: str = "class_name"  # class_name | column (the real data's captions) | model (a captioning model)
    caption_model: str | None = None  # transformers image-to-text model (path or hub id) for caption_source=model
    perturb_model: str | None = None  # transformers causal LM (path or hub id) writing caption variants; None = no perturbation
    max_words: int = 10  # the paper's limit on each perturbation


def validate_seed_count(k: int | None, fraction: float | None, where: str) -> None:
    """How many real images each class seeds: at most one of k (per class) and fraction, each in range."""
    if k is not None and fraction is not None:
        raise BadInput(f"{where}: give exactly one of k and fraction (k={k}, fraction={fraction})")
    if fraction is not None and not 0 < fraction <= 1:
        raise BadInput(f"{where}.fraction: must be in (0, 1], got {fraction}")
    if k is not None and k < 1:
        raise BadInput(f"{where}.k: must be at least 1, got {k}")


def _validate(o: SeedsOptions, params_file: str) -> None:
    where = f"{params_file}: seeds"
    if o.k is None and o.fraction is None:
        o.fraction = 0.2
    validate_seed_count(o.k, o.fraction, where)
    if o.images_per_seed < 1:
        raise BadInput(f"{where}.images_per_seed: must be at least 1, got {o.images_per_seed}")
    if o.budget not in ("uniform", "accuracy", "file"):
        raise BadInput(f"{where}.budget: must be uniform, accuracy or file, got {o.budget!r}")
    if o.budget == "file" and not o.budget_file:
        raise BadInput(f"{where}.budget_file: budget=file needs a budget file (`synthforge gaps` writes data/gaps/budget.json)")
    if o.caption_source not in ("class_name", "column", "model"):
        raise BadInput(f"{where}.caption_source: must be class_name, column or model, got {o.caption_source!r}")
    if o.caption_source == "model" and not o.caption_model:
        raise BadInput(f"{where}.caption_model: caption_source=model needs a captioning model (path or hub id)")


def seeds_options(params: dict[str, Any]) -> SeedsOptions:
    """The validated `seeds` section of params."""
    params_file = params.get("__file__", "params.yaml")
    o = parse_options(SeedsOptions, params.get("seeds") or {}, "seeds", params_file)
    _validate(o, params_file)
    return o


def seed_count(o: SeedsOptions, n_train: int) -> int:
    """How many of n_train real images marginal sampling selects: k, or the fraction (at least one)."""
    k = o.k if o.k is not None else max(1, round(o.fraction * n_train))
    return min(k, n_train)


def images_per_seed(labels: np.ndarray, per_class_accuracy: dict[int, float | None], m: int, budget: str) -> np.ndarray:
    """How many images each selected seed gets. `accuracy` scales m by the class's error rate relative to the
    mean error (GenDataAgent saw weaker classes gain most), at least 1 and at most 4m per seed."""
    if budget == "uniform" or not len(labels):
        return np.full(len(labels), m, dtype=np.int64)
    error = np.array([1.0 - (per_class_accuracy.get(int(c)) or 0.0) for c in labels])
    mean = error.mean()
    if mean <= 0:
        return np.full(len(labels), m, dtype=np.int64)
    return np.clip(np.rint(m * error / mean), 1, 4 * m).astype(np.int64)


def read_budget(path: str | Path, class_names: list[str]) -> tuple[list[int], str]:
    """Images per class, in class order, from a budget file's `per_class` {class name: images}, and the file's
    digest. Every class must be there with a non-negative integer; other keys (total, basis, ...) are informational."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: budget file not found (seeds.budget_file; `synthforge gaps` writes one)")
    content = path.read_bytes()
    try:
        data = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not valid JSON: {exc}") from None
    per_class = data.get("per_class") if isinstance(data, dict) else None
    if not isinstance(per_class, dict):
        raise BadInput(f"{path}: per_class: expected an object of class name to images, got {per_class!r}")
    unknown = [name for name in per_class if name not in class_names]
    if unknown:
        raise BadInput(f"{path}: per_class.{unknown[0]}: not a class of the real data (classes: {', '.join(class_names)})")
    for name, n in per_class.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise BadInput(f"{path}: per_class.{name}: expected a non-negative integer number of images, got {n!r}")
    missing = [name for name in class_names if name not in per_class]
    if missing:
        raise BadInput(f"{path}: per_class: no budget for class(es) {', '.join(missing)} (give 0 to generate none)")
    return [per_class[name] for name in class_names], sha256_hex(content)


def spread_budget(labels: np.ndarray, rank: np.ndarray, selected: np.ndarray, budget: list[int], m: int) -> np.ndarray:
    """Images per real image from per-class totals: each class's budget over its lowest-ranked images, evenly.

    A class uses its selected seeds, at most one per image of budget, and at least enough that none carries more
    than m (its next-lowest-ranked images join in); the remainder goes to the lowest-ranked first."""
    n_images = np.zeros(len(labels), dtype=np.int64)
    for c, total in enumerate(budget):
        if not total:
            continue
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(rank[members])]
        n_seeds = min(len(members), total, max(int(selected[members].sum()), -(-total // m)))
        if n_seeds:
            base, extra = divmod(total, n_seeds)
            n_images[members[:n_seeds]] = base + (np.arange(n_seeds) < extra)
    return n_images


def marginal_ranks(scores: np.ndarray) -> np.ndarray:
    """Each image's rank by marginal score, 0 = the lowest; ties by input order."""
    order = np.lexsort((np.arange(len(scores)), scores))
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(len(scores))
    return rank


def marginal_record(row: dict, score: float, rank: int, selected: bool, n_images: int) -> dict:
    """One real image's MARGINAL_FIELDS."""
    return {
        "real_id": row["real_id"],
        "label": row["label"],
        "label_name": row["label_name"],
        "marginal_score": float(score),
        "rank": int(rank),
        "selected": bool(selected),
        "n_images": int(n_images),
    }


def run_seeds(params: dict[str, Any], real: str | Path, classifier: str | Path, out: str | Path) -> dict[str, Any]:
    from synthforge.vision.classifier import classifier_digest, load_classifier, marginal_scores
    from synthforge.vision.real import read_real, real_info

    o = seeds_options(params)
    seed = int(params["seed"])
    clf = load_classifier(classifier)
    table = read_real(Path(real), "train")
    rows = table.to_pylist()
    real_classes = real_info(Path(real))["class_names"]
    if real_classes != clf.class_names:
        raise BadInput(
            f"{classifier}: trained on classes {clf.class_names}, but {real} has {real_classes}; retrain the classifier"
        )
    labels = np.asarray([r["label"] for r in rows], dtype=np.int64)
    budget_file = None
    if o.budget == "file":  # read before scoring: a bad file fails fast
        budget, digest = read_budget(o.budget_file, real_classes)
        unseedable = [c for c, n in enumerate(budget) if n and not (labels == c).any()]
        if unseedable:
            c = unseedable[0]
            raise BadInput(
                f"{o.budget_file}: per_class.{real_classes[c]}: {budget[c]} images budgeted, but {real} has no training "
                "image of the class to seed them"
            )
        budget_file = {"path": str(o.budget_file), "digest": digest}
    scores = marginal_scores(clf.probabilities([r["image"] for r in rows]), labels)
    rank = marginal_ranks(scores)
    selected = rank < seed_count(o, len(rows))

    clf_stats = json.loads((Path(classifier) / "stats.json").read_text())  # load_classifier checked the folder
    accuracy = {i: clf_stats["per_class_accuracy"].get(name) for i, name in enumerate(clf.class_names)}
    if o.budget == "file":
        n_images = spread_budget(labels, rank, selected, budget, o.images_per_seed)
        selected = n_images > 0
    else:
        n_images = np.zeros(len(rows), dtype=np.int64)
        n_images[selected] = images_per_seed(labels[selected], accuracy, o.images_per_seed, o.budget)

    captions, caption_model = seed_captions(o, rows, selected)
    variants, variants_model = caption_variants(o, rows, captions, selected, n_images, seed)

    out = Path(out)
    with atomic_dir(out) as tmp:
        records = [
            {
                **marginal_record(r, scores[i], rank[i], selected[i], n_images[i]),
                "caption": captions[i],
                "caption_model": caption_model if selected[i] else None,
                "variants": variants.get(i),
                "variants_model": variants_model if i in variants else None,
            }
            for i, r in enumerate(rows)
        ]
        pq.write_table(pa.Table.from_pylist(records, schema=SEEDS_SCHEMA), tmp / "seeds.parquet", compression="zstd")
        per_class = {
            name: {
                "selected": int(selected[labels == c].sum()),
                "images": int(n_images[labels == c].sum()),
                "classifier_accuracy": accuracy.get(c),
            }
            for c, name in enumerate(clf.class_names)
        }
        stats = {
            "stage": "seeds",
            "real_train": len(rows),
            "selected": int(selected.sum()),
            "images_planned": int(n_images.sum()),
            "mean_marginal_score": {
                "selected": round(float(scores[selected].mean()), 4) if selected.any() else None,
                "all": round(float(scores.mean()), 4) if len(rows) else None,
            },
            "per_class": per_class,
            "caption_source": o.caption_source,
            "caption_model": caption_model,
            "perturb_model": variants_model,
            "unparsed_variants": sum(not v["parsed"] for vs in variants.values() for v in vs),
            "classifier": {"path": str(classifier), "digest": classifier_digest(classifier)},
            "budget_file": budget_file,
            "options": {k: getattr(o, k) for k in o.__dataclass_fields__},
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def seed_captions(o: SeedsOptions, rows: list[dict], selected: np.ndarray) -> tuple[list[str | None], str | None]:
    """The raw caption of each selected seed: its class name, the dataset's caption, or a captioning model's."""
    if o.caption_source == "class_name":
        return [r["label_name"] if s else None for r, s in zip(rows, selected, strict=True)], None
    if o.caption_source == "column":
        missing = [r["real_id"] for r, s in zip(rows, selected, strict=True) if s and not r["caption"]]
        if missing:
            raise BadInput(
                f"seeds.caption_source=column: {len(missing)} selected real images have no caption (e.g. {missing[0]})"
            )
        return [r["caption"] if s else None for r, s in zip(rows, selected, strict=True)], None
    from synthforge.vision.captions import ImageCaptioner

    captioner = ImageCaptioner(o.caption_model, param="seeds.caption_model")
    idx = np.flatnonzero(selected)
    made = captioner.caption([rows[i]["image"] for i in idx])
    captions: list[str | None] = [None] * len(rows)
    for i, text in zip(idx, made, strict=True):
        captions[i] = text
    return captions, captioner.model_id


def caption_perturber(o: SeedsOptions):
    """The LLM that writes caption variants, or None when no perturbation model is configured."""
    if not o.perturb_model:
        return None
    from synthforge.vision.captions import CaptionPerturber

    return CaptionPerturber(o.perturb_model, max_words=o.max_words, param="seeds.perturb_model")


def caption_variants(o, rows, captions, selected, n_images, seed, perturber=None) -> tuple[dict[int, list[dict]], str | None]:
    """m perturbed captions per selected seed (GenDataAgent 2.3), when a perturbation model is configured.

    perturber: one made by `caption_perturber`, so a caller asking every iteration loads the model once."""
    perturber = perturber or caption_perturber(o)
    if perturber is None:
        return {}, None
    idx = [int(i) for i in np.flatnonzero(selected)]
    m = int(n_images.max()) if idx else 0
    made = perturber.perturb([(rows[i]["label_name"], captions[i] or rows[i]["label_name"]) for i in idx], m, seed)
    out = {
        i: [{"text": v.text, "raw": v.raw, "parsed": v.parsed} for v in variants[: int(n_images[i])]]
        for i, variants in zip(idx, made, strict=True)
    }
    return out, perturber.model_id
