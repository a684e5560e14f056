"""The test Hub server against the real clients: huggingface_hub publishes to it and datasets loads from it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_server import HubServer, hub_env
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
---
# A tiny dataset
"""

V1 = {"train": [{"text": "one", "label": 1}, {"text": "two", "label": 2}], "test": [{"text": "three", "label": 3}]}
V2 = {"train": [{"text": "four", "label": 4}], "test": [{"text": "five", "label": 5}, {"text": "six", "label": 6}]}


def parquet(rows: list[dict]) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def main_head(api, repo_id: str) -> str:
    return next(b.target_commit for b in api.list_repo_refs(repo_id, repo_type="dataset").branches if b.name == "main")


def publish(
    api, repo_id: str, version: str, rows: dict[str, list[dict]], extra: dict[str, bytes] | None = None, delete=()
) -> str:
    """One commit for the whole version on the current head of main, then its tag, as synthforge publishes."""
    head = main_head(api, repo_id)
    files = {
        "README.md": README.encode(),
        "synthforge.json": json.dumps({"version": version, "counts": {s: len(r) for s, r in rows.items()}}).encode(),
        **{f"data/{split}-00000-of-00001.parquet": parquet(split_rows) for split, split_rows in rows.items()},
        **(extra or {}),
    }
    operations = [CommitOperationAdd(path, content) for path, content in files.items()]
    operations += [CommitOperationDelete(path) for path in delete]
    info = api.create_commit(repo_id, operations, commit_message=f"Publish {version}", repo_type="dataset", parent_commit=head)
    api.create_tag(repo_id, tag=f"v{version}", revision=info.oid, repo_type="dataset")
    return info.oid


@pytest.fixture
def repo_id(hub_client, request) -> str:
    """A private dataset repo of its own for each test."""
    repo_id = f"tests/{request.node.name}"
    hub_client.create_repo(repo_id, repo_type="dataset", private=True)
    return repo_id


def test_create_repo_twice_with_exist_ok_and_privacy_is_enforced(hub_client, hub_server):
    url = hub_client.create_repo("tests/private", repo_type="dataset", private=True)
    assert hub_client.create_repo("tests/private", repo_type="dataset", private=True, exist_ok=True) == url
    assert url.repo_id == "tests/private" and url.repo_type == "dataset"
    with pytest.raises(HfHubHTTPError) as conflict:
        hub_client.create_repo("tests/private", repo_type="dataset")
    assert conflict.value.response.status_code == 409
    hub_client.create_repo("tests/public", repo_type="dataset")
    assert hub_server.repos["tests/private"].private and not hub_server.repos["tests/public"].private

    anonymous, impostor = HfApi(token=False), HfApi(token="hf_not_the_token")
    with pytest.raises(RepositoryNotFoundError):
        anonymous.list_repo_refs("tests/private", repo_type="dataset")
    assert [b.name for b in anonymous.list_repo_refs("tests/public", repo_type="dataset").branches] == ["main"]
    with pytest.raises(HfHubHTTPError) as refused:
        impostor.list_repo_refs("tests/public", repo_type="dataset")
    assert refused.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as anonymous_write:  # writing needs the token, even to a public repo
        anonymous.create_tag("tests/public", tag="v0", repo_type="dataset")
    assert anonymous_write.value.response.status_code == 401
    assert hub_server.unknown_requests == []


def test_commit_tag_and_refs(hub_client, hub_server, repo_id):
    initial = main_head(hub_client, repo_id)
    oid = publish(hub_client, repo_id, "1.0.0", V1, extra={"notes.txt": b"first"})

    commits = hub_server.commits(repo_id)
    assert [c.oid for c in commits] == [oid, initial] and commits[0].title == "Publish 1.0.0"
    files = commits[0].files
    assert set(files) == {
        ".gitattributes",
        "README.md",
        "synthforge.json",
        "notes.txt",
        "data/train-00000-of-00001.parquet",
        "data/test-00000-of-00001.parquet",
    }
    assert files["data/train-00000-of-00001.parquet"].lfs and not files["README.md"].lfs
    assert pq.read_table(pa.BufferReader(files["data/test-00000-of-00001.parquet"].content)).to_pylist() == V1["test"]
    assert hub_server.tags(repo_id) == {"v1.0.0": oid}

    late = [CommitOperationAdd("late.txt", b"late")]
    with pytest.raises(HfHubHTTPError) as stale:  # someone else published since `initial`
        hub_client.create_commit(repo_id, late, commit_message="late", repo_type="dataset", parent_commit=initial)
    assert stale.value.response.status_code == 412
    with pytest.raises(HfHubHTTPError) as again:
        hub_client.create_tag(repo_id, tag="v1.0.0", revision=initial, repo_type="dataset")
    assert again.value.response.status_code == 409
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        hub_client.create_commit(
            repo_id, [CommitOperationAdd("README.md", b"---\nlicense: mit\n")], commit_message="bad card", repo_type="dataset"
        )
    assert [c.oid for c in hub_server.commits(repo_id)] == [oid, initial]

    refs = hub_client.list_repo_refs(repo_id, repo_type="dataset")
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1.0.0", "refs/tags/v1.0.0", oid)]
    assert hub_client.dataset_info(repo_id, revision="v1.0.0").sha == oid
    assert hub_server.unknown_requests == []


