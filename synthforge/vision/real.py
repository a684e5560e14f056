"""real: real labelled images in, the first stage of the image pipeline.

A source (scikit-learn's bundled 8x8 digits, an image folder, Parquet, or a Hugging Face dataset) becomes

    out/train.parquet   real_id, image (PNG bytes), label (0..K-1), label_name, caption, source_row
    out/test.parquet    the held-out real test split: stratified by label, seeded
    out/info.json       class names, channels, image sizes, counts, content digests, seed and options

Every image is re-encoded to PNG (grey stays grey; palettes, RGBA and the rest become RGB) so later stages see
one format. Rows in error messages are 0-based, as in the `source_row` column. The folder is written beside
`out` and renamed into place, so a failed run leaves the previous output as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthforge.errors import BadInput
from synthforge.provenance import canonical_json, make_sample_id, sha256_hex
from synthforge.sources import PARQUET_ERRORS, arrow_rows
from synthforge.stagedir import atomic_dir
from synthforge.vision.images import decode_image, encode_png

if TYPE_CHECKING:
    from PIL import Image as PILImage

SPLITS = ("train", "test")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Hub ids look like `name` or `owner/name`; anything else that is not a local path is an unknown source.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")

REAL_SCHEMA = pa.schema(
    [
        ("real_id", pa.string()),
        ("image", pa.binary()),  # PNG bytes, as in synthforge.vision.images
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("caption", pa.string()),
        ("source_row", pa.int64()),
    ]
)


@dataclass
class RealOptions:
    """params.yaml section `real`."""

    source: str = "digits"  # "digits" | an image folder | a .parquet file or folder | a HF dataset id or saved folder
    split: str | None = None  # the HF split, hub-layout file prefix, or `split` column value to read; None = all
    image_column: str = "image"
    label_column: str = "label"
    caption_column: str | None = None
    class_names: list[str] | None = None  # else the ClassLabel names, the folder names, or "0".."9" for digits
    test_fraction: float = 0.2  # held-out real test split, stratified by label
    per_class: int | None = None  # keep at most this many training images per class (low-data regimes)


@dataclass
class _RawRow:
    """One source row before conversion: where it is (for messages) and its raw values."""

    where: str
    image: Any  # bytes, {"bytes", "path"} (a HF Image), a path string, or a PIL image
    label: Any  # a class index or a class name
    caption: Any = None
    base_dir: Path | None = None  # where a relative image path is resolved


@dataclass
class _Source:
    rows: list[_RawRow]
    class_names: list[str] | None  # the source's own class list (ClassLabel, folders, digits), if it has one
    names_are_indexed: bool = False  # labels are indices into class_names (ClassLabel), not names (folders)


# ---------------------------------------------------------------------------------------------- public API


def prepare_real(options: RealOptions, out: Path, seed: int, params_file: str = "params.yaml") -> dict[str, Any]:
    """Read the source, re-encode its images, split it and write `out` atomically. Returns the info written."""
    out = Path(out)
    _check_options(options, seed, params_file)
    source = _read_source(options, params_file)
    if not source.rows:
        raise BadInput(f"{options.source}: the source has no images" + (f" in split {options.split!r}" if options.split else ""))
    labels, class_names = _resolve_labels(source, options, params_file)
    source_id = options.source if options.source == "digits" else os.path.normpath(options.source)
    if options.split is not None:
        source_id = f"{source_id}[{options.split}]"

    # Split on labels alone, before any image is decoded: a class too small to split fails fast.
    train_idx, test_idx, dropped = _stratified_split(np.array(labels, dtype=np.int64), class_names, options, seed)
    rows, channels, sizes = [], Counter(), []
    for i, (raw, label) in enumerate(zip(source.rows, labels, strict=True)):
        png, n_channels, size = _to_png(raw)
        channels[n_channels] += 1
        sizes.append(size)
        image_sha = sha256_hex(png)
        rows.append(
            {
                "real_id": make_sample_id(
                    origin={"source": source_id, "row": i}, content={"image_sha256": image_sha, "label": label}
                ),
                "image": png,
                "label": label,
                "label_name": class_names[label],
                "caption": _caption(raw),
                "source_row": i,
                "_image_sha256": image_sha,
            }
        )

    tables = {"train": _table([rows[i] for i in train_idx]), "test": _table([rows[i] for i in test_idx])}
    info = {
        "source": options.source,
        "source_id": source_id,
        # Content only (image, class name, caption in source order): the same data gives the same digest.
        "source_digest": sha256_hex("\n".join(canonical_json([r["_image_sha256"], r["label_name"], r["caption"]]) for r in rows)),
        # Everything written, split by split: two folders with the same digest hold the same rows.
        "digest": _output_digest(tables),
        "class_names": class_names,
        "channels": max(channels, key=lambda c: (channels[c], c)),  # the majority; ties go to RGB
        "channels_seen": {str(c): n for c, n in sorted(channels.items())},
        "image_size": {
            "min": {"width": min(w for w, _ in sizes), "height": min(h for _, h in sizes)},
            "max": {"width": max(w for w, _ in sizes), "height": max(h for _, h in sizes)},
        },
        "counts": {"source": len(rows), "train": len(train_idx), "test": len(test_idx), "dropped_by_per_class": dropped},
        "per_class": {split: _class_counts(tables[split], class_names) for split in SPLITS},
        "seed": seed,
        "options": dataclasses.asdict(options),
    }
    _write_atomically(out, tables, info)
    return info


def read_real(path: Path, split: str) -> pa.Table:
    """One split ("train" or "test") of a folder written by prepare_real."""
    if split not in SPLITS:
        raise BadInput(f"{path}: unknown split {split!r} (have: {', '.join(SPLITS)})")
    file = Path(path) / f"{split}.parquet"
    if not file.is_file():
        raise BadInput(f"{file}: not found; is {path} a folder written by the real stage?")
    return pq.read_table(file)


def real_info(path: Path) -> dict[str, Any]:
    """The info.json of a folder written by prepare_real."""
    file = Path(path) / "info.json"
    if not file.is_file():
        raise BadInput(f"{file}: not found; is {path} a folder written by the real stage?")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"{file}: not valid JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------- options


def _check_options(options: RealOptions, seed: int, params_file: str) -> None:
    if not 0 <= options.test_fraction < 1:
        raise BadInput(f"{params_file}: real.test_fraction: must be at least 0 and below 1, got {options.test_fraction}")
    if options.per_class is not None and options.per_class < 1:
        raise BadInput(f"{params_file}: real.per_class: must be at least 1 (or null for all), got {options.per_class}")
    if options.class_names is not None:
        if not options.class_names:
            raise BadInput(f"{params_file}: real.class_names: empty list (give the names, or null to take them from the source)")
        repeated = sorted(n for n, c in Counter(options.class_names).items() if c > 1)
        if repeated:
            raise BadInput(f"{params_file}: real.class_names: repeated name(s) {repeated}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BadInput(f"{params_file}: seed: must be a non-negative integer, got {seed!r}")


# ---------------------------------------------------------------------------------------------- sources


def _read_source(options: RealOptions, params_file: str) -> _Source:
    if options.source == "digits":
        return _read_digits(options)
    path = Path(options.source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise BadInput(f"{path}: unsupported file type {path.suffix!r} (use a .parquet file, a folder, 'digits' or a HF id)")
        return _read_parquet([path], options)
    if path.is_dir():
        return _read_folder(path, options)
    looks_like_path = options.source.startswith((".", "/", "~")) or path.suffix.lower() == ".parquet"
    if looks_like_path or not _HUB_ID.match(options.source):
        raise BadInput(
            f"{params_file}: real.source: unknown source {options.source!r}: not 'digits', no such file or folder, "
            "and not a Hugging Face dataset id"
        )
    return _read_hub(options)


def _read_digits(options: RealOptions) -> _Source:
    """scikit-learn's bundled 8x8 digits (no download): 0..16 floats scaled to 0..255 grey."""
    from sklearn.datasets import load_digits

    if options.split is not None:
        raise BadInput(f"digits: has no splits; real.split {options.split!r} does not apply (set it to null)")
    if options.caption_column is not None:
        raise BadInput(f"digits: has no captions; real.caption_column {options.caption_column!r} does not apply")
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rows = [
        _RawRow(f"digits row {i}", encode_png(img), int(t)) for i, (img, t) in enumerate(zip(pixels, digits.target, strict=True))
    ]
    return _Source(rows, [str(d) for d in range(10)], names_are_indexed=True)


