"""Publishing image datasets: datasets.Image + ClassLabel features, sample grids and the card's Samples section."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import yaml

import synthforge
from synthforge.errors import BadInput, LeakageError, VersionExists
from synthforge.plots import image_grid_by
from synthforge.provenance import make_sample_id, new_record
from synthforge.registry import Registry
from synthforge.release import class_names
from synthforge.stagedir import StageWriter, stage_fingerprint
from synthforge.vision.images import IMAGE_CONTENT_SCHEMA, decode_image, encode_png

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LEVELS = ["easy", "medium", "hard", "adversarial"]
PER_CLASS = 10
PARAMS = {"split": {"ratios": {"train": 0.8, "test": 0.2}}}  # the order splits are listed in


def digit_rows(change_pixel_of: int | None = None) -> list[dict]:
    """PER_CLASS sklearn digits per class; every 5th goes to test except class 9, which is in train only."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows, taken = [], dict.fromkeys(range(10), 0)
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(label)
        if taken[label] == PER_CLASS:
            continue
        taken[label] += 1
        grey = (pixels * 255 / 16).astype(np.uint8)
        if i == change_pixel_of:
            grey[0, 0] ^= 1
        source = {"uri": "sklearn://digits", "row": i}
        sid = make_sample_id(source, {"label": label})
        prov = new_record(sample_id=sid, run_id="run-1", source=source, method="real", model="sklearn", batch_id="b1")
        prov["difficulty"] = LEVELS[i % 4]
        prov["split"] = "test" if taken[label] % 5 == 0 and label != 9 else "train"
        content = {"image": encode_png(grey), "label": label, "label_name": NAMES[label], "caption": None}
        rows.append({"sample_id": sid, **content, "provenance": prov})
    return rows


def write_split_stage(out, rows: list[dict]) -> None:
    with StageWriter(out, "split", IMAGE_CONTENT_SCHEMA, stage_fingerprint("split", {}, {})) as writer:
        writer.write(rows)


