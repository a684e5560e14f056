"""What a user does with dataset versions, on either store: publish, quarantine, load.

Stores: a dataset in the local git registry (`synthforge.registry.LocalDataset`) or a dataset repository on the
Hugging Face Hub (`synthforge.hub.HubDataset`, named `hf://ORG/NAME`). Both keep one commit and one tag per
version and a `main` branch whose head holds `advisories.json`: the quarantine advisories that mark earlier
versions as affected, like yanked releases (still loadable, but `load` warns and names the clean version).

Versions follow semver with meaning (synthforge.diff): publish without a version takes the one the diff against
the latest version calls for, and a requested version that contradicts the diff is refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from synthforge.errors import BadInput, VersionExists
from synthforge.provenance import now_iso
from synthforge.registry import Registry, VersionInfo, normalize_version, resolve_registry, version_key
from synthforge.release import Release, ReleaseContent, from_version, write_release


class DatasetStore(Protocol):
    label: str  # how messages name the dataset: `name` or `hf://ORG/NAME`
    url: str | None  # where the dataset lives on the web, if anywhere
    hub_repo: str | None  # ORG/NAME on the Hub, if there

    def versions(self) -> list[VersionInfo]: ...
    def version(self, version: str) -> VersionInfo: ...
    def files(self, info: VersionInfo) -> Path: ...
    def head(self) -> str | None: ...
    def head_file(self, path: str) -> bytes | None: ...
    def commit(self, tree: Path, message: str, parent: str | None, tag: str | None) -> str: ...
    def load_call(self, version: str, project: Path) -> str: ...


class QuarantinedVersionWarning(UserWarning):
    """A loaded version holds samples a quarantine removed from a later version."""


def open_store(target: str, registry: str | Path | None = None, *, private: bool = False) -> DatasetStore:
    """`hf://ORG/NAME` (a Hub dataset repository) or a dataset name in the local registry."""
    from synthforge.hub import HUB_PREFIX, HubDataset

    if target.startswith(HUB_PREFIX):
        return HubDataset(target[len(HUB_PREFIX) :], private=private)
    return Registry(registry if registry is not None else resolve_registry()).dataset(target)


@dataclass(frozen=True)
class PublishResult:
    info: VersionInfo
    store: DatasetStore
    already_published: bool
    proposed: bool = False  # the version was chosen from the diff, not given
    diff: Any = None  # synthforge.diff.VersionDiff against the latest version (None when nothing was published)

    @property
    def repo(self) -> Path:
        """The git repository (local registry datasets only)."""
        return self.store.repo


def advisories(store: DatasetStore) -> list[dict]:
    """The quarantine advisories on the dataset's main branch now (later ones can affect versions already out)."""
    raw = store.head_file("advisories.json")
    return json.loads(raw) if raw else []


