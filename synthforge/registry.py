"""The local registry: one bare git repository per dataset, one commit and one annotated tag per version.

    <registry>/<name>.git          refs/heads/main, refs/tags/vX.Y.Z (the files of a version: synthforge.release)

A version's files are committed through a private index (the repository's refs do not move until the end), the
tag is created (refused if it exists) and then `main` moves with a compare-and-swap against the commit the
publish started from, so a concurrent publish is detected instead of silently lost. `main` may also move without
a tag: a quarantine advisory for versions whose clean successor already exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthforge.errors import BadInput, SynthforgeError, VersionExists
from synthforge.gitutil import GitError, git

SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def normalize_version(version: str) -> str:
    m = SEMVER.match(version.strip())
    if not m:
        raise BadInput(f"version {version!r} is not semantic (MAJOR.MINOR.PATCH, e.g. 1.0.0)")
    return ".".join(m.groups())


def version_key(version: str) -> tuple[int, int, int]:
    major, minor, patch = normalize_version(version).split(".")
    return int(major), int(minor), int(patch)


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
    """Someone else published to the same dataset between our read of it and our commit."""

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

    @property
    def tag(self) -> str:
        return f"v{self.version}"


class Registry:
    """A folder of datasets, each a bare git repository."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()  # git runs with other working directories (the version tree)

    def repo(self, name: str) -> Path:
        if not NAME.match(name):
            raise BadInput(f"dataset name {name!r} may hold only letters, digits, '.', '_' and '-'")
        return self.root / f"{name}.git"

    def dataset(self, name: str) -> LocalDataset:
        return LocalDataset(self, name)

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
            # The last field is never empty, so git()'s strip cannot eat the tabs of a lightweight tag (no tagger,
            # no tagged object): synthforge makes annotated tags only, a lightweight one is someone else's.
            "--format=%(refname:short)\t%(taggerdate:iso-strict)\t%(*objectname)\t%(objecttype)",
            "refs/tags",
        )
        infos = []
        for line in filter(None, out.splitlines()):
            tag, date, commit, _ = line.split("\t")
            if not SEMVER.match(tag):
                continue
            raw = git("--git-dir", str(repo), "show", f"{commit}:synthforge.json", check=False) if commit else ""
            meta = version_meta(raw or None, f"{name} {tag} in registry {self.root}")
            infos.append(VersionInfo(name, normalize_version(tag), commit, date, meta["counts"], meta["content_fingerprint"]))
        return sorted(infos, key=lambda v: version_key(v.version))

    def version(self, name: str, version: str) -> VersionInfo:
        return find_version(self.versions(name), name, version, f"registry {self.root}")

    def checkout(self, name: str, commit: str) -> Path:
        """The files of one commit, exported once into a cache folder keyed by the commit sha."""
        target = cache_root() / name / commit
        if (target / "synthforge.json").exists():
            return target
        tmp = target.parent / f".{commit}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            archive = subprocess.run(
                ["git", "--git-dir", str(self.repo(name)), "archive", "--format=tar", commit], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True, capture_output=True)
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise GitError(
                f"{name}: exporting commit {commit[:10]} failed: {exc.stderr.decode(errors='replace').strip()}"
            ) from None
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

    def publish(
        self, split_dir: str | Path, name: str, version: str | None, params: dict | None = None, project: Path | None = None
    ):
        """Publish a split stage directory as `name` `version` (None: the version the diff against the latest
        one calls for). See synthforge.versions.publish."""
        from synthforge.release import from_split_stage
        from synthforge.versions import publish

        project = project or Path.cwd()
        return publish(self.dataset(name), from_split_stage(split_dir, params or {}, project), version, project=project)


