"""The local registry: one bare git repository per dataset, one commit and one annotated tag per version.

    <registry>/<name>.git          refs/heads/main, refs/tags/vX.Y.Z
      data/{split}-NNNNN-of-NNNNN.parquet   content + sample_id + provenance
      README.md                             dataset card with Hub YAML
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
    return sha256_hex(canonical_json({k: v for k, v in row.items() if k != "provenance"}))


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)

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
    from synthforge.stages.split import check_leakage, group_key, leakage_fields, text_key

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
    fields = leakage_fields(params) or [f.name for f in source.schema if pa.types.is_string(f.type) and f.name != "sample_id"]
    group_by = (params.get("split") or {}).get("group_by", "source")
    check_leakage((r["sample_id"], s, group_key(r, group_by), text_key(r, fields)) for s, rows in by_split.items() for r in rows)
    split_files, split_bytes, manifest = {}, {}, []
    for split, rows in by_split.items():
        n_shards = max(1, -(-len(rows) // SHARD_ROWS))
        split_files[split] = f"data/{split}-*.parquet"
        split_bytes[split] = 0
        for k in range(n_shards):
            path = tree / "data" / f"{split}-{k:05d}-of-{n_shards:05d}.parquet"
            pq.write_table(
                pa.Table.from_pylist(rows[k * SHARD_ROWS : (k + 1) * SHARD_ROWS], schema=source.schema), path, compression="zstd"
            )
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
        schema=source.schema,
        split_files=split_files,
        split_counts=counts,
        split_bytes=split_bytes,
        provenance_rows=[m["provenance"] for m in manifest],
        stage_stats=stats,
        stage_info=[s.info for s in chain],
        load_call=load_call(name, version, registry, project),
    )
    (tree / "README.md").write_text(card)
    return meta


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
