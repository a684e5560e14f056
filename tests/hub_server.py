"""A Hugging Face Hub API server for the publishing tests (a pytest plugin, see conftest).

It speaks the part of the Hub HTTP API that publishing a dataset and loading it back use (read off
huggingface_hub 2.4 and datasets 5.2, see ../shared/notes/hub-api.md) and keeps dataset repos in memory the way
git does: a commit holds the whole file map and its parent, `main` is the only branch, tags point at commits,
LFS files are stored once per repo by sha256 and a commit refers to them by pointer.

Implemented (`{id}` is `namespace/name`, `{rev}` a branch, a tag or a full commit sha, URL-encoded
`refs/heads/...` and `refs/tags/...` included):
- `POST /api/repos/create` (409 with the url when the repo exists; `visibility`, or the older `private`, honoured),
  `POST /api/validate-yaml` (checks only that the front matter is closed, not the YAML inside).
- `GET /api/datasets/{id}` and `.../revision/{rev}` (repo info with siblings), `GET .../refs`,
  `GET .../tree/{rev}[/{path}]` (`recursive`, `expand`), `POST .../paths-info/{rev}` (form-encoded).
- `POST .../preupload/{rev}`: "lfs" for .parquet, .png and files over 10 kB, else "regular"; a regular `file`
  operation on such a path is refused at commit time, as the Hub refuses binaries outside LFS.
- `POST /datasets/{id}.git/info/lfs/objects/batch` (basic transfer) and `PUT` of its href, which needs no token
  (like the presigned URL it stands for) but only takes the announced object with the announced size and sha256.
- `POST .../commit/{branch}` (ndjson `header`, `file`, `lfsFile`, `deletedFile`, `deletedFolder`; 412 when
  `parentCommit` is not the branch head), `POST .../tag/{rev}` (409 when the tag exists).
- `HEAD`/`GET /datasets/{id}/resolve/{rev}/{path}` with X-Repo-Commit, ETag (git blob oid, or sha256 for LFS
  files), Content-Length and single `Range`s (206); errors carry X-Error-Code.
Auth as on the Hub: a token other than `Bearer <server.token>` is refused on every route (401, "Invalid credentials
in Authorization header"); writes need the token; without it a private repo answers like a missing one (401,
RepoNotFound).

Refused: every other method, route, query parameter, body field or commit operation (model and space repos, pull
requests, other branches, Xet, LFS downloads, ...) gets 501 and is recorded in `unknown_requests`, so a test can
assert that a client used only what this server knows; `requests` records every request as "METHOD path".
Pagination never happens: a listing is one page.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import itertools
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from urllib.parse import parse_qs, unquote

import pytest

LFS_SUFFIXES = (".parquet", ".png")
LFS_MIN_SIZE = 10_000  # bytes: bigger files go to LFS whatever their type
# What the Hub writes in the first commit of a new repo (abridged).
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"  # huggingface_hub matches this exact text
STALE_PARENT = "A commit has happened since. Please refresh and try again."


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def lfs_upload_mode(path: str, size: int) -> str:
    return "lfs" if path.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE else "regular"


class File:
    """A file in a commit. Git stores an LFS file as its pointer, so the git oid is the pointer's."""

    def __init__(self, content: bytes, lfs: bool):
        self.content = content
        self.lfs = lfs
        self.sha256 = hashlib.sha256(content).hexdigest()
        self.pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(content)}\n".encode()
        self.oid = git_blob_oid(self.pointer if lfs else content)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, File]


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # uploaded LFS content by sha256
    lfs_announced: dict[str, int] = field(default_factory=dict)  # sha256 -> size, from the batch API, awaiting their PUT

    def resolve(self, rev: str) -> Commit | None:
        if (oid := self.branches.get(rev.removeprefix("refs/heads/"))) or (oid := self.tags.get(rev.removeprefix("refs/tags/"))):
            return self.commits[oid]
        return self.commits.get(rev)

    def history(self, commit: Commit) -> list[Commit]:
        """`commit` and its ancestors, newest first."""
        out = [commit]
        while out[-1].parent is not None:
            out.append(self.commits[out[-1].parent])
        return out