def _read_folder(path: Path, options: RealOptions) -> _Source:
    """A saved HF dataset, a folder of Parquet files (hub layout), or an image folder `root/<class>/*.png`."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises many types for a broken folder
            raise BadInput(f"{path}: not a readable saved Hugging Face dataset: {exc}") from None
        return _from_hf(loaded, str(path), options)
    parquet_files = sorted(p for p in path.rglob("*.parquet") if not _hidden(p, path))
    if parquet_files:
        if options.split is not None:
            # Hub layout: data/<split>-00000-of-00001.parquet or <split>/*.parquet; else the rows' `split` column.
            named = [p for p in parquet_files if _names_split(p.relative_to(path), options.split)]
            if named:
                return _read_parquet(named, options, filter_split=False)
        return _read_parquet(parquet_files, options)
    return _read_imagefolder(path, options)


def _hidden(file: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in file.relative_to(root).parts)


def _names_split(relative: Path, split: str) -> bool:
    return relative.name.startswith(f"{split}-") or relative.stem == split or split in relative.parts[:-1]


def _read_imagefolder(root: Path, options: RealOptions) -> _Source:
    """`root/<class_name>/*.png|jpg|...`, classes and files sorted; `root/<split>/<class_name>/...` with a split."""
    if options.split is not None:
        if not (root / options.split).is_dir():
            have = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            raise BadInput(f"{root}: no folder for split {options.split!r} (folders: {', '.join(have) or 'none'})")
        root = root / options.split
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    captions = _folder_captions(root, options.caption_column)
    rows: list[_RawRow] = []
    for class_dir in class_dirs:
        for file in sorted(class_dir.iterdir()):
            if file.is_file() and not file.name.startswith(".") and file.suffix.lower() in IMAGE_SUFFIXES:
                relative = file.relative_to(root).as_posix()
                rows.append(_RawRow(f"{file} (row {len(rows)})", str(file), class_dir.name, captions.get(relative)))
    if not rows:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        hint = ""
        if options.split is None and any(sub.is_dir() for d in class_dirs for sub in d.iterdir()):
            hint = f"; for a <split>/<class_name>/<file> layout set real.split to one of: {', '.join(d.name for d in class_dirs)}"
        raise BadInput(f"{root}: no images found: expected <class_name>/<file> with one of {suffixes}, or Parquet files{hint}")
    return _Source(rows, sorted({r.label for r in rows}))


def _folder_captions(root: Path, caption_column: str | None) -> dict[str, Any]:
    """Captions of an image folder from `metadata.jsonl` or `metadata.csv` (`file_name` + the caption column), as HF's."""
    if caption_column is None:
        return {}
    jsonl, csv_file = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        from synthforge.sources import read_jsonl

        records = [(f"{jsonl}:{lineno}", record) for lineno, record in read_jsonl(jsonl)]
    elif csv_file.is_file():
        import csv

        with csv_file.open(encoding="utf-8", newline="") as fh:
            records = [(f"{csv_file}:{i + 2}", record) for i, record in enumerate(csv.DictReader(fh))]
    else:
        raise BadInput(
            f"{root}: real.caption_column {caption_column!r} is set but the folder has no metadata.jsonl or metadata.csv"
        )
    captions = {}
    for where, record in records:
        if "file_name" not in record or caption_column not in record:
            raise BadInput(f"{where}: needs 'file_name' and {caption_column!r} (has: {', '.join(record)})")
        captions[Path(record["file_name"]).as_posix()] = record[caption_column]
    return captions


