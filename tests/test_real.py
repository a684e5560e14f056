"""real: labelled images from digits, image folders, Parquet and HF datasets become train/test Parquet + info."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tree_digest

from synthforge.errors import BadInput
from synthforge.vision import real
from synthforge.vision.real import RealOptions, prepare_real, read_real, real_info


def png(pixels: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def decode(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img


def grey(value: int, size: int = 6) -> bytes:
    return png(np.full((size, size), value))


def rows_of(out: Path, split: str) -> list[dict]:
    return read_real(out, split).to_pylist()


# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits()


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory) -> dict[str, Path]:
    """The digits prepared with seed 0 (twice), seed 1, and seed 0 with per_class=5."""
    root = tmp_path_factory.mktemp("digits")
    runs = {
        "seed0": (RealOptions(), 0),
        "seed0_again": (RealOptions(), 0),
        "seed1": (RealOptions(), 1),
        "per_class": (RealOptions(per_class=5), 0),
    }
    for name, (options, seed) in runs.items():
        prepare_real(options, root / name, seed=seed)
    return {name: root / name for name in runs}


def test_digits_counts_and_stratified_split(digits_runs, digits):
    out = digits_runs["seed0"]
    train, test = rows_of(out, "train"), rows_of(out, "test")
    info = real_info(out)
    assert info["class_names"] == [str(d) for d in range(10)]
    assert info["channels"] == 1
    assert info["image_size"] == {"min": {"width": 8, "height": 8}, "max": {"width": 8, "height": 8}}
    assert info["counts"]["source"] == len(digits.target) == len(train) + len(test)
    assert (info["counts"]["train"], info["counts"]["test"]) == (len(train), len(test))
    # every source row lands in exactly one split, and each class gives a fifth of its images to test
    assert sorted(r["source_row"] for r in train + test) == list(range(len(digits.target)))
    per_class = np.bincount(digits.target)
    for label, n in enumerate(per_class):
        n_test = sum(r["label"] == label for r in test)
        assert n_test == round(n * 0.2)
        assert info["per_class"]["test"][str(label)] == n_test
        assert info["per_class"]["train"][str(label)] == n - n_test
    assert read_real(out, "train").schema.equals(real.REAL_SCHEMA)


def test_digits_images_are_grey_8x8_pngs_of_the_scaled_sklearn_pixels(digits_runs, digits):
    for row in rows_of(digits_runs["seed0"], "test") + rows_of(digits_runs["seed0"], "train")[:50]:
        img = decode(row["image"])
        assert (img.mode, img.size) == ("L", (8, 8))
        expected = np.rint(digits.images[row["source_row"]] * 255 / 16)
        np.testing.assert_array_equal(np.asarray(img), expected)
        assert row["label"] == digits.target[row["source_row"]]
        assert row["label_name"] == str(row["label"])
        assert row["caption"] is None


def test_digits_same_seed_same_output_other_seed_other_split_ids_stable(digits_runs):
    first, again, other = (digits_runs[k] for k in ("seed0", "seed0_again", "seed1"))
    for split in real.SPLITS:
        assert read_real(first, split).equals(read_real(again, split))
    assert real_info(first)["digest"] == real_info(again)["digest"]

    test0 = {r["source_row"] for r in rows_of(first, "test")}
    test1 = {r["source_row"] for r in rows_of(other, "test")}
    assert test0 != test1 and len(test0) == len(test1)
    assert real_info(first)["digest"] != real_info(other)["digest"]
    assert real_info(first)["source_digest"] == real_info(other)["source_digest"]  # same source, other split

    # a real image keeps its id whichever split it lands in
    ids0 = {r["source_row"]: r["real_id"] for s in real.SPLITS for r in rows_of(first, s)}
    ids1 = {r["source_row"]: r["real_id"] for s in real.SPLITS for r in rows_of(other, s)}
    assert ids0 == ids1
    assert len(set(ids0.values())) == len(ids0)
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in ids0.values())


def test_digits_per_class_thins_train_only(digits_runs, digits):
    limited, full = digits_runs["per_class"], digits_runs["seed0"]
    train = rows_of(limited, "train")
    assert np.bincount([r["label"] for r in train]).tolist() == [5] * 10
    # the test split is the same as without the limit, so low-data runs are scored on the same images
    assert read_real(limited, "test").equals(read_real(full, "test"))
    assert {r["real_id"] for r in train} <= {r["real_id"] for r in rows_of(full, "train")}
    info = real_info(limited)
    assert info["counts"]["dropped_by_per_class"] == real_info(full)["counts"]["train"] - 50
    assert info["options"]["per_class"] == 5


# ---------------------------------------------------------------------------------------------- image folder


def make_imagefolder(root: Path) -> Path:
    """3 classes x 3 images: RGB PNG, JPEG, RGBA PNG, grey, palette, 16-bit grey."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3))
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 100)], axis=2)
    files = {
        "cat/a.png": png(rgb),
        "cat/b.jpg": png(rgb, fmt="JPEG"),
        "cat/c.png": png(rgba, mode="RGBA"),
        "dog/a.png": grey(10),
        "dog/b.png": grey(20, size=9),
        "dog/notes.txt": b"not an image, ignored",
        "bird/a.png": grey(30),
        "bird/c.PNG": grey(50),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    palette = Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(root / "dog/c.png")
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(root / "bird/b.png")
    return root


def test_imagefolder(tmp_path):
    src = make_imagefolder(tmp_path / "folder")
    out = tmp_path / "out"
    info = prepare_real(RealOptions(source=str(src), test_fraction=1 / 3), out, seed=0)
    rows = sorted(rows_of(out, "train") + rows_of(out, "test"), key=lambda r: r["source_row"])
    assert info["class_names"] == ["bird", "cat", "dog"]
    assert [(r["source_row"], r["label_name"]) for r in rows] == [
        (0, "bird"), (1, "bird"), (2, "bird"), (3, "cat"), (4, "cat"), (5, "cat"), (6, "dog"), (7, "dog"), (8, "dog"),
    ]  # fmt: skip
    assert [r["label"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    modes = [decode(r["image"]).mode for r in rows]
    assert modes == ["L", "L", "L", "RGB", "RGB", "RGB", "L", "L", "RGB"]
    assert np.asarray(decode(rows[1]["image"])).max() == 255  # 16-bit white stays white
    # RGBA loses only its alpha: the colours are those of the RGB image
    np.testing.assert_array_equal(np.asarray(decode(rows[5]["image"])), np.asarray(decode(rows[3]["image"])))
    assert info["channels"] == 1  # 5 grey, 4 RGB
    assert info["image_size"] == {"min": {"width": 3, "height": 3}, "max": {"width": 9, "height": 9}}
    assert info["counts"] == {"source": 9, "train": 6, "test": 3, "dropped_by_per_class": 0}
    assert info["per_class"]["test"] == {"bird": 1, "cat": 1, "dog": 1}


def test_imagefolder_class_names_override_split_folder_and_captions(tmp_path):
    root = tmp_path / "folder"
    for split, n in (("train", 2), ("test", 1)):
        for cls in ("a", "b"):
            for i in range(n):
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                (root / split / cls / f"{i}.png").write_bytes(grey(i * 40 + (cls == "b")))
    (root / "train" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{c}/{i}.png", "text": f"a {c} number {i}"}) + "\n" for c in "ab" for i in range(2))
    )
    options = RealOptions(source=str(root), split="train", class_names=["b", "a"], caption_column="text", test_fraction=0)
    info = prepare_real(options, tmp_path / "out", seed=0)
    rows = rows_of(tmp_path / "out", "train")
    assert info["class_names"] == ["b", "a"]
    assert [(r["label"], r["label_name"], r["caption"]) for r in rows] == [
        (1, "a", "a a number 0"), (1, "a", "a a number 1"), (0, "b", "a b number 0"), (0, "b", "a b number 1"),
    ]  # fmt: skip
    assert rows_of(tmp_path / "out", "test") == []

    with pytest.raises(BadInput, match="set real.split to one of: test, train"):
        prepare_real(RealOptions(source=str(root)), tmp_path / "out2", seed=0)


# ---------------------------------------------------------------------------------------------- parquet and HF


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_bytes_labels_captions_and_class_names(tmp_path):
    images = [grey(v) for v in range(0, 240, 20)]  # 12 images, 4 per class
    src = write_parquet(
        tmp_path / "data.parquet",
        {"img": images, "y": [i % 3 for i in range(12)], "text": [f"caption {i}" for i in range(12)], "other": list(range(12))},
    )
    options = RealOptions(
        source=str(src), image_column="img", label_column="y", caption_column="text", class_names=["zero", "one", "two"]
    )
    info = prepare_real(options, tmp_path / "out", seed=3, params_file="p.yaml")
    rows = sorted(rows_of(tmp_path / "out", "train") + rows_of(tmp_path / "out", "test"), key=lambda r: r["source_row"])
    assert [r["caption"] for r in rows] == [f"caption {i}" for i in range(12)]
    assert [r["label_name"] for r in rows] == ["zero", "one", "two"] * 4
    assert [int(np.asarray(decode(r["image"]))[0, 0]) for r in rows] == list(range(0, 240, 20))
    assert info["counts"]["test"] == 3 and set(info["per_class"]["test"].values()) == {1}
    assert info["seed"] == 3 and info["options"]["caption_column"] == "text"


def test_parquet_string_labels_and_split_column(tmp_path):
    src = write_parquet(
        tmp_path / "data.parquet",
        {
            "image": [grey(v) for v in range(6)],
            "label": ["pear", "apple", "pear", "apple", "fig", "fig"],
            "split": ["train", "train", "train", "train", "test", "test"],
        },
    )
    info = prepare_real(RealOptions(source=str(src), split="train", test_fraction=0.5), tmp_path / "out", seed=0)
    assert info["class_names"] == ["apple", "pear"]  # only the rows of the asked split, names sorted
    assert info["counts"]["source"] == 4
    assert info["source_id"].endswith("[train]")


def hf_dataset(n_per_class: int = 3, captions: bool = False):
    import datasets

    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["circle", "square"])}
    data = {
        "image": [{"bytes": grey(10 * i), "path": None} for i in range(2 * n_per_class)],
        "label": [i % 2 for i in range(2 * n_per_class)],
    }
    if captions:
        features["caption"] = datasets.Value("string")
        data["caption"] = [f"shape {i}" for i in range(2 * n_per_class)]
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def test_hf_saved_to_disk_reads_classlabel_names_and_the_asked_split(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": hf_dataset(3, captions=True), "test": hf_dataset(1)}).save_to_disk(str(saved))
    options = RealOptions(source=str(saved), split="train", caption_column="caption")
    info = prepare_real(options, tmp_path / "out", seed=0)
    assert info["class_names"] == ["circle", "square"]
    assert info["counts"]["source"] == 6  # the test split of the source is not read
    rows = sorted(rows_of(tmp_path / "out", "train") + rows_of(tmp_path / "out", "test"), key=lambda r: r["source_row"])
    assert [r["label_name"] for r in rows] == ["circle", "square"] * 3
    assert [r["caption"] for r in rows] == [f"shape {i}" for i in range(6)]

    renamed = prepare_real(RealOptions(source=str(saved), class_names=["round", "boxy"]), tmp_path / "out2", seed=0)
    assert renamed["class_names"] == ["round", "boxy"] and renamed["counts"]["source"] == 8  # no split: all of them
    assert {r["label_name"] for r in rows_of(tmp_path / "out2", "train")} == {"round", "boxy"}


def test_hf_parquet_with_image_and_classlabel_features(tmp_path):
    src = tmp_path / "hf.parquet"
    hf_dataset(3).to_parquet(str(src))
    assert pq.read_schema(src).field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    info = prepare_real(RealOptions(source=str(src)), tmp_path / "out", seed=0)
    assert info["class_names"] == ["circle", "square"]
    rows = rows_of(tmp_path / "out", "train") + rows_of(tmp_path / "out", "test")
    assert sorted(int(np.asarray(decode(r["image"]))[0, 0]) for r in rows) == [0, 10, 20, 30, 40, 50]

    # hub layout: data/<split>-NNNNN-of-NNNNN.parquet, one split asked for
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    hf_dataset(3).to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    hf_dataset(2).to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))
    assert prepare_real(RealOptions(source=str(hub), split="test"), tmp_path / "out_hub", seed=0)["counts"]["source"] == 4
    assert prepare_real(RealOptions(source=str(hub)), tmp_path / "out_hub", seed=0)["counts"]["source"] == 10