class HubError(Exception):
    """An error answer, with the headers huggingface_hub reads to pick its exception."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None, **fields):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.fields = status, message, code, headers or {}, fields


class UnknownRequest(Exception):
    """A request this server does not implement: answered 501 and recorded."""


@dataclass
class Request:
    method: str
    target: str  # the raw path and query
    args: dict[str, str]  # route groups, URL-decoded
    params: dict[str, list[str]]
    headers: Message
    body: bytes
    authorized: bool

    def flag(self, name: str) -> bool:
        return self.params.get(name, ["false"])[-1].lower() in ("1", "true")

    def json(self, known: set[str]) -> dict:
        data = json.loads(self.body)
        if unknown := set(data) - known:
            raise UnknownRequest(f"body fields {sorted(unknown)}")
        return data


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(data, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    pattern: re.Pattern
    handler: str  # name of the HubServer method
    params: frozenset[str] = frozenset()  # query parameters it understands


def _route(methods: str, pattern: str, handler: str, params: str = "") -> Route:
    return Route(frozenset(methods.split()), re.compile(pattern), handler, frozenset(params.split()))


# Matched against the raw path, so an encoded revision or path stays one group until it is decoded.
_ID = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"
ROUTES = [
    _route("POST", r"/api/repos/create", "create_repo"),
    _route("POST", r"/api/validate-yaml", "validate_yaml"),
    _route("GET", rf"/api/datasets/{_ID}", "repo_info", "blobs"),
    _route("GET", rf"/api/datasets/{_ID}/revision/{_REV}", "repo_info", "blobs"),
    _route("GET", rf"/api/datasets/{_ID}/refs", "list_refs", "include_prs"),
    _route("GET", rf"/api/datasets/{_ID}/tree/{_REV}(?:/(?P<path>.+))?", "list_tree", "recursive expand"),
    _route("POST", rf"/api/datasets/{_ID}/paths-info/{_REV}", "paths_info"),
    _route("POST", rf"/api/datasets/{_ID}/preupload/{_REV}", "preupload"),
    _route("POST", rf"/api/datasets/{_ID}/commit/{_REV}", "commit"),
    _route("POST", rf"/api/datasets/{_ID}/tag/{_REV}", "create_tag"),
    _route("POST", rf"/datasets/{_ID}\.git/info/lfs/objects/batch", "lfs_batch"),
    _route("PUT", rf"/lfs-upload/{_ID}/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
    _route("GET HEAD", rf"/datasets/{_ID}/resolve/{_REV}/(?P<path>.+)", "resolve"),
]


class HubServer:
    """The server and its in-memory repos. `start()`/`stop()`, or use it as a context manager."""

    def __init__(self, user: str = "synthforge-tester"):
        self.user = user  # the namespace of repos created without one, as the token's owner on the Hub
        self.token = "hf_" + secrets.token_hex(16)
        self.url = ""
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.unknown_requests: list[str] = []
        self._lock = threading.Lock()
        self._commit_numbers = itertools.count()
        self._httpd: _HTTPServer | None = None

    def start(self) -> HubServer:
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # Inspection for tests.

    def commits(self, repo_id: str, rev: str = "main") -> list[Commit]:
        """The history of `rev`, newest first."""
        with self._lock:
            repo = self.repos[repo_id]
            return repo.history(repo.resolve(rev))

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        with self._lock:
            return {path: f.content for path, f in self.repos[repo_id].resolve(rev).files.items()}

    def tags(self, repo_id: str) -> dict[str, str]:
        """Tag name -> commit oid."""
        with self._lock:
            return dict(self.repos[repo_id].tags)

    # Dispatch.

    def handle(self, method: str, target: str, headers: Message, body: bytes) -> Reply:
        path, _, query = target.partition("?")
        params = parse_qs(query, keep_blank_values=True)
        with self._lock:
            self.requests.append(f"{method} {path}")
        for route in ROUTES:
            match = route.pattern.fullmatch(path)
            if match is None or method not in route.methods:
                continue
            try:
                if unknown := set(params) - route.params:
                    raise UnknownRequest(f"query parameters {sorted(unknown)}")
                authorization = headers.get("Authorization")
                if authorization is not None and authorization != f"Bearer {self.token}":
                    raise HubError(401, INVALID_CREDENTIALS)
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                request = Request(method, target, args, params, headers, body, authorization is not None)
                with self._lock:
                    return getattr(self, route.handler)(request)
            except HubError as e:
                data = {"error": e.message, **e.fields}
                return json_reply(
                    data, e.status, {"X-Error-Message": e.message, **e.headers} | ({"X-Error-Code": e.code} if e.code else {})
                )
            except UnknownRequest as e:
                return self._unknown(method, target, str(e))
            except (KeyError, TypeError, ValueError) as e:  # a body without the fields the route needs
                return json_reply({"error": f"Malformed request: {e!r}"}, 400)
        return self._unknown(method, target, "no such route")

    def _unknown(self, method: str, target: str, why: str) -> Reply:
        with self._lock:
            self.unknown_requests.append(f"{method} {target}")
        return json_reply({"error": f"hub_server does not implement {method} {target} ({why})"}, 501)

    # Helpers; called with the lock held.

    def _repo(self, request: Request, write: bool = False) -> Repo:
        repo = self.repos.get(request.args["repo"])
        if repo is None or (repo.private and not request.authorized):
            # Without a token the Hub answers 401 whether the repo is missing or private.
            raise HubError(404 if request.authorized else 401, "Repository not found", "RepoNotFound")
        if write and not request.authorized:
            raise HubError(401, "You must be authenticated to write to this repo")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _add_commit(self, repo: Repo, branch: str, files: dict[str, File], title: str, description: str = "") -> Commit:
        parent = repo.branches.get(branch)
        date = now()
        seed = json.dumps(
            [parent, title, description, date, next(self._commit_numbers), sorted((p, f.oid) for p, f in files.items())]
        )
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, description, date, files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict | None:
        """The tree entry of `path` (a file or a folder) in `commit`, None when it has neither."""
        if (f := commit.files.get(path)) is not None:
            entry = {"type": "file", "oid": f.oid, "size": len(f.content), "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.content), "pointerSize": len(f.pointer)}
        else:
            inside = _folder(commit, path)
            if not inside:
                return None
            # Not git's tree hash, but like it: it changes exactly when something below changes.
            entry = {"type": "directory", "oid": hashlib.sha1(repr(inside).encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            last = _last_change(repo, commit, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    # Routes; called with the lock held.

    def create_repo(self, request: Request) -> Reply:
        body = request.json({"name", "organization", "type", "private", "visibility"})
        if body.get("type", "model") != "dataset":
            raise UnknownRequest("only dataset repos")
        if not request.authorized:
            raise HubError(401, "You must be authenticated to create a repo")
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        url = f"{self.url}/datasets/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this dataset repo", url=url)
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        repo = self.repos[repo_id] = Repo(repo_id, private, now())
        self._add_commit(repo, "main", {".gitattributes": File(GITATTRIBUTES, lfs=False)}, "initial commit")
        return json_reply({"url": url, "name": repo_id})

    def validate_yaml(self, request: Request) -> Reply:
        content = request.json({"content", "repoType"})["content"]
        lines = content.splitlines()
        if not lines or lines[0].strip() != "---":
            return json_reply({"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]})
        if not any(line.strip() == "---" for line in lines[1:]):
            return json_reply(
                {"errors": [{"message": "The YAML front matter is not closed by a '---' line"}], "warnings": []}, 400
            )
        return json_reply({"errors": [], "warnings": []})

    def repo_info(self, request: Request) -> Reply:
        repo = self._repo(request)
        commit = self._commit_at(repo, request.args.get("rev", "main"))
        blobs = request.flag("blobs")
        siblings = []
        for path in sorted(commit.files):
            sibling = {"rfilename": path}
            if blobs:
                entry = self._entry(repo, commit, path, expand=False)
                sibling |= {"size": entry["size"], "blobId": entry["oid"]}
                if "lfs" in entry:
                    sibling["lfs"] = {
                        "sha256": entry["lfs"]["oid"],
                        "size": entry["size"],
                        "pointerSize": entry["lfs"]["pointerSize"],
                    }
            siblings.append(sibling)
        namespace = repo.repo_id.split("/")[0]
        return json_reply(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": namespace,
                "sha": commit.oid,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "createdAt": repo.created_at,
                "lastModified": commit.date,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": siblings,
            }
        )

    def list_refs(self, request: Request) -> Reply:
        repo = self._repo(request)

        def refs(names: dict[str, str], kind: str) -> list[dict]:
            return [{"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid} for name, oid in sorted(names.items())]

        data = {"branches": refs(repo.branches, "heads"), "tags": refs(repo.tags, "tags"), "converts": []}
        if request.flag("include_prs"):
            data["pullRequests"] = []
        return json_reply(data)

    def list_tree(self, request: Request) -> Reply:
        repo = self._repo(request)
        commit = self._commit_at(repo, request.args["rev"])
        folder = request.args.get("path", "").strip("/")
        inside = _folder(commit, folder)
        if not inside:
            raise HubError(404, f"{folder} does not exist on {request.args['rev']}", "EntryNotFound")
        paths = set()
        for rel in inside:
            parts = rel.split("/")
            depth = len(parts) if request.flag("recursive") else 1
            paths.update("/".join(parts[: i + 1]) for i in range(depth))
        prefix = f"{folder}/" if folder else ""
        expand = request.flag("expand")
        return json_reply([self._entry(repo, commit, prefix + p, expand) for p in sorted(paths)])

    def paths_info(self, request: Request) -> Reply:
        if request.headers.get_content_type() != "application/x-www-form-urlencoded":
            raise UnknownRequest("only form-encoded bodies")
        form = parse_qs(request.body.decode(), keep_blank_values=True)
        if unknown := set(form) - {"paths", "expand"}:
            raise UnknownRequest(f"form fields {sorted(unknown)}")
        repo = self._repo(request)
        commit = self._commit_at(repo, request.args["rev"])
        expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        entries = (self._entry(repo, commit, path.strip("/"), expand) for path in form.get("paths", []))
        return json_reply([entry for entry in entries if entry is not None])

    def preupload(self, request: Request) -> Reply:
        repo = self._repo(request, write=True)
        commit = self._commit_at(repo, request.args["rev"])
        answers = []
        for item in request.json({"files"})["files"]:
            path = item["path"]
            answer = {"path": path, "uploadMode": lfs_upload_mode(path, item["size"]), "shouldIgnore": False}
            if (existing := commit.files.get(path)) is not None:
                answer["oid"] = existing.etag  # lets the client skip files that did not change
            answers.append(answer)
        return json_reply({"files": answers})

    def lfs_batch(self, request: Request) -> Reply:
        repo = self._repo(request, write=True)
        body = request.json({"operation", "transfers", "objects", "hash_algo", "ref"})
        if (
            body["operation"] != "upload"
            or "basic" not in body.get("transfers", ["basic"])
            or body.get("hash_algo", "sha256") != "sha256"
        ):
            raise UnknownRequest("only basic sha256 uploads")
        objects = []
        for item in body["objects"]:
            oid, size = item["oid"], item["size"]
            answer = {"oid": oid, "size": size}
            if oid not in repo.lfs_objects:
                repo.lfs_announced[oid] = size
                answer["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{repo.repo_id}/{oid}"}}
            objects.append(answer)
        return json_reply({"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, request: Request) -> Reply:
        repo, oid = self.repos.get(request.args["repo"]), request.args["oid"]
        if repo is None or oid not in repo.lfs_announced:
            raise HubError(403, "This upload was not announced by the LFS batch API")
        if len(request.body) != repo.lfs_announced[oid] or hashlib.sha256(request.body).hexdigest() != oid:
            raise HubError(400, "The uploaded content does not match the announced size and sha256")
        repo.lfs_objects[oid] = request.body
        del repo.lfs_announced[oid]
        return Reply(200)

    def commit(self, request: Request) -> Reply:
        repo = self._repo(request, write=True)
        branch = request.args["rev"].removeprefix("refs/heads/")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        if (parent := header.get("parentCommit")) is not None and parent != repo.branches[branch]:
            raise HubError(412, STALE_PARENT)
        files = dict(repo.commits[repo.branches[branch]].files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"].strip("/")
            if key == "file":
                content = base64.b64decode(value["content"])
                if lfs_upload_mode(path, len(content)) == "lfs" and content:
                    raise HubError(400, f"{path} must be uploaded through LFS (preupload said so)")
                files[path] = File(content, lfs=False)
            elif key == "lfsFile":
                content = repo.lfs_objects.get(value["oid"])
                if content is None or len(content) != value["size"]:
                    raise HubError(422, f"LFS object {value['oid']} of {path} was not uploaded")
                files[path] = File(content, lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise UnknownRequest(f"commit operation {key!r}")
        commit = self._add_commit(repo, branch, files, header["summary"], header.get("description", ""))
        return json_reply(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.url}/datasets/{repo.repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None,
            }
        )

    def create_tag(self, request: Request) -> Reply:
        repo = self._repo(request, write=True)
        commit = self._commit_at(repo, request.args["rev"])
        tag = request.json({"tag", "message"})["tag"]
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.oid
        return json_reply({"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": commit.oid})

    def resolve(self, request: Request) -> Reply:
        repo = self._repo(request)
        commit = self._commit_at(repo, request.args["rev"])
        path = request.args["path"]
        f = commit.files.get(path)
        if f is None:
            # X-Repo-Commit lets huggingface_hub cache that the file is missing at this commit.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        size = len(f.content)
        if (header := request.headers.get("Range")) is None:
            return Reply(200, f.content, headers)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
        if match is None or match.groups() == ("", ""):
            raise UnknownRequest(f"Range {header!r}")
        first, last = match.groups()
        start, end = (size - int(last), size - 1) if not first else (int(first), min(int(last or size - 1), size - 1))
        if start < 0 or start > end:
            return Reply(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
        return Reply(206, f.content[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{size}"})


def _folder(commit: Commit, folder: str) -> dict[str, str]:
    """Path relative to `folder` ("" for the root) -> git oid, for every file below it."""
    prefix = f"{folder}/" if folder else ""
    return {p[len(prefix) :]: f.oid for p, f in sorted(commit.files.items()) if p.startswith(prefix)}


def _last_change(repo: Repo, commit: Commit, path: str) -> Commit:
    """The newest commit in `commit`'s history that changed `path` (a file or a folder)."""

    def state(c: Commit):
        return c.files[path].oid if path in c.files else _folder(c, path)

    current = state(commit)
    while commit.parent is not None and state(parent := repo.commits[commit.parent]) == current:
        commit = parent
    return commit


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # the clients keep connections alive in a pool
    server: _HTTPServer

    def _serve(self):
        reply = self.server.hub.handle(self.command, self.path, self.headers, self._read_body())
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        chunks = []
        while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def log_message(self, format, *args):  # the test output stays clean
        pass


