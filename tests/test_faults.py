"""Faults in what users give synthforge, through the commands that read it.

A refused input gives exit code 2 and one line `error: ...` naming the place (file and line or row, sample id, key
path), and every file already written stays as it was. Odd but valid content (huge, empty, NUL, direction marks,
combining marks, emoji) is processed: each sample is kept, or rejected with a reason. Property-based tests check
that parsing params, provenance records, manifests, JSONL and images gives a result or BadInput, never another
exception.

tests/test_bad_input.py has the first cases (a params value of the wrong type, a broken source line, a missing
stage directory), tests/test_ingest.py and tests/test_real.py those of their library functions.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import cli, damage_page, read_rows, tree_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthforge.errors import BadInput

REPO = Path(__file__).resolve().parents[1]
# Derandomized: the same examples on every run, so a failure is reproducible and the suite never flakes.
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- projects and helpers ----------------------------------------------------------------------------------------


@pytest.fixture
def workdir(rules_project, tmp_path) -> Path:
    target = tmp_path / "proj"
    shutil.copytree(rules_project, target, ignore=shutil.ignore_patterns(".git", ".dvc"))
    return target


def refused(proc, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    message = proc.stderr.strip()
    assert "Traceback" not in message, message
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def refused_unchanged(root: Path, args: tuple[str, ...], *fragments: str) -> str:
    """Run the CLI in root: refused naming `fragments`, and nothing under root changed."""
    before = tree_digest(root)
    message = refused(cli(*args, cwd=root), *fragments)
    assert tree_digest(root) == before, f"{' '.join(args)} was refused but changed files"
    return message


def edit_params(root: Path, edit) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


def shard(root: Path, stage: str) -> Path:
    return root / "data" / stage / "samples" / "part-00000.parquet"


def rewrite(path: Path, edit) -> None:
    """Rewrite a Parquet file with its table changed by `edit`, as a careless script would."""
    pq.write_table(edit(pq.read_table(path)), path)


def set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def not_utf8(values: list[str], row: int) -> pa.Array:
    """A string array whose `row` holds Latin-1 bytes: Parquet stores it, readers only fail when they decode it."""
    raw = [v.encode() for v in values]
    raw[row] = "café, déjà vu".encode("latin-1")
    return pa.array(raw, pa.binary()).view(pa.string())


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def noise(seed: int, size: int = 8) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (size, size)))


def decompression_bomb(side: int = 30_000) -> bytes:
    """A valid PNG header claiming side x side pixels (900 M): Pillow refuses to decode it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _file(name: str, data: bytes):
    def write(root: Path) -> str:
        (root / name).write_bytes(data)
        return name

    return write


def _table(name: str, table: pa.Table):
    def write(root: Path) -> str:
        pq.write_table(table, root / name)
        return name

    return write


# -- damaged stage directories: judge, dedup, tag, split, publish -------------------------------------------------

COMMANDS = {
    "judge": ("judge", "--in", "data/generated", "--out", "data/judged"),
    "dedup": ("dedup", "--in", "data/judged", "--out", "data/deduped"),
    "tag": ("tag", "--in", "data/deduped", "--out", "data/tagged"),
    "split": ("split", "--in", "data/tagged", "--out", "data/split"),
}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _swap_first_id(table: pa.Table) -> pa.Table:
    ids = table.column("sample_id").to_pylist()
    return set_column(table, "sample_id", pa.array([ids[1], *ids[1:]]))


def _id_as_path(table: pa.Table) -> pa.Table:
    ids = table.column("sample_id").to_pylist()
    return set_column(table, "sample_id", pa.array(["../../outside", *ids[1:]]))