def test_each_tag_loads_its_own_rows(hub_client, hub_server, repo_id):
    import datasets

    publish(hub_client, repo_id, "1.0.0", V1)
    publish(hub_client, repo_id, "2.0.0", V2)
    for tag, rows in [("v1.0.0", V1), ("v2.0.0", V2)]:
        loaded = datasets.load_dataset(repo_id, revision=tag)
        assert {split: loaded[split].to_list() for split in loaded} == rows
    assert hub_server.unknown_requests == []


def test_downloads_at_a_tag(hub_client, hub_server, repo_id, tmp_path):
    v1 = publish(hub_client, repo_id, "1.0.0", V1, extra={"notes.txt": b"first"})
    publish(hub_client, repo_id, "2.0.0", V2, delete=["notes.txt"])

    path = hf_hub_download(repo_id, "synthforge.json", repo_type="dataset", revision="v1.0.0")
    assert json.loads(Path(path).read_text())["version"] == "1.0.0"
    folder = snapshot_download(repo_id, repo_type="dataset", revision="v1.0.0")
    on_disk = {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
    assert on_disk == hub_server.files(repo_id, "v1.0.0") and "notes.txt" not in hub_server.files(repo_id, "v2.0.0")

    # A resumed download asks for a byte range; refs may come spelled out and URL-encoded.
    url = f"{hub_server.url}/datasets/{repo_id}/resolve/refs%2Ftags%2Fv1.0.0/notes.txt"
    ranged = urllib.request.Request(url, headers={"Authorization": f"Bearer {hub_server.token}", "Range": "bytes=2-"})
    with urllib.request.urlopen(ranged) as response:
        assert (response.status, response.read(), response.headers["X-Repo-Commit"]) == (206, b"rst", v1)

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(
            repo_id, "synthforge.json", repo_type="dataset", revision="v1.0.0", token=False, cache_dir=tmp_path / "anonymous"
        )
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(url)
    assert (anonymous.value.code, anonymous.value.headers["X-Error-Code"]) == (401, "RepoNotFound")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).dataset_info(repo_id, revision="v1.0.0")
    assert hub_server.unknown_requests == []


def test_concurrent_commits_on_the_same_parent_only_one_wins(hub_client, hub_server, repo_id):
    parent = main_head(hub_client, repo_id)
    outcomes = []

    def commit(n: int):
        try:
            hub_client.create_commit(
                repo_id,
                [CommitOperationAdd(f"part-{n}.txt", b"%d" % n)],
                commit_message=f"writer {n}",
                repo_type="dataset",
                parent_commit=parent,
            )
            outcomes.append("committed")
        except HfHubHTTPError as e:
            outcomes.append(e.response.status_code)

    writers = [threading.Thread(target=commit, args=(n,)) for n in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert sorted(outcomes, key=str) == [412, 412, 412, "committed"]
    winner, *older = hub_server.commits(repo_id)
    assert [c.oid for c in older] == [parent] and len([p for p in winner.files if p.startswith("part-")]) == 1
    assert hub_server.unknown_requests == []


def test_hub_env_lets_a_subprocess_download_with_its_own_cache(hub_client, hub_server, repo_id, tmp_path):
    publish(hub_client, repo_id, "1.0.0", V1)
    script = (
        "import sys; from huggingface_hub import hf_hub_download\n"
        "print(open(hf_hub_download(sys.argv[1], 'synthforge.json', repo_type='dataset', revision='v1.0.0')).read())"
    )
    env = {**os.environ, **hub_env(hub_server, tmp_path / "cli")}
    done = subprocess.run([sys.executable, "-c", script, repo_id], env=env, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["version"] == "1.0.0"
    assert list((tmp_path / "cli" / "hub").glob("datasets--tests--*/snapshots/*/synthforge.json"))
    assert hub_server.unknown_requests == []


def test_unknown_requests_fail_and_are_recorded():
    with HubServer() as server:
        auth = {"Authorization": f"Bearer {server.token}"}
        for method, target, body in [
            ("GET", "/api/whoami-v2", None),
            ("POST", "/api/repos/create", json.dumps({"name": "m", "type": "model"}).encode()),
            ("POST", "/api/repos/create?region=eu", json.dumps({"name": "d", "type": "dataset"}).encode()),
        ]:
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(server.url + target, data=body, method=method, headers=auth))
            assert refused.value.code == 501 and target in json.load(refused.value)["error"]
        assert server.unknown_requests == ["GET /api/whoami-v2", "POST /api/repos/create", "POST /api/repos/create?region=eu"]
        assert server.requests == ["GET /api/whoami-v2", "POST /api/repos/create", "POST /api/repos/create"]
        assert server.repos == {}
