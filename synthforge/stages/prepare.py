"""The steps that prepare image generation: real data in, the reference classifier, the adapted generator.

Their outputs are model and data folders, not stage directories: they hold no synthetic samples. Each is
written to a temporary folder and renamed into place, like a stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthforge.errors import BadInput
from synthforge.params import parse_options
from synthforge.stagedir import atomic_dir


@dataclass(frozen=True)
class Family:
    """A generator family: its options, how to adapt it, how to load what `adapt` wrote."""

    name: str
    options: type
    module: str
    sampling: tuple[str, ...]  # the options that belong to generation (generate.<family>), not adaptation

    def load_module(self):
        import importlib

        return importlib.import_module(self.module)


def _families() -> dict[str, Family]:
    from synthforge.vision.stable_diffusion import StableDiffusionOptions
    from synthforge.vision.unet import UNetOptions

    return {
        "unet": Family(
            "unet", UNetOptions, "synthforge.vision.unet", ("sample_steps", "guidance_scale", "strength", "batch_size_generate")
        ),
        "stable_diffusion": Family(
            "stable_diffusion",
            StableDiffusionOptions,
            "synthforge.vision.stable_diffusion",
            ("guidance_scale", "strength", "num_inference_steps", "negative_prompt", "batch_size", "mixed_precision"),
        ),
    }


def family_options(params: dict[str, Any], stage: str) -> tuple[Family, Any]:
    """The generator family named in `generator.family` and its options.

    Adapt-time options live in `generator.<family>`, sampling options in `generate.<family>` (so changing a
    sampling setting reruns generation, not adaptation); both are one options dataclass.
    """
    params_file = params.get("__file__", "params.yaml")
    section = params.get("generator") or {}
    families = _families()
    name = section.get("family", "unet")
    if name not in families:
        raise BadInput(f"{params_file}: generator.family: unknown family {name!r} (known: {', '.join(families)})")
    family = families[name]
    raw = dict(section.get(name) or {})
    if stage == "generate":
        sampling = (params.get("generate") or {}).get(name) or {}
        misplaced = sorted(set(sampling) - set(family.sampling))
        if misplaced:
            raise BadInput(
                f"{params_file}: generate.{name}.{misplaced[0]}: not a sampling option (sampling options: "
                f"{', '.join(family.sampling)}; adaptation options go in generator.{name})"
            )
        parse_options(family.options, {**raw, **sampling}, f"generate.{name}", params_file)  # names generate.* in errors
        raw.update(sampling)
    return family, parse_options(family.options, raw, f"generator.{name}", params_file)


def run_real(params: dict[str, Any], out: str | Path) -> dict[str, Any]:
    from synthforge.vision.real import RealOptions, prepare_real

    params_file = params.get("__file__", "params.yaml")
    options = parse_options(RealOptions, params.get("real") or {}, "real", params_file)
    return prepare_real(options, Path(out), int(params["seed"]), params_file)


def run_classifier(params: dict[str, Any], real: str | Path, out: str | Path) -> dict[str, Any]:
    from synthforge.vision.classifier import ClassifierOptions, train_classifier

    params_file = params.get("__file__", "params.yaml")
    options = parse_options(ClassifierOptions, params.get("classifier") or {}, "classifier", params_file)
    return train_classifier(options, real, out, int(params["seed"]))


def real_examples(real: str | Path, split: str = "train"):
    from synthforge.vision.generator import RealExample
    from synthforge.vision.real import read_real

    table = read_real(Path(real), split)
    return [
        RealExample(image=r["image"], label=r["label"], class_name=r["label_name"], caption=r["caption"])
        for r in table.to_pylist()
    ]


def run_adapt(params: dict[str, Any], real: str | Path, out: str | Path) -> dict[str, Any]:
    from synthforge.vision.real import real_info

    family, options = family_options(params, "adapt")
    info = real_info(Path(real))
    examples = real_examples(real)
    module = family.load_module()
    seed = int(params["seed"])
    if family.name == "unet":
        return module.adapt_unet(options, examples, info["class_names"], info["channels"], out, seed, info["digest"])
    out = Path(out)
    with atomic_dir(out) as tmp:
        meta = module.adapt_stable_diffusion(options, examples, tmp, seed)
        meta = {**meta, "class_names": info["class_names"], "real_digest": info["digest"]}
        (tmp / "generator.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def load_generator(params: dict[str, Any], model_dir: str | Path):
    """The adapted generator, ready to turn ImageRequests into PNG bytes."""
    family, options = family_options(params, "generate")
    module = family.load_module()
    if family.name == "unet":
        return family, module.UNetGenerator(model_dir, options)
    return family, module.StableDiffusionGenerator(options, Path(model_dir))