DAMAGED_STAGES = {
    "a sample shard cut in half": (
        lambda root: _truncate(shard(root, "deduped")),
        "tag",
        ["data/deduped/samples/part-00000.parquet: not a readable Parquet file"],
    ),
    "a sample shard of random bytes": (
        lambda root: shard(root, "tagged").write_bytes(np.random.default_rng(0).bytes(4096)),
        "split",
        ["data/tagged/samples/part-00000.parquet: not a readable Parquet file"],
    ),
    "a zero-byte sample shard": (
        lambda root: shard(root, "generated").write_bytes(b""),
        "judge",
        ["data/generated/samples/part-00000.parquet: not a readable Parquet file"],
    ),
    "a manifest cut in half": (
        lambda root: _truncate(root / "data" / "judged" / "manifest.parquet"),
        "dedup",
        ["data/judged/manifest.parquet: not a readable Parquet file"],
    ),
    "a damaged data page": (
        lambda root: damage_page(shard(root, "judged"), "prompt"),
        "dedup",
        ["data/judged/samples/part-00000.parquet: rows 0 to", "are damaged"],
    ),
    "a stage.json that is not a fingerprint": (
        lambda root: (root / "data" / "deduped" / "stage.json").write_text("[1, 2]\n"),
        "tag",
        ["data/deduped/stage.json: not a stage fingerprint"],
    ),
    "no provenance column": (
        lambda root: rewrite(shard(root, "tagged"), lambda t: t.drop_columns(["provenance"])),
        "split",
        ["data/tagged/samples/part-00000.parquet: column 'provenance' is missing"],
    ),
    "a text column of numbers (dedup)": (
        lambda root: rewrite(shard(root, "judged"), lambda t: set_column(t, "prompt", pa.array(range(t.num_rows)))),
        "dedup",
        ["params.yaml: dedup.fields: column 'prompt' in data/judged holds int64, not text"],
    ),
    "a text column of numbers (judge)": (
        lambda root: rewrite(shard(root, "generated"), lambda t: set_column(t, "prompt", pa.array(range(t.num_rows)))),
        "judge",
        ["params.yaml: judge.checks[2].field: column 'prompt' in data/generated holds int64, not text"],
    ),
    "text that is not UTF-8": (
        lambda root: rewrite(
            shard(root, "generated"), lambda t: set_column(t, "prompt", not_utf8(t.column("prompt").to_pylist(), 3))
        ),
        "judge",
        ["data/generated/samples/part-00000.parquet: row 3: column 'prompt' is not UTF-8 text"],
    ),
    "a sample id that is a path": (
        lambda root: rewrite(shard(root, "tagged"), _id_as_path),
        "split",
        ["data/tagged/samples/part-00000.parquet: row 0: '../../outside' is not a sample id"],
    ),
    "a sample id swapped for another's": (
        lambda root: rewrite(shard(root, "deduped"), _swap_first_id),
        "tag",
        ["data/deduped/samples/part-00000.parquet: row 0: sample_id", "differs from provenance.sample_id"],
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED_STAGES))
def test_a_damaged_stage_directory_is_refused_naming_the_file(workdir, case):
    damage, command, fragments = DAMAGED_STAGES[case]
    damage(workdir)
    refused_unchanged(workdir, COMMANDS[command], *fragments)


def test_publish_refuses_a_damaged_split_stage_and_a_split_named_like_a_path(workdir):
    registry = workdir / "registry"
    split_shard = shard(workdir, "split")
    good = split_shard.read_bytes()
    damage_page(split_shard, "prompt")
    refused_unchanged(workdir, ("publish", "--name", "evalset"), "data/split/samples/part-00000.parquet: rows 0 to")

    # The split names the version's data files ({split}-00000-of-00001.parquet): a path there would write outside.
    split_shard.write_bytes(good)
    rows = pq.read_table(split_shard)
    provenance = rows.column("provenance").to_pylist()
    provenance[0]["split"] = "../../../escaped"
    rewrite(split_shard, lambda t: set_column(t, "provenance", pa.array(provenance, t.schema.field("provenance").type)))
    outside = workdir.parent
    before = sorted(outside.rglob("*"))
    refused_unchanged(workdir, ("publish", "--name", "evalset"), "has split '../../../escaped'", "letters, digits and '_'")
    assert sorted(outside.rglob("*")) == before and not registry.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--name", "../outside"), "dataset name '../outside' may hold only letters, digits"),
        (("--name", "evalset", "--version", "../1.0.0"), "version '../1.0.0' is not semantic"),
        (("--to", "hf://acme/../../outside"), "a Hub dataset is named hf://ORG/NAME"),
        (("--registry", "reg", "--name", "a/b"), "dataset name 'a/b' may hold only letters, digits"),
    ],
)
def test_publish_refuses_names_and_versions_that_are_paths(workdir, args, fragment):
    before = sorted(workdir.parent.rglob("*"))
    refused_unchanged(workdir, ("publish", *args), fragment)
    assert sorted(workdir.parent.rglob("*")) == before


def test_listing_versions_names_a_tag_that_synthforge_did_not_publish(tmp_path, hub_server):
    """A registry repository or a Hub dataset with semver tags of its own: each is named, nothing crashes."""
    from hub_server import hub_env, use_hub

    from synthforge.gitutil import git

    repo = tmp_path / "registry" / "foreign.git"
    git("init", "--bare", "--quiet", "--initial-branch=main", str(repo))
    work = tmp_path / "foreign"
    work.mkdir()
    (work / "README.md").write_text("someone else's dataset\n")
    (work / "synthforge.json").write_text('{"counts": "many"}\n')
    env = {"GIT_INDEX_FILE": str(tmp_path / "index"), "GIT_WORK_TREE": str(work)}
    git("--git-dir", str(repo), "add", "-A", ".", cwd=work, env=env)
    commit = git("--git-dir", str(repo), "commit-tree", git("--git-dir", str(repo), "write-tree", env=env), "-m", "theirs")
    git("--git-dir", str(repo), "update-ref", "refs/heads/main", commit)
    git("--git-dir", str(repo), "tag", "v1.0.0", commit)  # a lightweight tag
    refused_unchanged(tmp_path, ("versions", "foreign", "--registry", "registry"), "foreign v1.0.0 in registry", "not a version")
    git("--git-dir", str(repo), "tag", "-d", "v1.0.0")
    git("--git-dir", str(repo), "tag", "-a", "v2.0.0", "-m", "theirs", commit)
    refused_unchanged(tmp_path, ("versions", "foreign", "--registry", "registry"), "foreign v2.0.0 in registry", "not a version")

    with use_hub(hub_server, tmp_path / "hf"):
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo("acme/foreign", repo_type="dataset")
        api.upload_file(path_or_fileobj=b"theirs\n", path_in_repo="README.md", repo_id="acme/foreign", repo_type="dataset")
        api.create_tag("acme/foreign", tag="v1.0.0", repo_type="dataset")
    before = hub_server.files("acme/foreign")
    done = cli("versions", "hf://acme/foreign", cwd=tmp_path, env=hub_env(hub_server, tmp_path / "hf"))
    refused(done, "hf://acme/foreign v1.0.0: not a version synthforge published")
    assert hub_server.files("acme/foreign") == before