def _read_parquet(files: list[Path], options: RealOptions, filter_split: bool = True) -> _Source:
    """Parquet with an image column (bytes, a HF Image struct or a path) and a label column.

    Files written by `datasets` carry their features in the schema metadata: ClassLabel names come from there.
    With a split asked for (and `filter_split`), only rows whose `split` column holds it are read.
    """
    rows: list[_RawRow] = []
    class_names: list[str] | None = None
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except PARQUET_ERRORS as exc:
            raise BadInput(f"{file}: not a readable Parquet file: {exc}") from None
        schema = parquet.schema_arrow
        names = _hf_class_names(schema, options.label_column)
        if names is not None:
            if class_names is not None and names != class_names:
                raise BadInput(f"{file}: class names {names} differ from those of {files[0]} ({class_names})")
            class_names = names
        columns = _needed_columns(schema.names, options, str(file))
        filter_by_split = filter_split and options.split is not None
        if filter_by_split and "split" not in schema.names:
            raise BadInput(
                f"{file}: real.split {options.split!r} asked for, but no file is named for it and there is no 'split' column "
                f"(columns present: {', '.join(schema.names)})"
            )
        read = list(dict.fromkeys(columns + (["split"] if filter_by_split else [])))
        row_in_file = 0
        try:
            for batch in parquet.iter_batches(batch_size=1024, columns=read):
                for record in arrow_rows(batch, lambda i, file=file, first=row_in_file: f"{file} row {first + i}"):
                    if not filter_by_split or record["split"] == options.split:
                        rows.append(_raw(f"{file} row {row_in_file}", record, options, file.parent))
                    row_in_file += 1
        except PARQUET_ERRORS as exc:  # a damaged page: the footer read, the data does not
            raise BadInput(f"{file}: not a readable Parquet file: {exc}") from None
    return _Source(rows, class_names, names_are_indexed=class_names is not None)


