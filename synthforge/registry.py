"""The local registry: one bare git repository per dataset, one commit and one annotated tag per version.

    <registry>/<name>.git          refs/heads/main, refs/tags/vX.Y.Z
      data/{split}-NNNNN-of-NNNNN.parquet   content + sample_id + provenance, with the `datasets` features in
                                            the schema metadata (an `image` column is a datasets.Image)
      README.md                             dataset card with Hub YAML
      images/grid_by_{class,difficulty}.png sample grids shown by the card (image datasets only)
      provenance/manifest.parquet           sample_id, split, content_hash, provenance
      synthforge.json                       pipeline, params, dvc.lock, fingerprints, counts

A publish builds the version in a temporary folder, writes git objects through a private index (the
repository's refs do not move until the end), creates the tag (refused if it exists) and then moves
`main` with a compare-and-swap, so a concurrent publish is detected instead of silently lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from synthforge.errors import BadInput, SynthforgeError, VersionExists
from synthforge.gitutil import GitError, git
from synthforge.provenance import PROVENANCE_TYPE, canonical_json, now_iso, sha256_hex
from synthforge.stagedir import StageInput, code_revision, lineage

SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SHARD_ROWS = 100_000
MAX_CLASS_LABEL_ID = 100_000  # label ids beyond this are not class indices: the label stays a plain int
VERSION_MANIFEST_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("split", pa.string()), ("content_hash", pa.string()), ("provenance", PROVENANCE_TYPE)]
)


def normalize_version(version: str) -> str:
    m = SEMVER.match(version.strip())
    if not m:
        raise BadInput(f"version {version!r} is not semantic (MAJOR.MINOR.PATCH, e.g. 1.0.0)")
    return ".".join(m.groups())


def resolve_registry(cli_value: str | None = None, params: dict[str, Any] | None = None, project: Path | None = None) -> Path:
    """--registry, else $SYNTHFORGE_REGISTRY, else params.yaml publish.registry, else <project>/registry."""
    if cli_value:
        return Path(cli_value)
    if os.environ.get("SYNTHFORGE_REGISTRY"):
        return Path(os.environ["SYNTHFORGE_REGISTRY"])
    project = project or Path.cwd()
    configured = ((params or {}).get("publish") or {}).get("registry")
    return project / configured if configured else project / "registry"


def cache_root() -> Path:
    return Path(os.environ.get("SYNTHFORGE_CACHE") or Path.home() / ".cache" / "synthforge")


class ConcurrentPublish(SynthforgeError):
    exit_code = 3


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    commit: str
    date: str
    counts: dict[str, int]
    content_fingerprint: str

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class PublishResult:
    info: VersionInfo
    repo: Path
    already_published: bool


def content_hash(row: dict[str, Any]) -> str:
    """Hash of a split-stage row's content. Binary values (PNG bytes) enter as their sha256, so the hash depends on
    the stored bytes only, never on how they are published or decoded (datasets.Image struct, PIL)."""
    content = {
        k: f"sha256:{sha256_hex(bytes(v))}" if isinstance(v, bytes | bytearray) else v
        for k, v in row.items()
        if k != "provenance"
    }
    return sha256_hex(canonical_json(content))


def image_column(schema: pa.Schema) -> str | None:
    """The column of image bytes by the content convention (synthforge.vision.images): a binary `image` column."""
    if "image" in schema.names and (
        pa.types.is_binary(schema.field("image").type) or pa.types.is_large_binary(schema.field("image").type)
    ):
        return "image"
    return None


def class_names(rows: list[dict[str, Any]], where: Path) -> list[str] | None:
    """Class names indexed by label id, from every row of the version (so a split that lacks a class still gets
    the full list), or None when rows carry no label/label_name pairs or ids are negative or huge.

    A label id missing from the whole version gets a placeholder name, so ids keep their meaning.
    """
    name_of: dict[int, tuple[str, str]] = {}  # label -> (name, first sample with it)
    label_of: dict[str, tuple[int, str]] = {}
    for row in rows:
        label, name, sid = row.get("label"), row.get("label_name"), row["sample_id"]
        if label is None or name is None:
            continue
        if label < 0:
            return None
        known_name, other = name_of.setdefault(label, (name, sid))
        if known_name != name:
            raise BadInput(f"{where}: label {label} is named {known_name!r} (sample {other}) and {name!r} (sample {sid})")
        known_label, other = label_of.setdefault(name, (label, sid))
        if known_label != label:
            raise BadInput(f"{where}: label name {name!r} has label {known_label} (sample {other}) and {label} (sample {sid})")
    if not name_of or max(name_of) >= MAX_CLASS_LABEL_ID:
        return None
    return [name_of[i][0] if i in name_of else f"<no samples: {i}>" for i in range(max(name_of) + 1)]


def published_features(schema: pa.Schema, rows: list[dict[str, Any]], where: Path):
    """The `datasets.Features` of the published shards: the split stage's columns, the image column as a
    datasets.Image and `label` as a ClassLabel when the rows name their classes."""
    from datasets import ClassLabel, Features, Image

    features = Features.from_arrow_schema(schema)
    if image := image_column(schema):
        features[image] = Image()
    if "label" in schema.names and "label_name" in schema.names and pa.types.is_integer(schema.field("label").type):
        names = class_names(rows, where)
        if names:
            features["label"] = ClassLabel(names=names)
    return features


def _published_row(row: dict[str, Any], image: str | None) -> dict[str, Any]:
    """A split-stage row as stored in a shard: image bytes become the {bytes, path} struct of datasets.Image."""
    if image is None or row[image] is None:
        return row
    return {**row, image: {"bytes": row[image], "path": None}}


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()  # git runs with other working directories (the version tree)

    def repo(self, name: str) -> Path:
        if not NAME.match(name):
            raise BadInput(f"dataset name {name!r} may hold only letters, digits, '.', '_' and '-'")
        return self.root / f"{name}.git"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(".git")] for p in self.root.glob("*.git") if (p / "HEAD").exists())

    def versions(self, name: str) -> list[VersionInfo]:
        repo = self.repo(name)
        if not (repo / "HEAD").exists():
            raise BadInput(f"no dataset {name!r} in registry {self.root} (have: {', '.join(self.names()) or 'none'})")
        out = git(
            "--git-dir",
            str(repo),
            "for-each-ref",
            "--format=%(refname:short)\t%(taggerdate:iso-strict)\t%(*objectname)",
            "refs/tags",
        )
        infos = []
        for line in filter(None, out.splitlines()):
            tag, date, commit = line.split("\t")
            if not SEMVER.match(tag):
                continue
            meta = json.loads(git("--git-dir", str(repo), "show", f"{commit}:synthforge.json"))
            infos.append(VersionInfo(name, normalize_version(tag), commit, date, meta["counts"], meta["content_fingerprint"]))
        return sorted(infos, key=lambda v: tuple(int(x) for x in v.version.split(".")))

    def version(self, name: str, version: str) -> VersionInfo:
        version = normalize_version(version)
        for info in self.versions(name):
            if info.version == version:
                return info
        have = ", ".join(v.version for v in self.versions(name)) or "none"
        raise BadInput(f"{name}: no version {version} in registry {self.root} (have: {have})")

    def checkout(self, name: str, commit: str) -> Path:
        """The files of one commit, exported once into a cache folder keyed by the commit sha."""
        target = cache_root() / name / commit
        if (target / "synthforge.json").exists():
            return target
        tmp = target.parent / f".{commit}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "--git-dir", str(self.repo(name)), "archive", "--format=tar", commit], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process exported it first
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def manifests(self) -> list[tuple[str, str, Path]]:
        """(name, version, manifest.parquet) for every published version, for trace."""
        out = []
        for name in self.names():
            for info in self.versions(name):
                out.append((name, info.version, self.checkout(name, info.commit) / "provenance" / "manifest.parquet"))
        return out

    # -- publish ---------------------------------------------------------------------------------

    def publish(
        self,
        split_dir: str | Path,
        name: str,
        version: str,
        params: dict[str, Any] | None = None,
        project: Path | None = None,
    ) -> PublishResult:
        version = normalize_version(version)
        tag = f"v{version}"
        repo = self.repo(name)
        project = project or Path.cwd()
        source = StageInput.open(split_dir)
        if source.stage != "split":
            raise BadInput(f"{split_dir}: publish takes the output of the split stage, this is {source.stage!r}")
        with tempfile.TemporaryDirectory(prefix=f".publish-{name}-", dir=self.root if self.root.exists() else None) as tmp:
            tree = Path(tmp) / "tree"
            meta = _build_version_tree(source, tree, name, version, params or {}, project, self.root)
            if (repo / "HEAD").exists():
                existing = {v.version: v for v in self.versions(name)}
                if version in existing:
                    old = existing[version]
                    if old.content_fingerprint == meta["content_fingerprint"]:
                        return PublishResult(old, repo, already_published=True)
                    raise VersionExists(
                        f"{name} {tag} already exists (published {old.date}, {old.total} samples) with different content; "
                        f"versions are immutable: publish the change as a new version"
                    )
            else:
                repo.parent.mkdir(parents=True, exist_ok=True)
                git("init", "--bare", "--quiet", "--initial-branch=main", str(repo))
            commit = _commit_tree(repo, tree, Path(tmp) / "index", f"{name} {tag}\n\n{meta['counts']}")
        info = VersionInfo(name, version, commit, now_iso(), meta["counts"], meta["content_fingerprint"])
        return PublishResult(info, repo, already_published=False)


def _commit_tree(repo: Path, tree: Path, index: Path, message: str) -> str:
    gd = ["--git-dir", str(repo)]
    env = {"GIT_INDEX_FILE": str(index), "GIT_WORK_TREE": str(tree)}
    git(*gd, "add", "-A", ".", cwd=tree, env=env)
    tree_sha = git(*gd, "write-tree", env=env)
    parent = git(*gd, "rev-parse", "--verify", "--quiet", "refs/heads/main", check=False)
    commit = git(*gd, "commit-tree", tree_sha, *(["-p", parent] if parent else []), "-m", message)
    tag = message.split("\n", 1)[0].split()[-1]
    try:
        git(*gd, "tag", "-a", tag, "-m", message, commit)
    except GitError:
        raise VersionExists(f"{tag} was published by someone else a moment ago; nothing was changed") from None
    try:  # compare-and-swap: fails if main moved since we read it
        git(*gd, "update-ref", "refs/heads/main", commit, parent or "0" * 40)
    except GitError:
        git(*gd, "tag", "-d", tag, check=False)
        raise ConcurrentPublish(f"main moved during publish of {tag} (a concurrent publish); retry") from None
    return commit


def _build_version_tree(
    source: StageInput, tree: Path, name: str, version: str, params: dict, project: Path, registry: Path
) -> dict:
    from synthforge.card import render_card

    (tree / "data").mkdir(parents=True)
    (tree / "provenance").mkdir()
    by_split: dict[str, list[dict]] = {}
    for rows in source.iter_rows():
        for row in rows:
            split = row["provenance"]["split"]
            if not split:
                raise BadInput(f"{source.path}: sample {row['sample_id']} has no split; run the split stage")
            by_split.setdefault(split, []).append(row)
    if not by_split:
        raise BadInput(f"{source.path}: no samples to publish")
    order = list((params.get("split") or {}).get("ratios") or {})
    by_split = dict(sorted(by_split.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
    _check_leakage(source, by_split, params)
    all_rows = [r for rows in by_split.values() for r in rows]
    features = published_features(source.schema, all_rows, source.path)
    schema = features.arrow_schema  # carries the features as `huggingface` metadata, read back by datasets loaders
    image = image_column(source.schema)
    split_files, split_bytes, manifest = {}, {}, []
    for split, rows in by_split.items():
        n_shards = max(1, -(-len(rows) // SHARD_ROWS))
        split_files[split] = f"data/{split}-*.parquet"
        split_bytes[split] = 0
        for k in range(n_shards):
            path = tree / "data" / f"{split}-{k:05d}-of-{n_shards:05d}.parquet"
            shard = [_published_row(r, image) for r in rows[k * SHARD_ROWS : (k + 1) * SHARD_ROWS]]
            pq.write_table(pa.Table.from_pylist(shard, schema=schema), path, compression="zstd")
            split_bytes[split] += path.stat().st_size
        manifest += [
            {"sample_id": r["sample_id"], "split": split, "content_hash": content_hash(r), "provenance": r["provenance"]}
            for r in rows
        ]
    pq.write_table(
        pa.Table.from_pylist(manifest, schema=VERSION_MANIFEST_SCHEMA),
        tree / "provenance" / "manifest.parquet",
        compression="zstd",
    )
    counts = {s: len(rows) for s, rows in by_split.items()}
    grids, class_counts = None, None
    if image:
        classes = _class_key(source.schema, all_rows)
        grids = _write_sample_grids(tree / "images", all_rows, image, classes)
        class_counts = _class_counts(by_split, classes) if classes else None
    fingerprint = sha256_hex(canonical_json(sorted((m["sample_id"], m["split"], m["content_hash"]) for m in manifest)))
    chain = lineage(source)
    stats = [json.loads((s.path / "stats.json").read_text()) for s in chain]
    publish = params.get("publish") or {}
    read = lambda p: (project / p).read_text() if (project / p).exists() else None  # noqa: E731
    meta = {
        "name": name,
        "version": version,
        "published_at": now_iso(),
        "counts": counts,
        "content_fingerprint": fingerprint,
        "synthforge_version": __import__("synthforge").__version__,
        "code_revision": code_revision(),
        "lineage": [s.info for s in chain],
        "stats": stats,
        "pipeline": {
            "dvc.yaml": read("dvc.yaml"),
            "dvc.lock": read("dvc.lock"),
            "params": {k: v for k, v in params.items() if k != "__file__"},
        },
    }
    (tree / "synthforge.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    card = render_card(
        name=name,
        version=version,
        description=publish.get("description", f"Synthetic dataset {name}."),
        license=publish.get("license"),
        schema=schema,
        split_files=split_files,
        split_counts=counts,
        split_bytes=split_bytes,
        provenance_rows=[m["provenance"] for m in manifest],
        stage_stats=stats,
        stage_info=[s.info for s in chain],
        load_call=load_call(name, version, registry, project),
        sample_grids=grids,
        class_counts=class_counts,
    )
    (tree / "README.md").write_text(card)
    return meta


def _check_leakage(source: StageInput, by_split: dict[str, list[dict]], params: dict) -> None:
    """No source group and no content in two splits. Content is the text fields for text data; for image data it
    is the image bytes (class names and captions repeat across splits by design), plus any leakage_fields set."""
    from synthforge.stages.split import check_leakage, group_key, leakage_fields, text_key

    group_by = (params.get("split") or {}).get("group_by", "source")
    fields = leakage_fields(params)
    keys = []
    if image := image_column(source.schema):
        keys.append(lambda r: sha256_hex(r[image]) if r[image] is not None else r["sample_id"])
    if fields or not keys:
        fields = fields or [f.name for f in source.schema if pa.types.is_string(f.type) and f.name != "sample_id"]
        keys.append(lambda r: text_key(r, fields))
    for key in keys:
        check_leakage((r["sample_id"], s, group_key(r, group_by), key(r)) for s, rows in by_split.items() for r in rows)


def _class_key(schema: pa.Schema, rows: list[dict]) -> tuple[str, list] | None:
    """The column naming a row's class (label_name, else label) and its values in label-id order, the order a
    classifier uses; None for data without labels."""
    column = next((c for c in ("label_name", "label") if c in schema.names), None)
    if column is None:
        return None

    def by_label(row: dict) -> tuple:
        label = row.get("label")
        return (not isinstance(label, int), label if isinstance(label, int) else 0, str(row[column]))

    return column, list(dict.fromkeys(r[column] for r in sorted(rows, key=by_label)))


def _write_sample_grids(folder: Path, rows: list[dict], image: str, classes: tuple[str, list] | None) -> dict[str, str]:
    """grid_by_class.png and grid_by_difficulty.png in folder; returns {alt text: path in the version} for the card."""
    from synthforge.plots import DIFFICULTY_ORDER, image_grid_by

    grids = {}

    def write(file: str, title: str, png: bytes) -> None:
        folder.mkdir(exist_ok=True)
        (folder / file).write_bytes(png)
        grids[title] = f"{folder.name}/{file}"

    if classes is not None:
        column, order = classes
        title = "Samples per class"
        write("grid_by_class.png", title, image_grid_by(rows, column, order=order, title=title, image_column=image))
    if any(_difficulty(r) for r in rows):
        title = "Samples per difficulty"
        png = image_grid_by(rows, _difficulty, order=DIFFICULTY_ORDER, title=title, image_column=image)
        write("grid_by_difficulty.png", title, png)
    return grids


def _difficulty(row: dict) -> str | None:
    return row["provenance"]["difficulty"]


def _class_counts(by_split: dict[str, list[dict]], classes: tuple[str, list]) -> dict[str, dict[str, int]]:
    """{class: {split: samples}} in label order, for the card's per-class table."""
    column, order = classes
    counts: dict[Any, dict[str, int]] = {c: {} for c in order}
    for split, rows in by_split.items():
        for r in rows:
            counts[r[column]][split] = counts[r[column]].get(split, 0) + 1
    return {"(none)" if c is None else str(c): n for c, n in counts.items()}


def load_call(name: str, version: str, registry: Path, project: Path) -> str:
    """The one line of Python that loads this version (the registry is named unless it is the default)."""
    where = "" if registry.resolve() == (project / "registry").resolve() else f', registry="{registry}"'
    return f'synthforge.load("{name}", version="{version}"{where})'


def load(name: str, version: str, registry: str | Path | None = None, **load_kwargs):
    """A published version as a `datasets.DatasetDict` by split, pinned to the version's commit.

    The files are exported per commit sha and `datasets` gets a cache folder inside that export, so two
    versions loaded in one process never share a stale cache entry.
    """
    import datasets

    reg = Registry(resolve_registry(str(registry) if registry else None))
    info = reg.version(name, version)
    root = reg.checkout(name, info.commit)
    data_files = {split: sorted(str(p) for p in (root / "data").glob(f"{split}-*.parquet")) for split in info.counts}
    return datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(root / ".hf-cache"), **load_kwargs)