# -- image stage directories: damaged images are rejected with a reason, or named ----------------------------------

IMAGES = {
    "good": noise(0),
    "corrupt": b"\x89PNG\r\n\x1a\n" + b"not the rest of a PNG" * 3,
    "zero bytes": b"",
    "truncated": noise(1, size=64)[:80],
    "decompression bomb": decompression_bomb(),
    "text": "an image? no: 🙂".encode(),
}


def image_stage(out: Path, images: dict[str, bytes]) -> dict[str, str]:
    """A generate-like stage directory of image samples, one per entry; returns name -> sample id."""
    from synthforge.provenance import make_sample_id, new_record, sha256_hex
    from synthforge.stagedir import StageWriter, stage_fingerprint
    from synthforge.vision.images import IMAGE_CONTENT_SCHEMA

    rows, ids = [], {}
    for i, (name, data) in enumerate(images.items()):
        sid = ids[name] = make_sample_id({"case": name}, {"image_sha256": sha256_hex(data)})
        prov = new_record(
            sample_id=sid, run_id="faults", source={"uri": "faults", "row": i}, method="unet", model="m", batch_id="b"
        )
        rows.append(
            {"sample_id": sid, "image": data, "label": i % 2, "label_name": str(i % 2), "caption": None, "provenance": prov}
        )
    with StageWriter(out, "generate", IMAGE_CONTENT_SCHEMA, stage_fingerprint("generate", {"case": "faults"}, {})) as writer:
        writer.write(rows)
    return ids