def manifest(store: DatasetStore, info: VersionInfo, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(store.files(info) / "provenance" / "manifest.parquet", columns=columns)


def _meta(store: DatasetStore, info: VersionInfo) -> dict:
    return json.loads((store.files(info) / "synthforge.json").read_text())


def publish(
    store: DatasetStore,
    content: ReleaseContent,
    version: str | None = None,
    *,
    project: Path,
    summary: str | None = None,
    advisory: dict | None = None,
) -> PublishResult:
    """Publish `content` as `version`, or as the version the diff against the latest one calls for.

    The same records again are a no-op; another content under an existing version is refused; a version that
    contradicts the diff (a PATCH that removes records) is refused, naming the right one.
    """
    from synthforge.diff import check_version, diff_manifests, next_version

    release = Release.of(content)
    parent = store.head()  # main as we found it: the commit must land right on top of it
    infos = store.versions()
    wanted = normalize_version(version) if version else None
    for info in infos:
        if info.content_fingerprint == release.fingerprint and wanted in (None, info.version):
            if affected := advisories_for(store, info.version):
                raise BadInput(
                    f"{store.label}: these are the records of v{info.version}, quarantined ({affected[-1]['reason']}); "
                    f"the clean version is {affected[-1]['clean_version']}: rebuild the split without the affected samples"
                )
            return PublishResult(info, store, already_published=True)
        if info.version == wanted:
            raise VersionExists(
                f"{store.label} v{wanted} already exists (published {info.date}, {info.total} samples) with different "
                f"content; versions are immutable: publish the change as a new version"
            )
    latest = infos[-1] if infos else None
    old = manifest(store, latest) if latest else None
    diff = diff_manifests(old, release.manifest, old_label=latest.version if latest else None, new_label=wanted)
    if wanted is None:
        wanted = next_version(latest.version if latest else None, diff)
    else:
        check_version(latest.version if latest else None, wanted, diff)
    tag = f"v{wanted}"
    previous = _meta(store, latest)["changelog"] if latest else []
    entry = {
        "version": wanted,
        "date": now_iso(),
        "previous": latest.version if latest else None,
        "bump": diff.bump if latest else "initial",
        "summary": summary or _summary(diff, latest),
        "diff": {k: len(getattr(diff, k)) for k in ("added", "removed", "changed", "moved")},
        "quarantine": advisory,
    }
    known = advisories(store) + ([advisory] if advisory else [])
    with tempfile.TemporaryDirectory(prefix=".synthforge-publish-") as tmp:
        tree = Path(tmp) / "tree"
        meta = write_release(
            release,
            tree,
            name=store.label,
            version=wanted,
            load_call=store.load_call(wanted, project),
            changelog=[*previous, entry],
            advisories=known,
            hub_repo=store.hub_repo,
            url=store.url,
        )
        message = f"{store.label} {tag}\n\n{entry['summary']}\n\n{json.dumps(meta['counts'])}"
        commit = store.commit(tree, message, parent, tag)
    info = VersionInfo(store.label, wanted, commit, meta["published_at"], meta["counts"], meta["content_fingerprint"])
    return PublishResult(info, store, already_published=False, proposed=version is None, diff=diff)


def diff_counts(diff) -> str:
    """`5 added, 1 moved` (or `same records`)."""
    parts = [f"{len(getattr(diff, k))} {k}" for k in ("added", "removed", "changed", "moved") if getattr(diff, k)]
    return ", ".join(parts) or "same records"


def _summary(diff, latest: VersionInfo | None) -> str:
    return f"{diff_counts(diff)} since {latest.version}" if latest else "first version"


# -- quarantine ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuarantineResult:
    advisory: dict
    removed: int  # samples the new version leaves out (0 when the latest version was already clean)
    published: PublishResult | None  # the clean MAJOR version, when one was needed


def quarantine(
    store: DatasetStore,
    affected: set[str],
    *,
    reason: str,
    selector: dict[str, str],
    project: Path,
) -> QuarantineResult:
    """Mark every version holding one of `affected` (sample ids: the selection and its descendants) as affected,
    and publish the next MAJOR version without them. If the latest version holds none of them it is the clean
    version, and only the advisory is recorded (a commit on main, no new version)."""
    if not reason.strip():
        raise BadInput("quarantine needs a --reason (it goes into the changelog and the warning users see)")
    infos = store.versions()
    if not infos:
        raise BadInput(f"{store.label}: nothing published yet")
    holding = {}
    for info in infos:
        ids = set(manifest(store, info, columns=["sample_id"])["sample_id"].to_pylist())
        if hit := ids & affected:
            holding[info.version] = len(hit)
    if not holding:
        raise BadInput(f"{store.label}: no published version holds a sample of {_describe(selector)} ({len(affected)} samples)")
    latest = infos[-1]
    for known in advisories(store):
        if known["selector"] == selector and set(holding) <= set(known["affects"]):
            clean = known["clean_version"]
            raise BadInput(f"{store.label}: {_describe(selector)} is already quarantined ({known['reason']}); clean: {clean}")
    advisory = {
        "date": now_iso(),
        "reason": reason.strip(),
        "selector": selector,
        "affects": sorted(holding, key=version_key),
        "samples": {v: holding[v] for v in sorted(holding, key=version_key)},
        "clean_version": None,
    }
    if latest.version not in holding:
        advisory["clean_version"] = latest.version
        _record_advisory(store, latest, advisory)
        return QuarantineResult(advisory, removed=0, published=None)
    major = version_key(latest.version)[0] + 1
    advisory["clean_version"] = f"{major}.0.0"
    content = from_version(store.files(latest), latest.version, latest.commit, affected, reason.strip())
    if not content.by_split:
        raise BadInput(f"{store.label}: the quarantine would remove every sample of {latest.version}; nothing left to publish")
    summary = (
        f"quarantine: {reason.strip()} ({holding[latest.version]} samples of {latest.version} removed, {_describe(selector)})"
    )
    result = publish(store, content, advisory["clean_version"], project=project, summary=summary, advisory=advisory)
    return QuarantineResult(advisory, removed=holding[latest.version], published=result)


def _record_advisory(store: DatasetStore, latest: VersionInfo, advisory: dict) -> None:
    """An advisory-only commit on main: the latest version's files with the advisory added; no tag."""
    parent = store.head()
    known = advisories(store) + [advisory]
    with tempfile.TemporaryDirectory(prefix=".synthforge-quarantine-") as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(store.files(latest), tree, ignore=shutil.ignore_patterns(".hf-cache", ".cache"))
        (tree / "advisories.json").write_text(json.dumps(known, indent=2, ensure_ascii=False) + "\n")
        summary = f"quarantine advisory: {advisory['reason']} (affects {', '.join(advisory['affects'])})"
        store.commit(tree, f"{store.label} advisory\n\n{summary}", parent, None)


def _describe(selector: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in selector.items())


def advisories_for(store: DatasetStore, version: str) -> list[dict]:
    return [a for a in advisories(store) if version in a["affects"]]


def warn_if_quarantined(store: DatasetStore, version: str) -> None:
    for a in advisories_for(store, version):
        message = (
            f"{store.label} {version} is quarantined: {a['reason']} ({a['samples'][version]} samples, "
            f"{_describe(a['selector'])}); the clean version is {a['clean_version']}"
        )
        warnings.warn(message, QuarantinedVersionWarning, stacklevel=4)  # the user's synthforge.load(...) line


# -- load ------------------------------------------------------------------------------------------------


def load(name: str, version: str, registry: str | Path | None = None, **load_kwargs):
    """A published version as a `datasets.DatasetDict` by split, pinned to the version's commit.

    Local: the files are exported per commit sha and `datasets` gets a cache folder inside that export, so two
    versions loaded in one process never share a stale cache entry. Hub (`hf://ORG/NAME`): `datasets.load_dataset`
    at the version's commit.
    """
    import datasets

    store = open_store(name, registry)
    info = store.version(version)
    warn_if_quarantined(store, info.version)
    if store.hub_repo:
        return datasets.load_dataset(store.hub_repo, revision=info.commit, **load_kwargs)
    root = store.files(info)
    data_files = {split: sorted(str(p) for p in (root / "data").glob(f"{split}-*.parquet")) for split in info.counts}
    return datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(root / ".hf-cache"), **load_kwargs)