def hub_env(server: HubServer, cache_dir: str | Path) -> dict[str, str]:
    """Environment for a subprocess (the synthforge CLI) to use `server`, with its caches under `cache_dir`:
    `subprocess.run(..., env={**os.environ, **hub_env(server, cache_dir)})`."""
    cache_dir = Path(cache_dir)
    return {
        "HF_ENDPOINT": server.url,
        "HF_TOKEN": server.token,
        # With hf_xet installed, files the server marks "lfs" would go through Xet, which this server lacks.
        "HF_HUB_DISABLE_XET": "1",
        # Telemetry and agent detection call the endpoint; the download count is a HEAD to S3.
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "HF_HOME": str(cache_dir),
        "HF_HUB_CACHE": str(cache_dir / "hub"),
        "HF_DATASETS_CACHE": str(cache_dir / "datasets"),
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
    }


@contextlib.contextmanager
def use_hub(server: HubServer, cache_dir: str | Path):
    """Make huggingface_hub and datasets in this process use `server`, with their caches under `cache_dir`."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    env = hub_env(server, cache_dir)
    datasets_cache = Path(env["HF_DATASETS_CACHE"])
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)  # the token is read from HF_TOKEN at each call
        # Both libraries read the rest of their settings at import.
        for name, value in {
            "ENDPOINT": server.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_OFFLINE": False,
            "HF_HOME": env["HF_HOME"],
            "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        }.items():
            mp.setattr(hub_constants, name, value)
        for name, value in {
            "HF_ENDPOINT": server.url,
            "HUB_DATASETS_URL": server.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_HUB_OFFLINE": False,
            "HF_DATASETS_OFFLINE": False,
            "HF_UPDATE_DOWNLOAD_COUNTS": False,
            "HF_DATASETS_CACHE": datasets_cache,
            "DOWNLOADED_DATASETS_PATH": datasets_cache / "downloads",
            "EXTRACTED_DATASETS_PATH": datasets_cache / "downloads" / "extracted",
        }.items():
            mp.setattr(datasets.config, name, value)
        yield


@pytest.fixture(scope="session")
def hub_server():
    """A HubServer on 127.0.0.1 for the session; tests tell their repos apart by name."""
    with HubServer() as server:
        yield server


@pytest.fixture
def hub_client(hub_server, tmp_path):
    """An `HfApi` for `hub_server`; huggingface_hub and datasets in this process use the server during the test."""
    from huggingface_hub import HfApi

    with use_hub(hub_server, tmp_path / "hf"):
        yield HfApi()