def test_hub_id_goes_to_load_dataset_with_the_split(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, split=None):
        calls.append((path, split))
        return hf_dataset(2)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    info = prepare_real(RealOptions(source="someone/shapes", split="train"), tmp_path / "out", seed=0)
    assert calls == [("someone/shapes", "train")]
    assert info["class_names"] == ["circle", "square"] and info["source_id"] == "someone/shapes[train]"

    def offline(path, split=None):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BadInput, match=r"someone/missing: no such file or folder.*Couldn't reach"):
        prepare_real(RealOptions(source="someone/missing"), tmp_path / "out", seed=0)


# ---------------------------------------------------------------------------------------------- bad input


def bad_parquet(tmp_path: Path, **columns) -> str:
    base = {"image": [grey(i) for i in range(6)], "label": [0, 1] * 3}
    return str(write_parquet(tmp_path / "bad.parquet", {**base, **columns}))


def corrupt_folder(tmp_path: Path, data: bytes) -> str:
    make_imagefolder(tmp_path / "folder")
    (tmp_path / "folder" / "dog" / "b.png").write_bytes(data)
    return str(tmp_path / "folder")


def csv_file(tmp_path: Path) -> str:
    (tmp_path / "x.csv").write_text("image,label\n")
    return str(tmp_path / "x.csv")


