"""Image pipeline settings: mistakes in params.yaml give one clear error naming the key, before any work starts."""

from __future__ import annotations

import pytest
import yaml

from synthforge.errors import BadInput
from synthforge.params import load_params
from synthforge.resources import recipe_dir


@pytest.fixture
def params(tmp_path):
    def write(edit) -> dict:
        p = yaml.safe_load((recipe_dir() / "params.yaml").read_text())
        edit(p)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(p))
        return load_params(path)

    return write


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("strength", 0, "generator.unet.strength: must be in (0, 1]"),
        ("strength", 1.5, "generator.unet.strength: must be in (0, 1]"),
        ("sample_steps", 0, "generator.unet.sample_steps: must be at least 1"),
        ("guidance_scale", 0.5, "generator.unet.guidance_scale: must be at least 1"),
    ],
)
def test_bad_sampling_options_name_the_key(params, key, value, message):
    from synthforge.stages.prepare import family_options

    p = params(lambda d: d["generate"]["unet"].update({key: value}))
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        family_options(p, "generate")


def test_an_adaptation_option_under_generate_is_refused_not_ignored(params):
    from synthforge.stages.prepare import family_options

    p = params(lambda d: d["generate"]["unet"].update({"lora_rank": 4}))
    with pytest.raises(BadInput, match=r"generate\.unet\.lora_rank: not a sampling option .* generator\.unet"):
        family_options(p, "generate")
    family_options(params(lambda d: d["generator"]["unet"].update({"lora_rank": 4})), "adapt")  # where it belongs


def test_an_unknown_generator_family_and_a_bad_schema_value_are_named(params, tmp_path):
    with pytest.raises(BadInput, match=r"generator\.family"):
        params(lambda d: d["generator"].update({"family": "gan"}))
    with pytest.raises(BadInput, match=r"dedup\.image\.hash"):
        params(lambda d: d["dedup"]["image"].update({"hash": "md5"}))
    with pytest.raises(BadInput, match=r"generate: unknown key 'bogus'"):
        params(lambda d: d["generate"].update({"bogus": 1}))


def test_seeds_k_alone_is_enough_and_both_k_and_fraction_is_refused(params):
    from synthforge.params import parse_options
    from synthforge.stages.seeds import SeedsOptions, _validate

    o = parse_options(SeedsOptions, {"k": 50}, "seeds", "params.yaml")
    _validate(o, "params.yaml")
    assert o.k == 50 and o.fraction is None
    o = parse_options(SeedsOptions, {}, "seeds", "params.yaml")
    _validate(o, "params.yaml")
    assert o.fraction == 0.2
    with pytest.raises(BadInput, match="exactly one of k and fraction"):
        _validate(parse_options(SeedsOptions, {"k": 5, "fraction": 0.5}, "seeds", "params.yaml"), "params.yaml")


def test_image_dedup_distance_beyond_the_hash_is_refused(params):
    from synthforge.stages.dedup import ImageDedupStage

    with pytest.raises(BadInput, match=r"dedup\.image\.max_distance: 64 must be below the hash length"):
        ImageDedupStage({"hash": "phash", "hash_size": 8, "max_distance": 64})