def _git(repo, *args) -> bytes:
    return subprocess.run(["git", "--git-dir", str(repo), *args], capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rows = digit_rows()
    write_split_stage(root / "data" / "split", rows)
    registry = Registry(root / "registry")
    result = registry.publish(root / "data" / "split", "digits", "1.0.0", PARAMS, root)
    return registry, result, rows, root


def test_load_gives_pil_images_with_the_written_pixels_and_named_int_labels(published):
    registry, _, rows, _ = published
    ds = synthforge.load("digits", version="1.0.0", registry=registry.root)
    written = {r["sample_id"]: r for r in rows}
    assert sum(len(ds[s]) for s in ds) == len(rows) and set(ds) == {"train", "test"}
    for split in ds:
        # the test split has no "nine", yet its class names are the version's full list
        assert ds[split].features["label"].names == NAMES
        for row in ds[split]:
            src = written[row["sample_id"]]
            assert row["image"].size == (8, 8)
            assert np.array_equal(np.asarray(row["image"]), np.asarray(decode_image(src["image"])))
            assert type(row["label"]) is int and row["label"] == src["label"]
            assert ds[split].features["label"].int2str(row["label"]) == row["label_name"]
    assert 9 not in ds["test"]["label"]


def test_plain_datasets_parquet_loader_reads_the_exported_files(published, tmp_path):
    import datasets
    from PIL import Image

    registry, result, _, _ = published
    root = registry.checkout("digits", result.info.commit)
    ds = datasets.load_dataset("parquet", data_files={"test": str(root / "data" / "test-*.parquet")}, cache_dir=str(tmp_path))
    row = ds["test"][0]
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "L"
    assert isinstance(ds["test"].features["image"], datasets.Image)
    assert ds["test"].features["label"].names == NAMES and isinstance(row["label"], int)


def test_the_version_holds_class_and_difficulty_grids_that_decode(published):
    _, result, _, _ = published
    files = _git(result.repo, "ls-tree", "-r", "--name-only", "v1.0.0").decode().split()
    assert {"images/grid_by_class.png", "images/grid_by_difficulty.png"} <= set(files)
    by_class = decode_image(_git(result.repo, "show", "v1.0.0:images/grid_by_class.png"))
    by_difficulty = decode_image(_git(result.repo, "show", "v1.0.0:images/grid_by_difficulty.png"))
    for grid in (by_class, by_difficulty):
        assert grid.width >= 8 * 64  # eight thumbnails a row, each an 8x8 digit drawn 8x larger
        assert np.asarray(grid.convert("L")).std() > 20  # drawn digits, not a blank canvas
    assert by_class.height >= 10 * 64 > by_difficulty.height >= 4 * 64  # one row per class / per level


def test_card_embeds_the_grids_shows_the_image_feature_and_counts_per_class(published):
    _, result, rows, _ = published
    card = _git(result.repo, "show", "v1.0.0:README.md").decode()
    _, front, body = card.split("---\n", 2)
    features = {f["name"]: f for f in yaml.safe_load(front)["dataset_info"]["features"]}
    assert features["image"]["dtype"] == "image"
    assert features["label"]["dtype"]["class_label"]["names"] == {str(i): n for i, n in enumerate(NAMES)}
    samples = body.split("## Samples", 1)[1]
    assert "![Samples per class](images/grid_by_class.png)" in samples
    assert "![Samples per difficulty](images/grid_by_difficulty.png)" in samples
    train_nine = sum(1 for r in rows if r["label"] == 9 and r["provenance"]["split"] == "train")
    assert f"| nine | {train_nine} | 0 | {train_nine} |" in samples
    assert "| class | train | test | total |" in samples


def test_republishing_the_same_images_is_a_no_op_and_other_pixels_are_refused(published, tmp_path):
    registry, result, rows, root = published
    again = registry.publish(root / "data" / "split", "digits", "1.0.0", PARAMS, root)
    assert again.already_published and again.info.commit == result.info.commit
    changed = digit_rows(change_pixel_of=rows[3]["provenance"]["source"]["row"])
    write_split_stage(tmp_path / "split", changed)
    with pytest.raises(VersionExists, match="1.0.0 already exists"):
        registry.publish(tmp_path / "split", "digits", "1.0.0", PARAMS, tmp_path)
    assert _git(result.repo, "rev-list", "--count", "main").decode().strip() == "1"


def test_the_same_image_in_two_splits_is_refused_as_leakage(tmp_path):
    rows = digit_rows()
    twin = next(r for r in rows if r["provenance"]["split"] == "test")
    rows[0]["image"] = twin["image"]  # rows[0] is in train
    write_split_stage(tmp_path / "split", rows)
    expected = rf"split leakage: same \w+ in train \({rows[0]['sample_id']}\) and test \({twin['sample_id']}\)"
    with pytest.raises(LeakageError, match=expected):
        Registry(tmp_path / "registry").publish(tmp_path / "split", "digits", "1.0.0", PARAMS, tmp_path)


def test_a_label_named_two_ways_is_refused_naming_both_samples(tmp_path):
    rows = digit_rows()[:20]
    rows[1]["label"], rows[1]["label_name"] = rows[0]["label"], "zéro"
    write_split_stage(tmp_path / "split", rows)
    with pytest.raises(BadInput, match=f"label 0 is named 'zero' \\(sample {rows[0]['sample_id']}\\) and 'zéro'"):
        Registry(tmp_path / "registry").publish(tmp_path / "split", "digits", "1.0.0", PARAMS, tmp_path)


def test_class_names_keep_label_ids_when_a_class_has_no_samples_at_all(tmp_path):
    rows = [r for r in digit_rows() if r["label"] != 5]
    names = class_names(rows, tmp_path)
    assert names[:5] == NAMES[:5] and names[6:] == NAMES[6:] and "5" in names[5]
    assert class_names([{**r, "label_name": None} for r in rows], tmp_path) is None


def _solid(colour, left=None) -> bytes:
    """An 8x8 RGB image of one colour, or two halves: `left` on columns 0-3."""
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:] = colour
    if left is not None:
        pixels[:, :4] = left
    return encode_png(pixels)


def test_grid_rows_follow_difficulty_order_and_tiny_images_grow_with_sharp_pixels():
    red, green, blue, yellow = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
    colour_of = {"adversarial": yellow, "hard": blue, "medium": green, "easy": red}
    rows = [
        {"sample_id": f"s{i}", "image": _solid(colour, left=(0, 0, 0)), "provenance": {"difficulty": level}}
        for i, (level, colour) in enumerate(colour_of.items())  # given hardest first
    ]
    png = image_grid_by(rows, lambda r: r["provenance"]["difficulty"], order=LEVELS, per_row=1, thumb_px=64)
    grid = np.asarray(decode_image(png).convert("RGB")).astype(int)
    first_row_of = {}
    for level, colour in colour_of.items():
        hits = np.argwhere(np.abs(grid - colour).sum(axis=2) == 0)
        assert len(hits) == 64 * 32, level  # the right half of an 8x8 image drawn 8x larger, no blended edge
        first_row_of[level] = hits[:, 0].min()
        left_of_colour = grid[hits[0][0], hits[:, 1].min() - 32 : hits[:, 1].min()]
        assert (left_of_colour == 0).all()  # the black left half, 32 pixels wide and sharp
    assert sorted(first_row_of, key=first_row_of.get) == LEVELS


def test_grids_are_the_same_whatever_the_row_order_and_name_a_broken_image():
    rows = digit_rows()[:40]
    assert image_grid_by(rows, "label_name", per_row=3) == image_grid_by(rows[::-1], "label_name", per_row=3)
    broken = [*rows, {**rows[0], "sample_id": "aaa-broken", "image": b"not a png"}]
    with pytest.raises(BadInput, match="sample aaa-broken: column 'image': not a readable image"):
        image_grid_by(broken, "label_name")