def _hf_class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    metadata = (schema.metadata or {}).get(b"huggingface")
    if not metadata:
        return None
    try:
        feature = json.loads(metadata)["info"]["features"].get(label_column, {})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable metadata: fall back to the labels themselves
    return list(feature["names"]) if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None


def _read_hub(options: RealOptions) -> _Source:
    import datasets

    try:
        loaded = datasets.load_dataset(options.source, split=options.split)
    except Exception as exc:  # offline, unknown id, unknown split: datasets raises many types
        raise BadInput(
            f"{options.source}: no such file or folder, and loading it as a Hugging Face dataset id failed: {exc}"
        ) from None
    return _from_hf(loaded, options.source, options, split_chosen=True)


def _from_hf(loaded: Any, where: str, options: RealOptions, split_chosen: bool = False) -> _Source:
    """A datasets.Dataset or DatasetDict; a dict is read split by split (all of them when no split is asked)."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if options.split is not None and not split_chosen:
            if options.split not in loaded:
                raise BadInput(f"{where}: no split {options.split!r} (splits: {', '.join(loaded)})")
            parts = [(f"{where} split {options.split}", loaded[options.split])]
        else:
            parts = [(f"{where} split {name}", ds) for name, ds in loaded.items()]
    else:
        if options.split is not None and not split_chosen and "split" not in loaded.column_names:
            raise BadInput(
                f"{where}: the dataset has no splits and no 'split' column; real.split {options.split!r} does not apply"
            )
        parts = [(where, loaded)]

    rows: list[_RawRow] = []
    class_names: list[str] | None = None
    for part_where, ds in parts:
        columns = _needed_columns(ds.column_names, options, part_where)
        feature = ds.features[options.label_column]
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        if names is not None:
            if class_names is not None and names != class_names:
                raise BadInput(f"{part_where}: class names {names} differ from another split's ({class_names})")
            class_names = names
        filter_by_split = options.split is not None and not split_chosen and not isinstance(loaded, datasets.DatasetDict)
        selected = ds.select_columns(list(dict.fromkeys(columns + (["split"] if filter_by_split else []))))
        # Arrow format keeps a HF Image as its stored {"bytes", "path"}: nothing is decoded twice.
        for i, record in enumerate(_iter_records(selected.with_format("arrow"))):
            if not filter_by_split or record["split"] == options.split:
                rows.append(_raw(f"{part_where} row {i}", record, options, None))
    return _Source(rows, class_names, names_are_indexed=class_names is not None)


def _iter_records(ds: Any) -> Iterator[dict[str, Any]]:
    for batch in ds.iter(batch_size=1024):
        yield from batch.to_pylist()


def _needed_columns(present: list[str], options: RealOptions, where: str) -> list[str]:
    wanted = [options.image_column, options.label_column] + ([options.caption_column] if options.caption_column else [])
    missing = [c for c in wanted if c not in present]
    if missing:
        raise BadInput(f"{where}: missing column(s) {', '.join(map(repr, missing))} (columns present: {', '.join(present)})")
    return list(dict.fromkeys(wanted))


def _raw(where: str, record: dict[str, Any], options: RealOptions, base_dir: Path | None) -> _RawRow:
    caption = record.get(options.caption_column) if options.caption_column else None
    return _RawRow(where, record[options.image_column], record[options.label_column], caption, base_dir)


# ---------------------------------------------------------------------------------------------- labels


def _resolve_labels(source: _Source, options: RealOptions, params_file: str) -> tuple[list[int], list[str]]:
    """Each row's label as an index into the class list, and that list (the override, the source's, or derived)."""
    names = options.class_names or source.class_names
    if options.class_names and source.names_are_indexed and len(options.class_names) != len(source.class_names):
        raise BadInput(
            f"{params_file}: real.class_names: {len(options.class_names)} names given, "
            f"but the source has {len(source.class_names)} classes ({', '.join(source.class_names)})"
        )
    values = []
    for raw in source.rows:
        value = raw.label
        if isinstance(value, float) and value.is_integer():  # integer labels with nulls elsewhere come back as floats
            value = int(value)
        if value is None:
            raise BadInput(f"{raw.where}: label is missing (null)")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise BadInput(f"{raw.where}: label {value!r} is neither a class index nor a class name")
        values.append(value)
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        first_str = next(r for r, v in zip(source.rows, values, strict=True) if isinstance(v, str))
        raise BadInput(f"{first_str.where}: labels mix class indices and class names ({first_str.label!r})")

    if names is None:  # no class list anywhere: derive it from the labels
        if kinds == {str}:
            names = sorted(set(values))
        else:
            negative = next((r for r, v in zip(source.rows, values, strict=True) if v < 0), None)
            if negative is not None:
                raise BadInput(f"{negative.where}: label {negative.label} is negative; class indices start at 0")
            names = [str(i) for i in range(max(values) + 1)]
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for raw, value in zip(source.rows, values, strict=True):
        if isinstance(value, str):
            if value not in index:
                raise BadInput(f"{raw.where}: label {value!r} is not in the class list ({', '.join(names)})")
            labels.append(index[value])
        else:
            if not 0 <= value < len(names):
                raise BadInput(f"{raw.where}: label {value} is outside the class list (0..{len(names) - 1}: {', '.join(names)})")
            labels.append(value)
    return labels, list(names)


def _caption(raw: _RawRow) -> str | None:
    return None if raw.caption is None else str(raw.caption)


# ---------------------------------------------------------------------------------------------- images


def _to_png(raw: _RawRow) -> tuple[bytes, int, tuple[int, int]]:
    """The row's image as PNG bytes, its channel count (1 or 3) and its (width, height)."""
    from PIL import ImageOps

    data = _image_bytes(raw)
    try:
        img = decode_image(data)
    except ValueError as exc:
        raise BadInput(f"{raw.where}: {exc}") from None
    img = _grey_or_rgb(ImageOps.exif_transpose(img))  # camera JPEGs: pixels as shown, as HF datasets decodes them
    pixels = np.asarray(img, dtype=np.uint8)
    return encode_png(pixels), 1 if pixels.ndim == 2 else 3, img.size