def version_meta(raw: str | bytes | None, where: str) -> dict[str, Any]:
    """A version's synthforge.json, as far as listing versions reads it. A semver tag that synthforge did not make
    (no synthforge.json, or another file of that name) is named instead of failing halfway through a listing."""
    try:
        meta = json.loads(raw) if raw is not None else None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        meta = None
    counts = meta.get("counts") if isinstance(meta, dict) else None
    if (
        not isinstance(counts, dict)
        or not all(isinstance(n, int) for n in counts.values())
        or not isinstance(meta.get("content_fingerprint"), str)
        or not isinstance(meta.get("published_at"), str)
    ):
        raise BadInput(f"{where}: not a version synthforge published (no readable synthforge.json with counts and fingerprint)")
    return meta


def find_version(infos: list[VersionInfo], name: str, version: str, where: str) -> VersionInfo:
    version = normalize_version(version)
    for info in infos:
        if info.version == version:
            return info
    have = ", ".join(v.version for v in infos) or "none"
    raise BadInput(f"{name}: no version {version} in {where} (have: {have})")


class LocalDataset:
    """One dataset of a local registry, as a version store (see synthforge.versions.DatasetStore)."""

    def __init__(self, registry: Registry, name: str):
        self.registry, self.name = registry, name
        self.repo = registry.repo(name)
        self.label = name
        self.url = None
        self.hub_repo = None

    def exists(self) -> bool:
        return (self.repo / "HEAD").exists()

    def versions(self) -> list[VersionInfo]:
        return self.registry.versions(self.name) if self.exists() else []

    def version(self, version: str) -> VersionInfo:
        return self.registry.version(self.name, version)

    def files(self, info: VersionInfo) -> Path:
        return self.registry.checkout(self.name, info.commit)

    def head(self) -> str | None:
        if not self.exists():
            return None
        return git("--git-dir", str(self.repo), "rev-parse", "--verify", "--quiet", "refs/heads/main", check=False) or None

    def head_file(self, path: str) -> bytes | None:
        """A file as it is on main now (None when main or the file does not exist)."""
        head = self.head()
        if head is None:
            return None
        proc = subprocess.run(["git", "--git-dir", str(self.repo), "show", f"{head}:{path}"], capture_output=True)
        return proc.stdout if proc.returncode == 0 else None

    def commit(self, tree: Path, message: str, parent: str | None, tag: str | None) -> str:
        """Commit `tree` on top of `parent` (main as the caller read it), tag it, then move main; refuses an existing
        tag, and a main that moved since `parent` was read."""
        if not self.exists():
            self.repo.parent.mkdir(parents=True, exist_ok=True)
            git("init", "--bare", "--quiet", "--initial-branch=main", str(self.repo))
        gd = ["--git-dir", str(self.repo)]
        env = {"GIT_INDEX_FILE": str(tree.parent / f".index-{uuid.uuid4().hex[:8]}"), "GIT_WORK_TREE": str(tree)}
        git(*gd, "add", "-A", "--force", ".", cwd=tree, env=env)  # --force: a user's global gitignore must not drop files
        tree_sha = git(*gd, "write-tree", env=env)
        Path(env["GIT_INDEX_FILE"]).unlink()
        commit = git(*gd, "commit-tree", tree_sha, *(["-p", parent] if parent else []), "-m", message)
        if tag:
            try:
                git(*gd, "tag", "-a", tag, "-m", message, commit)
            except GitError:
                raise VersionExists(
                    f"{self.name} {tag} was published by someone else a moment ago; nothing was changed"
                ) from None
        try:  # compare-and-swap: fails if main moved since the caller read it
            git(*gd, "update-ref", "refs/heads/main", commit, parent or "0" * 40)
        except GitError:
            if tag:
                git(*gd, "tag", "-d", tag, check=False)
            what = f"publish of {tag}" if tag else "quarantine"
            raise ConcurrentPublish(
                f"{self.name}: main moved during {what} (a concurrent publish landed first); nothing was changed, retry"
            ) from None
        return commit

    def load_call(self, version: str, project: Path) -> str:
        """The one line of Python that loads this version (the registry is named unless it is the default)."""
        registry = self.registry.root
        where = "" if registry.resolve() == (project / "registry").resolve() else f', registry="{registry}"'
        return f'synthforge.load("{self.name}", version="{version}"{where})'
