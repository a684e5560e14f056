"""A dataset repository on the Hugging Face Hub as a version store: one commit and one tag per version.

A version is one `create_commit` holding every file (with `parent_commit`, so a concurrent publish makes the Hub
answer 412 instead of silently stacking commits), then `create_tag` on that commit. Training code loads it with
plain `datasets.load_dataset("ORG/NAME", revision="vX.Y.Z")`.

The token comes from huggingface_hub's usual places (HF_TOKEN, `hf auth login`); synthforge never reads it, so it
cannot reach a file, a card or a message.
"""

from __future__ import annotations

import re
from pathlib import Path

from synthforge.errors import BadInput, SynthforgeError, VersionExists
from synthforge.registry import (
    SEMVER,
    ConcurrentPublish,
    VersionInfo,
    find_version,
    normalize_version,
    version_key,
    version_meta,
)

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_PREFIX = "hf://"


class HubError(SynthforgeError):
    """The Hub refused a request for a reason that is not the user's input."""


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


class HubDataset:
    """A dataset repository `ORG/NAME` on the Hub (the endpoint is huggingface_hub's: HF_ENDPOINT or huggingface.co)."""

    def __init__(self, repo_id: str, private: bool = False):
        from huggingface_hub import HfApi, constants

        if not REPO_ID.match(repo_id):
            raise BadInput(f"{HUB_PREFIX}{repo_id}: a Hub dataset is named {HUB_PREFIX}ORG/NAME")
        self.repo_id = self.hub_repo = repo_id
        self.label = f"{HUB_PREFIX}{repo_id}"
        self.private = private
        self.api = HfApi()
        self.url = f"{constants.ENDPOINT}/datasets/{repo_id}"

    def _call(self, what: str, fn, *args, **kwargs):
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError

        try:
            return fn(*args, **kwargs)
        except RemoteEntryNotFoundError:
            raise
        except LocalEntryNotFoundError:  # the Hub could not be reached and the file is not in the cache
            raise HubError(f"{self.label}: {what} failed: the Hub could not be reached") from None
        except HfHubHTTPError as exc:
            raise self._error(what, exc) from None

    def _error(self, what: str, exc: Exception) -> SynthforgeError:
        """A Hub error as a message naming the repository; it never carries request headers (the token)."""
        from huggingface_hub.errors import RepositoryNotFoundError

        if isinstance(exc, RepositoryNotFoundError):
            endpoint = self.url.rsplit("/datasets/", 1)[0]
            return BadInput(f"{self.label}: no such dataset on {endpoint}, or the token has no access to it")
        server = getattr(exc, "server_message", None) or ""
        return HubError(f"{self.label}: {what} failed (HTTP {_status(exc)}){': ' + server if server else ''}")

    def _refs(self):
        """The repository's branches and tags; None when it does not exist (yet)."""
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

        try:
            return self.api.list_repo_refs(self.repo_id, repo_type="dataset")
        except RepositoryNotFoundError:
            return None
        except HfHubHTTPError as exc:
            raise self._error("listing refs", exc) from None

    def versions(self) -> list[VersionInfo]:
        from huggingface_hub.errors import RemoteEntryNotFoundError

        refs = self._refs()
        if refs is None:
            return []
        infos = []
        for tag in refs.tags:
            if not SEMVER.match(tag.name):
                continue
            try:
                raw = self._download("synthforge.json", tag.target_commit).read_bytes()
            except RemoteEntryNotFoundError:
                raw = None
            meta = version_meta(raw, f"{self.label} {tag.name}")
            infos.append(
                VersionInfo(
                    self.repo_id,
                    normalize_version(tag.name),
                    tag.target_commit,
                    meta["published_at"],
                    meta["counts"],
                    meta["content_fingerprint"],
                )
            )
        return sorted(infos, key=lambda v: version_key(v.version))

    def version(self, version: str) -> VersionInfo:
        return find_version(self.versions(), self.label, version, self.url)

    def _download(self, path: str, revision: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(
            self._call(f"download of {path}", hf_hub_download, self.repo_id, path, repo_type="dataset", revision=revision)
        )

    def files(self, info: VersionInfo) -> Path:
        from huggingface_hub import snapshot_download

        return Path(
            self._call(f"download of {info.tag}", snapshot_download, self.repo_id, repo_type="dataset", revision=info.commit)
        )

    def head(self) -> str | None:
        refs = self._refs()
        if refs is None:
            return None
        return next((b.target_commit for b in refs.branches if b.name == "main"), None)

    def head_file(self, path: str) -> bytes | None:
        from huggingface_hub.errors import RemoteEntryNotFoundError

        head = self.head()
        if head is None:
            return None
        try:
            return self._download(path, head).read_bytes()
        except RemoteEntryNotFoundError:  # the Hub says the file is not there: an answer, not an error
            return None

    def commit(self, tree: Path, message: str, parent: str | None, tag: str | None) -> str:
        """One commit with every file of `tree` (files of `parent` that the tree lacks are deleted), on top of
        `parent`; then the tag on that commit."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import HfHubHTTPError

        self._call("create_repo", self.api.create_repo, self.repo_id, repo_type="dataset", private=self.private, exist_ok=True)
        if self.private and not self._call("repo_info", self.api.dataset_info, self.repo_id).private:
            raise BadInput(f"{self.label} exists and is public; --private will not publish into it (make it private first)")
        files = sorted(p for p in tree.rglob("*") if p.is_file())
        operations = [CommitOperationAdd(path_in_repo=p.relative_to(tree).as_posix(), path_or_fileobj=str(p)) for p in files]
        if parent:
            keep = {op.path_in_repo for op in operations} | {".gitattributes"}
            existing = self._call("list files", self.api.list_repo_files, self.repo_id, repo_type="dataset", revision=parent)
            operations += [CommitOperationDelete(path_in_repo=p) for p in existing if p not in keep]
        summary, _, description = message.partition("\n\n")
        try:
            commit = self.api.create_commit(
                self.repo_id,
                operations,
                commit_message=summary,
                commit_description=description or None,
                repo_type="dataset",
                parent_commit=parent,
            )
        except HfHubHTTPError as exc:
            if _status(exc) == 412:
                what = f"publish of {tag}" if tag else "quarantine"
                raise ConcurrentPublish(
                    f"{self.label}: main moved during {what} (a concurrent publish landed first); nothing was changed, retry"
                ) from None
            raise self._error("commit", exc) from None
        if tag:
            try:
                self.api.create_tag(self.repo_id, tag=tag, tag_message=summary, revision=commit.oid, repo_type="dataset")
            except HfHubHTTPError as exc:
                if _status(exc) == 409:
                    raise VersionExists(
                        f"{self.label}: {tag} was tagged by someone else a moment ago; commit {commit.oid[:10]} is on main "
                        f"without a tag"
                    ) from None
                error = self._error(f"create_tag {tag}", exc)
                raise HubError(f"{error}; commit {commit.oid[:10]} is on main without a tag: publish again to tag it") from None
        return commit.oid

    def load_call(self, version: str, project: Path) -> str:
        return f'datasets.load_dataset("{self.repo_id}", revision="v{version}")'