@pytest.fixture
def image_project(tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "images"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["judge"] = {"checks": [{"name": "image_format", "min_size": 4, "min_std": 1.0}]}
    params["dedup"] = {"image": {"hash": "phash", "hash_size": 8, "max_distance": 2, "against_real": None}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root, image_stage(root / "data" / "generated", IMAGES)


def test_damaged_images_in_a_stage_are_rejected_by_the_judge_with_their_reason(image_project):
    root, ids = image_project
    done = cli("judge", "--in", "data/generated", "--out", "data/judged", cwd=root)
    assert done.returncode == 0, done.stderr
    assert [r["sample_id"] for r in read_rows(root / "data" / "judged")] == [ids["good"]]
    reasons = {r["sample_id"]: r["reason"] for r in read_rows(root / "data" / "judged", "rejected")}
    assert "empty image (0 bytes)" in reasons[ids["zero bytes"]]
    assert "image too large to decode" in reasons[ids["decompression bomb"]]
    for name in ("corrupt", "truncated", "text"):
        assert "not a readable image" in reasons[ids[name]], (name, reasons[ids[name]])


def test_dedup_of_images_it_cannot_decode_names_the_sample(image_project):
    root, ids = image_project
    refused_unchanged(root, ("dedup", "--in", "data/generated", "--out", "data/deduped"), ids["corrupt"], "not a readable image")


# -- synthforge real: image folders and Parquet files -------------------------------------------------------------


@pytest.fixture
def real_project(tmp_path) -> Path:
    """A project whose data/real was written from a good image folder; tests point real.source elsewhere."""
    root = tmp_path / "real"
    for c, name in enumerate(("cat", "dog")):
        (root / "images" / name).mkdir(parents=True)
        for i in range(3):
            (root / "images" / name / f"{i}.png").write_bytes(noise(10 * c + i))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["real"] = {"source": "images", "test_fraction": 0.34}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = cli("real", "--out", "data/real", cwd=root)
    assert done.returncode == 0, done.stderr
    return root


def _folder_with(root: Path, name: str, data: bytes) -> str:
    folder = root / "bad_images"
    shutil.copytree(root / "images", folder)
    (folder / "dog" / name).write_bytes(data)
    return "bad_images"


def _parquet_with(root: Path, **columns) -> str:
    table = {"image": [noise(i) for i in range(6)], "label": [0, 1] * 3, **columns}
    pq.write_table(pa.table(table), root / "source.parquet")
    return "source.parquet"


def _cut_parquet(root: Path) -> str:
    source = root / _parquet_with(root)
    _truncate(source)
    return "source.parquet"


REAL_SOURCES = {
    "a corrupt image file": (
        lambda r: _folder_with(r, "bad.png", IMAGES["corrupt"]),
        "bad_images/dog/bad.png",
        "not a readable image",
    ),
    "a zero-byte image file": (lambda r: _folder_with(r, "empty.png", b""), "bad_images/dog/empty.png", "empty image (0 bytes)"),
    "a truncated image file": (lambda r: _folder_with(r, "cut.png", IMAGES["truncated"]), "dog/cut.png", "not a readable image"),
    "a decompression bomb": (lambda r: _folder_with(r, "bomb.png", IMAGES["decompression bomb"]), "dog/bomb.png", "too large"),
    "a Parquet file cut in half": (_cut_parquet, "source.parquet", "not a readable Parquet file"),
    "a Parquet file of random bytes": (
        _file("source.parquet", np.random.default_rng(1).bytes(2048)),
        "source.parquet",
        "not a readable Parquet file",
    ),
    "image column of numbers": (lambda r: _parquet_with(r, image=list(range(6))), "source.parquet row 0", "image is a int"),
    "a zero-byte image row": (
        lambda r: _parquet_with(r, image=[noise(i) for i in range(5)] + [b""]),
        "source.parquet row 5",
        "empty image (0 bytes)",
    ),
    "label column of lists": (lambda r: _parquet_with(r, label=[[0], [1]] * 3), "source.parquet row 0", "label [0] is neither"),
    "labels that are not UTF-8": (
        lambda r: _parquet_with(r, label=not_utf8(["cat", "dog"] * 3, 3)),
        "source.parquet row 3",
        "column 'label' is not UTF-8 text",
    ),
}


@pytest.mark.parametrize("case", list(REAL_SOURCES))
def test_real_refuses_damaged_images_and_parquet_naming_the_file_and_row(real_project, case):
    make_source, where, what = REAL_SOURCES[case]
    source = make_source(real_project)
    edit_params(real_project, lambda p: p["real"].update(source=source))
    refused_unchanged(real_project, ("real", "--out", "data/real"), where, what)


# -- ingest: files made elsewhere ---------------------------------------------------------------------------------

GOOD_ROWS = [{"prompt": f"Where is order {i}? It was due last week and nothing came.", "label": "shipping"} for i in range(4)]


def jsonl_lines(rows: list[dict]) -> list[bytes]:
    return [json.dumps(r).encode() for r in rows]


@pytest.fixture
def ingested(tmp_path) -> Path:
    """tmp_path with data/ingested written from a good file: refused imports must leave it as it was."""
    (tmp_path / "good.jsonl").write_bytes(b"\n".join(jsonl_lines(GOOD_ROWS)) + b"\n")
    done = cli("ingest", "good.jsonl", "--out", "data/ingested", "--text-field", "prompt", "--label-field", "label", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path


def _cut_in_half(name: str):
    def write(root: Path) -> str:
        pq.write_table(pa.Table.from_pylist(GOOD_ROWS * 50), root / name)
        _truncate(root / name)
        return name

    return write


LINES = jsonl_lines(GOOD_ROWS)
BAD_IMPORTS = {
    "JSONL line not UTF-8": (
        _file("x.jsonl", b"\n".join([LINES[0], '{"prompt": "café"}'.encode("latin-1")])),
        (),
        "x.jsonl:2: not UTF-8",
    ),
    "JSONL lone surrogate": (
        _file("x.jsonl", b"\n".join([*LINES[:2], b'{"prompt": "half an emoji \\ud83d here, long enough to pass"}'])),
        (),
        "x.jsonl:3: not valid Unicode text: a lone surrogate \\ud83d",
    ),
    "JSONL line that is not an object": (
        _file("x.jsonl", b"\n".join([LINES[0], b'["a", "list"]'])),
        (),
        "x.jsonl:2: expected a JSON object",
    ),
    "JSONL cut off mid-record": (_file("x.jsonl", b"\n".join(LINES)[:-20]), (), "x.jsonl:4: invalid JSON"),
    "CSV not UTF-8": (_file("x.csv", "prompt\nfine\ncafé crème\n".encode("latin-1")), (), "x.csv:3: not UTF-8 text"),
    "Parquet cut in half": (_cut_in_half("x.parquet"), (), "x.parquet: not a readable Parquet file"),
    "Parquet of random bytes": (
        _file("x.parquet", np.random.default_rng(2).bytes(3000)),
        (),
        "x.parquet: not a readable Parquet file",
    ),
    "zero-byte Parquet": (_file("x.parquet", b""), (), "x.parquet: not a readable Parquet file"),
    "Parquet text not UTF-8": (
        _table("x.parquet", pa.table({"prompt": not_utf8([r["prompt"] for r in GOOD_ROWS], 2)})),
        (),
        "x.parquet: row 3: column 'prompt' is not UTF-8 text",
    ),
    "label of lists": (
        _table("x.parquet", pa.table({"prompt": ["a", "b"], "label": [["x"], ["y"]]})),
        ("--label-field", "label"),
        "x.parquet: row 1: field 'label' must be a class name or an integer class index, got list",
    ),
    "label of floats": (
        _file("x.jsonl", b'{"prompt": "a", "label": 1.5}\n'),
        ("--label-field", "label"),
        "x.jsonl:1: field 'label' must be a class name or an integer class index, got float 1.5",
    ),
    "label of booleans": (
        _file("x.jsonl", b'{"prompt": "a", "label": true}\n'),
        ("--label-field", "label"),
        "got bool True",
    ),
    "text field named provenance": (
        _file("x.jsonl", b'{"provenance": "a text column named provenance"}\n'),
        ("--text-field", "provenance"),
        "--text-field provenance: every stage directory has its own 'provenance' column",
    ),
    "label field named sample_id": (
        _file("x.jsonl", b'{"prompt": "a", "sample_id": "../../x"}\n'),
        ("--label-field", "sample_id"),
        "--label-field sample_id: every stage directory has its own 'sample_id' column",
    ),
    "text field label with a label field": (
        _file("x.jsonl", b'{"label": "a", "class": "b"}\n'),
        ("--text-field", "label", "--label-field", "class"),
        "--text-field label: the label column is written as `label`",
    ),
}


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_ingest_refuses_damaged_files_naming_the_line_or_row(ingested, case):
    make, extra, fragment = BAD_IMPORTS[case]
    name = make(ingested)
    fields = () if "--text-field" in extra else ("--text-field", "prompt")
    refused_unchanged(ingested, ("ingest", name, "--out", "data/ingested", *fields, *extra), fragment)


def test_an_integer_label_is_a_class_index_written_as_text(tmp_path):
    pq.write_table(pa.table({"prompt": ["first", "second"], "label": [0, 3]}), tmp_path / "x.parquet")
    done = cli("ingest", "x.parquet", "--out", "out", "--text-field", "prompt", "--label-field", "label", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [r["label"] for r in read_rows(tmp_path / "out")] == ["0", "3"]


# -- odd but valid text: kept exactly, or rejected with a reason, through every stage and a published version --------

ODD_TEXTS = {
    "nul": "A NUL\x00inside: where is order 1234? It was due last week.",
    "bidi": "Refund \u202eCBA-1234\u202c please, my card was charged twice \u200fاسترداد\u200f.",
    "combining": "Cafe\u0301 au lait, Zo\u0308e, n\u0303 and a\u0336 struck letter: charged 42 EUR twice.",
    "emoji": "Order 5678 🙂 arrived broken 📦💥; family 👩‍👩‍👧‍👦 and flag 🇺🇦 sequences too.",
    "invisible": "Zero\u200bwidth space, joiner\u200d, BOM\ufeff and soft\u00adhyphen in one message.",
    "astral": "CJK extension B 𠀀𠀁 and maths 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 letters: where is my parcel 9012?",
    "control": "Bell\x07, escape\x1b[31m red\x1b[0m, and form\x0cfeed in a customer message.",
    "crlf": "Line one\r\nline two\rline three\u2028line four\u2029the end of a long enough message.",
}


def test_odd_unicode_is_kept_byte_for_byte_from_ingest_to_a_loaded_version(tmp_path):
    """NUL, direction overrides, combining marks, emoji sequences, invisible and astral characters: valid text, kept
    exactly through every stage and publishing. Empty and huge (5 MB) texts are rejected by the length check, saying
    why."""
    import synthforge

    huge = "Where is my order? " * (5_000_000 // 19)
    rows = [{"prompt": text, "label": "ab"[i % 2]} for i, text in enumerate(ODD_TEXTS.values())]
    rows += [{"prompt": "", "label": "a"}, {"prompt": huge, "label": "b"}]
    (tmp_path / "odd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["judge"] = {"checks": [{"name": "length", "field": "prompt", "min_chars": 40, "max_chars": 4000}]}
    params["dedup"] = {"fields": ["prompt"], "exact": True, "near": {"threshold": 0.8, "num_perm": 64, "ngram": 3}}
    params["tag"] = {"field": "prompt"}
    params["split"] = {"ratios": {"train": 0.5, "test": 0.5}, "group_by": "sample", "stratify_by": "label"}
    params["publish"] = {"name": "odd", "registry": "registry"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    steps = [
        ("ingest", "odd.jsonl", "--out", "data/ingested", "--text-field", "prompt", "--label-field", "label"),
        ("judge", "--in", "data/ingested", "--out", "data/judged"),
        ("dedup", "--in", "data/judged", "--out", "data/deduped"),
        ("tag", "--in", "data/deduped", "--out", "data/tagged"),
        ("split", "--in", "data/tagged", "--out", "data/split"),
        ("publish", "--version", "1.0.0"),
    ]
    for step in steps:
        done = cli(*step, cwd=tmp_path)
        assert done.returncode == 0, (step, done.stderr)

    ingested = {r["provenance"]["source"]["row"]: r for r in read_rows(tmp_path / "data" / "ingested")}
    assert [ingested[i]["prompt"] for i in range(len(rows))] == [r["prompt"] for r in rows]
    rejected = {r["sample_id"]: r["reason"] for r in read_rows(tmp_path / "data" / "judged", "rejected")}
    empty, too_long = ingested[len(ODD_TEXTS)]["sample_id"], ingested[len(ODD_TEXTS) + 1]["sample_id"]
    assert set(rejected) == {empty, too_long}
    assert "prompt has 0 characters, fewer than min_chars=40" in rejected[empty]
    assert f"prompt has {len(huge)} characters, more than max_chars=4000" in rejected[too_long]
    loaded = synthforge.load("odd", "1.0.0", registry=tmp_path / "registry")
    assert sorted(t for split in loaded.values() for t in split["prompt"]) == sorted(ODD_TEXTS.values())


# -- params: keys, types, YAML that JSON Schema cannot see, missing models --------------------------------------------


def _append(text: str):
    return lambda root: (root / "params.yaml").write_text((root / "params.yaml").read_text() + text)


BAD_PARAMS = {
    "a key that is not a string": (
        lambda root: edit_params(root, lambda p: p["split"]["ratios"].update({1: 0.2})),
        "params.yaml: split.ratios: key 1 is not a string (quote it)",
    ),
    "a date as a key": (
        _append("2024-01-01: new year\n"),
        "params.yaml: (top level): key datetime.date(2024, 1, 1) is not a string",
    ),
    "not UTF-8": (
        lambda root: (root / "params.yaml").write_bytes((root / "params.yaml").read_bytes() + "# café\n".encode("latin-1")),
        "not UTF-8 text",
    ),
    "a recursive alias": (
        _append("extra: &loop [1, *loop]\n"),
        "params.yaml: extra[1]: refers to itself (a recursive YAML alias)",
    ),
    "nested too deeply": (_append("extra: " + "[" * 3000 + "]" * 3000 + "\n"), "params.yaml: nested too deeply"),
    "an unknown top-level section": (_append("judgement: {}\n"), "params.yaml: (top level): unknown key 'judgement'"),
    "a section that is a list": (
        lambda root: edit_params(root, lambda p: p.update(dedup=["prompt"])),
        "params.yaml: dedup: ['prompt'] is not of type 'object'",
    ),
    "a number of the wrong type in a mapping": (
        lambda root: edit_params(root, lambda p: p["split"]["ratios"].update(train="most")),
        "params.yaml: split.ratios.train: 'most' is not of type 'number'",
    ),
    "an unknown key in a nested section": (
        lambda root: edit_params(root, lambda p: p["dedup"]["near"].update(treshold=0.5)),
        "params.yaml: dedup.near: unknown key 'treshold'",
    ),
    "an empty file": (lambda root: (root / "params.yaml").write_text(""), "params.yaml: expected a mapping of sections"),
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_a_bad_params_file_is_refused_naming_the_key(workdir, case):
    edit, fragment = BAD_PARAMS[case]
    edit(workdir)
    refused_unchanged(workdir, COMMANDS["split"], fragment)


def _add_llm_method(params: dict) -> None:
    model = {"backend": "transformers", "model": "./models/missing-llm"}
    params["generate"]["methods"].append({"name": "paraphrase", "rate": 0.1, "model": model})


def _add_llm_judge(path: str):
    def edit(params: dict) -> None:
        model = {"backend": "transformers", "model": path}
        params["judge"]["checks"].append({"name": "llm_judge", "rubric": "rubrics/quality.yaml", "min_score": 3, "model": model})

    return edit


MISSING_MODELS = {
    "generator LLM": (
        _add_llm_method,
        "generate",
        "params.yaml: generate.methods[2].model.model: ./models/missing-llm: no such directory",
    ),
    "judge LLM": (
        _add_llm_judge("./models/missing-judge"),
        "judge",
        "params.yaml: judge.checks[5].model.model: ./models/missing-judge: no such directory",
    ),
    "embedding model": (
        lambda p: p["dedup"].update(semantic={"threshold": 0.9, "model": "./models/missing-encoder"}),
        "dedup",
        "params.yaml: dedup.semantic: model: ./models/missing-encoder: no such directory",
    ),
    "classifier folder": (
        lambda p: p.update(tag={"classifier": "models/missing-classifier"}),
        "tag",
        "models/missing-classifier: not a trained classifier",
    ),
    "a folder that is not a model": (
        _add_llm_judge("./prompts"),
        "judge",
        "judge.checks[5].model.model: ./prompts: not a transformers model directory (no config.json)",
    ),
}


@pytest.mark.parametrize("case", list(MISSING_MODELS))
def test_a_missing_model_is_refused_before_anything_is_written(workdir, case):
    edit, command, fragment = MISSING_MODELS[case]
    edit_params(workdir, edit)
    args = ("generate", "--out", "data/generated") if command == "generate" else COMMANDS[command]
    refused_unchanged(workdir, args, fragment)


# -- generate: bad sources ----------------------------------------------------------------------------------------


def _source_line(line: bytes):
    def damage(root: Path) -> None:
        path = root / "sources" / "customer_requests.jsonl"
        lines = path.read_bytes().splitlines()
        lines[2] = line
        path.write_bytes(b"\n".join(lines) + b"\n")

    return damage


BAD_SOURCES = {
    "a line that is not UTF-8": (
        _source_line('{"id": "caf-latin1", "entity": "Café Crème"}'.encode("latin-1")),
        "customer_requests.jsonl:3: not UTF-8 text",
    ),
    "a lone surrogate": (
        _source_line(b'{"id": "half-emoji", "entity": "Acme \\udc00 Ltd"}'),
        "customer_requests.jsonl:3: not valid Unicode text: a lone surrogate \\udc00",
    ),
    "a line that is not an object": (
        _source_line(b'["acme", "bank"]'),
        "customer_requests.jsonl:3: expected a JSON object, got list",
    ),
    "a template that is not Jinja": (
        lambda root: (root / "prompts" / "refund_request.yaml").write_text(
            (root / "prompts" / "refund_request.yaml").read_text().replace("{{", "{% if %}{{", 1)
        ),
        "prompts/refund_request.yaml",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_generate_refuses_bad_sources_naming_file_and_line(workdir, case):
    damage, fragment = BAD_SOURCES[case]
    damage(workdir)
    refused_unchanged(workdir, ("generate", "--out", "data/generated"), fragment)


# -- review: ids that are not sample ids, a damaged manifest, texts too long for a spreadsheet ---------------------


def test_review_import_refuses_ids_that_are_not_sample_ids(workdir):
    sid = read_rows(workdir / "data" / "tagged")[0]["sample_id"]
    rows = [f"{sid},pass,", "../../etc/passwd,fail,a path", ",pass,", "0123456789ABCDEF,fail,upper case"]
    (workdir / "filled.csv").write_text("sample_id,verdict,notes\n" + "\n".join(rows) + "\n")
    before = tree_digest(workdir)
    done = cli("review", "import", "filled.csv", "--reviewer", "eve", cwd=workdir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "3 invalid row(s), nothing recorded" in done.stderr
    assert "filled.csv: row 3: '../../etc/passwd' is not a sample id" in done.stderr
    assert "filled.csv: row 5: '0123456789ABCDEF' is not a sample id" in done.stderr
    assert tree_digest(workdir) == before


def test_review_import_refuses_a_damaged_manifest(workdir):
    sid = read_rows(workdir / "data" / "tagged")[0]["sample_id"]
    (workdir / "filled.csv").write_text(f"sample_id,verdict,notes\n{sid},pass,\n")
    _truncate(workdir / "data" / "tagged" / "manifest.parquet")
    args = ("review", "import", "filled.csv", "--reviewer", "eve", "--in", "data/tagged")
    refused_unchanged(workdir, args, "data/tagged/manifest.parquet: not a readable Parquet file")


def test_a_huge_text_is_cut_in_the_review_file_and_the_verdict_still_imports(tmp_path):
    from synthforge.text.review import MAX_CELL

    huge = "The parcel never came. " * (5_000_000 // 23)
    (tmp_path / "x.jsonl").write_text(json.dumps({"prompt": huge}) + "\n")
    assert cli("ingest", "x.jsonl", "--out", "data/ingested", "--text-field", "prompt", cwd=tmp_path).returncode == 0
    done = cli("review", "export", "--in", "data/ingested", "--out", "review.csv", "--reviewer-fields", "prompt", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "review.csv").read_bytes().decode()
    assert len(text) < 2 * MAX_CELL and f"[... {len(huge) - MAX_CELL:,} more characters not shown]" in text
    (tmp_path / "review.csv").write_bytes(text.replace(",,,\r\n", ",pass,,too long to read\r\n").encode())
    done = cli("review", "import", "review.csv", "--reviewer", "eve", "--in", "data/ingested", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "recorded 1 verdicts" in done.stdout
    assert read_rows(tmp_path / "data" / "ingested")[0]["prompt"] == huge  # the data keeps every character


# -- property-based: parsing gives a result or BadInput, never another exception -----------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.dates()
    | st.sampled_from(["", "train", "prompt", "models/classifier", "1.0.0", "../x", "~", "{{ x }}"])
)
KEYS = (
    st.text(max_size=12) | st.integers(-3, 3) | st.none() | st.booleans() | st.sampled_from(["seed", "judge", "checks", "name"])
)
YAML_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=20
)


def _text_eval_params() -> dict:
    return yaml.safe_load((REPO / "pipelines" / "text-eval" / "params.yaml").read_text())


def _key_paths(value, prefix=()) -> list[tuple]:
    paths = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            paths += _key_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            paths += _key_paths(v, (*prefix, i))
    return paths


def _load(tmp_path: Path, document) -> dict:
    from synthforge.params import load_params

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(document))  # ASCII with escapes: YAML reads a raw U+0085 as a line break
    return load_params(path)


@PROPERTY
@given(document=YAML_VALUES)
def test_any_yaml_document_is_params_or_bad_input(tmp_path, document):
    try:
        params = _load(tmp_path, document)
    except BadInput as exc:
        assert str(exc).startswith(str(tmp_path / "params.yaml"))
    else:
        assert isinstance(params, dict)


@PROPERTY
@given(data=st.data(), value=YAML_VALUES, new_key=st.booleans())
def test_params_with_one_value_changed_are_valid_or_refused_naming_the_section(tmp_path, data, value, new_key):
    params = _text_eval_params()
    where = data.draw(st.sampled_from([p for p in _key_paths(params) if p]))
    parent = params
    for part in where[:-1]:
        parent = parent[part]
    if new_key and isinstance(parent, dict):
        where = (*where[:-1], f"unexpected_{where[-1]}")
    parent[where[-1]] = value
    try:
        loaded = _load(tmp_path, params)
    except BadInput as exc:
        message = str(exc)
        assert f": {where[0]}" in message or "(top level)" in message, message
    else:  # what was valid comes back as written (compared as YAML: NaN is not equal to itself)
        assert yaml.safe_dump({k: v for k, v in loaded.items() if k != "__file__"}) == yaml.safe_dump(params)


def _options_classes() -> dict[str, type]:
    from synthforge.stages.judge import LengthOptions
    from synthforge.vision.classifier import ClassifierOptions
    from synthforge.vision.real import RealOptions
    from synthforge.vision.unet import UNetOptions

    return {"judge.checks[0]": LengthOptions, "real": RealOptions, "classifier": ClassifierOptions, "generator.unet": UNetOptions}


@PROPERTY
@given(raw=st.dictionaries(KEYS, YAML_VALUES, max_size=5), where=st.sampled_from(list(_options_classes())))
def test_method_options_are_built_or_refused_naming_the_key(raw, where):
    from synthforge.params import parse_options

    options_cls = _options_classes()[where]
    try:
        options = parse_options(options_cls, raw, where, "params.yaml")
    except BadInput as exc:
        assert where in str(exc), str(exc)
    else:
        assert isinstance(options, options_cls)


def _record() -> dict:
    from synthforge.provenance import new_record

    record = new_record(
        sample_id="0123456789abcdef01234567",
        run_id="run",
        source={"uri": "sources/x.jsonl", "record_id": "r1", "row": 3},
        method="template",
        model="jinja2",
        batch_id="batch-1",
        seed=7,
        prompt_hash="0" * 64,
        parent_ids=["fedcba9876543210"],
    )
    record["judge"] = {
        "verdict": "pass",
        "checks": [{"name": "length", "verdict": "pass", "score": 52.0, "reason": None, "raw_output": None, "parsed": True}],
    }
    record["tags"], record["difficulty"], record["split"] = ["method:template"], "easy", "train"
    return record


@PROPERTY
@given(data=st.data(), value=YAML_VALUES)
def test_a_provenance_record_with_one_value_changed_is_valid_or_refused_naming_the_field(data, value):
    from synthforge.provenance import _validator, validate_record

    record = _record()
    validate_record(_record(), "manifest.parquet row 0")  # the unchanged record is valid
    where = data.draw(st.sampled_from([p for p in _key_paths(record) if p]))
    parent = record
    for part in where[:-1]:
        parent = parent[part]
    parent[where[-1]] = value
    refused_by_jsonschema = any(_validator().iter_errors(record))  # the reference implementation of the schema
    try:
        validate_record(record, "manifest.parquet row 0")
    except BadInput as exc:
        assert str(exc).startswith("manifest.parquet row 0: provenance."), str(exc)
    else:
        assert not refused_by_jsonschema, f"the compiled check passed what jsonschema refuses: {where} = {value!r}"


@pytest.fixture(scope="module")
def manifest_bytes(rules_project) -> bytes:
    return (rules_project / "data" / "tagged" / "manifest.parquet").read_bytes()


FLIPS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6)


def damaged(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    """`data` without its last `cut` bytes and with some bytes overwritten."""
    out = bytearray(data[: max(0, len(data) - cut)])
    for at, byte in flips:
        if out:
            out[at % len(out)] = byte
    return bytes(out)


@PROPERTY
@given(cut=st.integers(0, 3000) | st.just(0), flips=FLIPS)
def test_a_damaged_manifest_is_read_whole_or_refused(tmp_path, manifest_bytes, cut, flips):
    from synthforge.provenance import read_manifest

    path = tmp_path / "manifest.parquet"
    path.write_bytes(damaged(manifest_bytes, cut, flips))
    try:
        table = read_manifest(path)
    except BadInput as exc:
        assert str(exc).startswith(str(path))
    else:
        table.to_pylist()  # everything read decodes


@PROPERTY
@given(ids=st.lists(st.text(max_size=70) | st.from_regex(r"[0-9a-f]{16,64}", fullmatch=True), min_size=1, max_size=5))
def test_manifest_sample_ids_must_be_sample_ids(tmp_path, ids):
    from synthforge.provenance import SAMPLE_ID, read_manifest

    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"sample_id": ids, "kept": [True] * len(ids)}), path)
    valid = all(SAMPLE_ID.match(i) for i in ids)
    try:
        read_manifest(path)
    except BadInput as exc:
        assert not valid and "is not a sample id" in str(exc)
    else:
        assert valid


@PROPERTY
@given(random=st.binary(max_size=400), cut=st.integers(0, 400), flips=FLIPS, use_random=st.booleans())
def test_image_bytes_decode_or_give_value_error(random, cut, flips, use_random):
    from synthforge.vision.images import decode_image

    data = random if use_random else damaged(noise(3, size=16), cut, flips)
    try:
        image = decode_image(data)
    except ValueError as exc:
        assert str(exc)
    else:
        assert image.size[0] > 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@PROPERTY
@given(lines=st.lists(st.binary(max_size=60) | JSON_VALUES.map(lambda v: json.dumps(v).encode()), max_size=5))
def test_jsonl_lines_are_records_or_bad_input_naming_the_line(tmp_path, lines):
    from synthforge.sources import read_jsonl

    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        records = read_jsonl(path)
    except BadInput as exc:
        assert str(exc).startswith(f"{path}:")
    else:
        assert all(isinstance(r, dict) for _, r in records)