def empty_folder(tmp_path: Path) -> str:
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    return str(tmp_path / "folder")


BAD = {
    "corrupt image file": (
        lambda t: RealOptions(source=corrupt_folder(t, b"\x89PNG garbage")),
        r"dog/b\.png.*not a readable image",
    ),
    "zero-byte image file": (lambda t: RealOptions(source=corrupt_folder(t, b"")), r"dog/b\.png.*0 bytes"),
    "corrupt image row": (
        lambda t: RealOptions(source=bad_parquet(t, image=[grey(0)] * 4 + [b"junk", grey(1)])),
        r"bad\.parquet row 4: not a readable image",
    ),
    "null image row": (lambda t: RealOptions(source=bad_parquet(t, image=[grey(0), None] * 3)), r"row 1: image is missing"),
    "label outside the class list": (
        lambda t: RealOptions(source=bad_parquet(t, label=[0, 1, 0, 1, 2, 0]), class_names=["a", "b"]),
        r"row 4: label 2 is outside the class list \(0\.\.1: a, b\)",
    ),
    "name outside the class list": (
        lambda t: RealOptions(source=bad_parquet(t, label=["a", "b", "c", "a", "b", "a"]), class_names=["a", "b"]),
        r"row 2: label 'c' is not in the class list",
    ),
    "negative label": (lambda t: RealOptions(source=bad_parquet(t, label=[0, 1, -1, 0, 1, 0])), r"row 2: label -1 is negative"),
    "null label": (lambda t: RealOptions(source=bad_parquet(t, label=[0, 1, 0, None, 1, 0])), r"row 3: label is missing"),
    "missing image column": (
        lambda t: RealOptions(source=bad_parquet(t), image_column="pixels"),
        r"bad\.parquet: missing column\(s\) 'pixels' \(columns present: image, label\)",
    ),
    "missing label column": (
        lambda t: RealOptions(source=bad_parquet(t), label_column="class"),
        r"missing column\(s\) 'class' \(columns present: image, label\)",
    ),
    "missing caption column": (
        lambda t: RealOptions(source=bad_parquet(t), caption_column="text"),
        r"missing column\(s\) 'text'",
    ),
    "empty parquet": (
        lambda t: RealOptions(source=str(write_parquet(t / "e.parquet", {"image": pa.array([], pa.binary()), "label": []}))),
        r"e\.parquet: the source has no images",
    ),
    "empty folder": (lambda t: RealOptions(source=empty_folder(t)), r"folder: no images found"),
    "class too small for a test image": (
        lambda t: RealOptions(source=bad_parquet(t, label=[0, 1, 1, 1, 1, 1])),
        r"class '0' has 1 image\(s\); real\.test_fraction=0\.2 needs at least 2",
    ),
    "unknown source": (
        lambda t: RealOptions(source="no such thing!"),
        r"params\.yaml: real\.source: unknown source 'no such thing!'",
    ),
    "missing path": (lambda t: RealOptions(source="./not/here"), r"unknown source './not/here'.*no such file or folder"),
    "not parquet": (
        lambda t: RealOptions(source=csv_file(t)),
        r"x\.csv: unsupported file type '\.csv'",
    ),
    "test_fraction 1": (
        lambda t: RealOptions(test_fraction=1.0),
        r"params\.yaml: real\.test_fraction: must be at least 0 and below 1",
    ),
    "per_class 0": (lambda t: RealOptions(per_class=0), r"real\.per_class: must be at least 1"),
    "split not in the source": (
        lambda t: RealOptions(source=bad_parquet(t), split="validation"),
        r"bad\.parquet: real\.split 'validation' asked for, but .*no 'split' column",
    ),
    "class_names of another length than the ClassLabel": (
        lambda t: RealOptions(source=str(hf_parquet(t)), class_names=["a", "b", "c"]),
        r"real\.class_names: 3 names given, but the source has 2 classes \(circle, square\)",
    ),
}