def _image_bytes(raw: _RawRow) -> bytes:
    value = raw.image
    if isinstance(value, dict):  # a HF Image as stored: bytes, or a path to a file
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None:
        raise BadInput(f"{raw.where}: image is missing (null)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        file = Path(value)
        if not file.is_absolute() and raw.base_dir is not None:
            file = raw.base_dir / file
        try:
            return file.read_bytes()
        except OSError as exc:
            raise BadInput(f"{raw.where}: cannot read image file {file}: {exc.strerror or exc}") from None
    if hasattr(value, "save") and hasattr(value, "mode"):  # an already decoded PIL image
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise BadInput(f"{raw.where}: image is a {type(value).__name__}, expected image bytes, a HF Image or a file path")


def _grey_or_rgb(img: PILImage.Image) -> PILImage.Image:
    """Grey stays grey (8-bit); everything else becomes RGB, dropping alpha as torchvision's loader does."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("1", "LA", "La"):
        return img.convert("L")
    if img.mode.startswith("I"):  # 16/32-bit grey: PIL's convert would clip at 255, so scale the 16-bit range
        from PIL import Image

        wide = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8), mode="L")
    if img.mode == "F":
        return img.convert("L")
    if img.mode in ("P", "PA"):  # via RGBA so a transparent palette entry converts without a warning
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------- split and write


def _stratified_split(
    labels: np.ndarray, class_names: list[str], options: RealOptions, seed: int
) -> tuple[list[int], list[int], int]:
    """Row indices for train and test, and how many training rows per_class dropped.

    Each class is shuffled by its own generator (seed, class), so one class's rows never move another's.
    The test rows are taken first and per_class thins only the training rows: every per_class setting is
    scored on the same test set, and a smaller per_class keeps a subset of a larger one's training rows.
    """
    train, test, dropped = [], [], 0
    for label, name in enumerate(class_names):
        rows = np.random.default_rng([seed, label]).permutation(np.flatnonzero(labels == label))
        n_test = 0
        if options.test_fraction > 0:
            if len(rows) < 2:
                raise BadInput(
                    f"{options.source}: class {name!r} has {len(rows)} image(s); real.test_fraction={options.test_fraction} "
                    "needs at least 2 per class, one for test and one for train"
                )
            n_test = min(max(1, round(len(rows) * options.test_fraction)), len(rows) - 1)
        test += rows[:n_test].tolist()
        kept = rows[n_test:] if options.per_class is None else rows[n_test : n_test + options.per_class]
        dropped += len(rows) - n_test - len(kept)
        train += kept.tolist()
    return sorted(train), sorted(test), dropped  # source order: the files read like the source


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{name: row[name] for name in REAL_SCHEMA.names} for row in rows], schema=REAL_SCHEMA)


def _output_digest(tables: dict[str, pa.Table]) -> str:
    lines = []
    for split in SPLITS:
        columns = tables[split].select(["real_id", "label_name", "caption"]).to_pylist()
        lines += [canonical_json([split, r["real_id"], r["label_name"], r["caption"]]) for r in columns]
    return sha256_hex("\n".join(lines))


def _class_counts(table: pa.Table, class_names: list[str]) -> dict[str, int]:
    counts = Counter(table.column("label").to_pylist())
    return {name: counts.get(i, 0) for i, name in enumerate(class_names)}


def _write_atomically(out: Path, tables: dict[str, pa.Table], info: dict[str, Any]) -> None:
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            pq.write_table(tables[split], tmp / f"{split}.parquet", compression="zstd")
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