# -- selecting samples -------------------------------------------------------------------------------------


def read_sample_ids(path: Path) -> list[str]:
    """Sample ids from a file: one per line, or JSONL objects with a `sample_id` field. Blank lines are skipped."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    ids = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                sid = json.loads(line).get("sample_id")
            except json.JSONDecodeError as exc:
                raise BadInput(f"{path}:{n}: not valid JSON: {exc.msg}") from None
            if not isinstance(sid, str) or not sid:
                raise BadInput(f"{path}:{n}: a JSON line needs a string sample_id")
            ids.append(sid)
        else:
            ids.append(line)
    if not ids:
        raise BadInput(f"{path}: no sample ids in it")
    return ids


def affected_samples(store: DatasetStore, data_dir: Path, selector: dict[str, str], sample_ids: list[str] | None) -> set[str]:
    """The selected samples and all their descendants, found in the stage manifests under `data_dir` and in every
    version of `store` (a descendant can be published while its parent was rejected)."""
    from synthforge.trace import trace

    versions = [(f"{store.label} v{info.version}", store.files(info)) for info in store.versions()]
    kind, value = next(iter(selector.items()))
    query = {"sample_ids": sample_ids} if kind == "samples" else {kind: value}
    return {s.sample_id for s in trace(data_dir, None, versions=versions, **query).samples}