def hf_parquet(tmp_path: Path) -> Path:
    hf_dataset(3).to_parquet(str(tmp_path / "hf.parquet"))
    return tmp_path / "hf.parquet"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_file_or_row(case, tmp_path):
    make_options, message = BAD[case]
    options = make_options(tmp_path)
    with pytest.raises(BadInput, match=message):
        prepare_real(options, tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left behind


def test_reading_a_missing_or_wrong_folder(tmp_path):
    with pytest.raises(BadInput, match="info.json: not found"):
        real_info(tmp_path)
    with pytest.raises(BadInput, match="train.parquet: not found"):
        read_real(tmp_path, "train")
    with pytest.raises(BadInput, match="unknown split 'validation'"):
        read_real(tmp_path, "validation")


# ---------------------------------------------------------------------------------------------- atomic output


def test_failed_runs_leave_the_previous_output_byte_identical(tmp_path, monkeypatch):
    src = bad_parquet(tmp_path)
    out = tmp_path / "out"
    prepare_real(RealOptions(source=src), out, seed=0)
    before = tree_digest(out)

    written = []
    real_write = pq.write_table

    def crash_after_first_file(table, where, **kwargs):
        if written:
            raise RuntimeError("disk full")
        written.append(where)
        real_write(table, where, **kwargs)

    monkeypatch.setattr(real.pq, "write_table", crash_after_first_file)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_real(RealOptions(source=src), out, seed=1)  # another seed: a different output was on its way
    monkeypatch.undo()
    assert written  # the crash came mid-write, after a file of the new output was written
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "out"]  # no temp or old folder left

    with pytest.raises(BadInput):
        prepare_real(RealOptions(source=src, label_column="nope"), out, seed=1)
    assert tree_digest(out) == before

    prepare_real(RealOptions(source=src), out, seed=1)  # a good run replaces it
    assert tree_digest(out) != before
