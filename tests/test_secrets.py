"""Secrets: the Hugging Face token a publish uses reaches no file, output, log record or error message.

Publishes run against the Hub-API server of the tests (tests/hub_server.py) on 127.0.0.1, with the token in HF_TOKEN
and, once, in a token file (the `hf auth login` route: synthforge has no token option or params key of its own), with
logging at DEBUG and huggingface_hub's request dumps (HF_DEBUG) on. Publishes that fail (a token the server does not
know, a commit it refuses) cover the error paths. Then every place the publishes could write is searched for the
token: the project, the local registry (its git objects decompressed), the caches and temporary folder, the published
repository on the server, and Parquet files decoded, since their pages are compressed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import string
import subprocess
import sys
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import read_rows
from hub_server import HubError, HubServer, hub_env, use_hub

REPO = "acme/secret-evalset"
# The CLI as a user runs it, with every library's logging at DEBUG on stderr.
DEBUG_CLI = (
    "import logging, sys;"
    "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format='%(name)s %(levelname)s %(message)s');"
    "sys.argv[0] = 'synthforge';"
    "from synthforge.cli import main; main()"
)


def new_token() -> str:
    return "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(32))


@pytest.fixture(scope="module")
def world(tmp_path_factory, rules_project):
    """A rules-only text project, a Hub server that knows one token, and folders for everything a publish writes."""
    root = tmp_path_factory.mktemp("secrets")
    project = root / "evalset"
    shutil.copytree(rules_project, project, symlinks=True)
    token = new_token()
    server = HubServer()
    server.token = token
    with server:
        yield {"root": root, "project": project, "server": server, "token": token}


def run(world: dict, *args: str, auth: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The debug-logging CLI in the project, with caches, home and temporary files under the world's root. `auth`: the
    variables that give the token (default: HF_TOKEN set to the one the server knows)."""
    root = world["root"]
    for folder in ("home", "tmp", "sfcache"):
        (root / folder).mkdir(exist_ok=True)
    env = {
        **os.environ,
        **hub_env(world["server"], root / "hf"),
        "HF_DEBUG": "1",
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "SYNTHFORGE_CACHE": str(root / "sfcache"),
        "SYNTHFORGE_REGISTRY": str(root / "registry"),
    }
    env.pop("HF_TOKEN")
    env.update({"HF_TOKEN": world["token"]} if auth is None else auth)
    return subprocess.run([sys.executable, "-c", DEBUG_CLI, *args], cwd=world["project"], env=env, capture_output=True, text=True)


def write_split(project: Path, out: Path, rows: list[dict]) -> None:
    from synthforge.stagedir import StageInput, StageWriter

    source = StageInput.open(project / "data" / "split")
    with StageWriter(out, "split", source.schema, source.info) as writer:
        writer.write(rows)


def readable(name: str, data: bytes) -> list[bytes]:
    """The bytes of a file, and for Parquet its decoded rows and metadata too (its pages are compressed)."""
    forms = [data]
    if name.endswith(".parquet") and data:
        table = pq.read_table(pa.BufferReader(data))
        forms.append(json.dumps(table.to_pylist(), default=str, ensure_ascii=False).encode())
        forms.append(str(table.schema.metadata).encode())
    return forms


def files_under(folder: Path, skip: set[Path] = frozenset()) -> dict[str, list[bytes]]:
    """Every file under folder, and every object of each git repository there, decompressed."""
    out: dict[str, list[bytes]] = {}
    for path in sorted(folder.rglob("*")):
        if path in skip or not path.is_file():
            continue
        if path.name == "HEAD" and (path.parent / "objects").is_dir():  # a git repository: every object, inflated
            objects = subprocess.run(
                ["git", "--git-dir", str(path.parent), "cat-file", "--batch-all-objects", "--batch"],
                capture_output=True,
                check=True,
            ).stdout
            out[f"{path.parent} (git objects)"] = [objects]
        out[str(path)] = readable(path.name, path.read_bytes())
    return out


def server_storage(server: HubServer) -> dict[str, list[bytes]]:
    """Every file of every commit on the server, uploaded LFS objects and commit messages."""
    out: dict[str, list[bytes]] = {}
    for repo_id, repo in server.repos.items():
        for commit in repo.commits.values():
            out[f"{repo_id}@{commit.oid} message"] = [f"{commit.title}\n{commit.description}".encode()]
            for path, f in commit.files.items():
                out[f"{repo_id}@{commit.oid}:{path}"] = readable(path, f.content)
        for oid, content in repo.lfs_objects.items():
            out[f"{repo_id} lfs {oid}"] = [content]
    return out


def assert_nowhere(secret: str, places: dict[str, list[bytes]]) -> None:
    leaks = [name for name, forms in places.items() if any(secret.encode() in form for form in forms)]
    assert not leaks, f"the token is in {leaks}"


def test_the_token_is_in_no_file_output_or_message_after_publishes_that_succeed_and_fail(world, monkeypatch):
    token, server, project, root = world["token"], world["server"], world["project"], world["root"]
    outputs = {}

    first = run(world, "publish", "--to", f"hf://{REPO}", "--private")
    assert first.returncode == 0, first.stderr
    assert "authenticated: True" in first.stderr and "authorization: <TOKEN>" in first.stderr  # DEBUG logging was on
    outputs["publish"] = first
    outputs["publish again"] = run(world, "publish", "--to", f"hf://{REPO}")
    assert "already published" in outputs["publish again"].stdout
    outputs["versions"] = run(world, "versions", f"hf://{REPO}")
    assert outputs["versions"].returncode == 0, outputs["versions"].stderr

    # A token the server does not know: refused, and that token is a secret too.
    wrong = new_token()
    outputs["wrong token"] = run(world, "publish", "--to", "hf://acme/other", auth={"HF_TOKEN": wrong})
    assert outputs["wrong token"].returncode != 0 and "Traceback" not in outputs["wrong token"].stderr

    # The server refuses the commit of a new version.
    rows = read_rows(project / "data" / "split")
    write_split(project, root / "split-v2", rows[1:])

    def refuse(request):
        raise HubError(403, "Forbidden: this token may not write to acme")

    monkeypatch.setattr(server, "commit", refuse)
    outputs["refused commit"] = run(world, "publish", "--to", f"hf://{REPO}", "--data", str(root / "split-v2"))
    assert outputs["refused commit"].returncode != 0 and "HTTP 403" in outputs["refused commit"].stderr
    monkeypatch.undo()

    # The `hf auth login` route: the token in a file, not in the environment.
    token_file = root / "secret" / "token"
    token_file.parent.mkdir()
    token_file.write_text(token)
    outputs["token file"] = run(
        world, "publish", "--to", f"hf://{REPO}", "--data", str(root / "split-v2"), auth={"HF_TOKEN_PATH": str(token_file)}
    )
    assert outputs["token file"].returncode == 0, outputs["token file"].stderr
    assert list(server.tags(REPO)) == ["v1.0.0", "v2.0.0"]

    # A local publish with the token set: searched in the registry's git objects.
    outputs["local"] = run(world, "publish", "--name", "evalset")
    assert outputs["local"].returncode == 0, outputs["local"].stderr

    for name, proc in outputs.items():
        for secret in (token, wrong):
            assert secret not in proc.stdout + proc.stderr, f"{name} printed a token"

    places = files_under(root, skip={token_file}) | server_storage(server)
    published = {name.rsplit(":", 1)[-1] for name in places if name.startswith(f"{REPO}@")}
    assert {"README.md", "synthforge.json", "croissant.json", "provenance/manifest.parquet"} <= published
    assert any("registry" in name and "git objects" in name for name in places)
    assert any(name.startswith(str(root / "hf")) for name in places)  # the HF cache was written, and searched
    for secret in (token, wrong):
        assert_nowhere(secret, places)


def test_the_token_is_in_no_log_record_or_exception_in_process(world, tmp_path, caplog):
    """The library route: log records at DEBUG, and every exception of a failed publish with its whole chain."""
    import huggingface_hub.utils.logging  # noqa: F401 - sets its logger to WARNING on import: set DEBUG after it

    from synthforge.errors import SynthforgeError
    from synthforge.project import publish_and_describe

    server, project = world["server"], world["project"]
    wrong = new_token()
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    with use_hub(server, tmp_path / "hf"):
        publish_and_describe({}, project / "data" / "split", None, None, None, project, to="hf://acme/in-process")
        os.environ["HF_TOKEN"] = wrong  # use_hub restores it
        with pytest.raises(SynthforgeError) as failed:
            publish_and_describe({}, project / "data" / "split", None, None, None, project, to="hf://acme/in-process-2")
    assert "acme/in-process" in server.repos and any("authenticated: True" in r.getMessage() for r in caplog.records)

    texts = [r.getMessage() for r in caplog.records]
    texts += ["".join(traceback.format_exception(r.exc_info[1])) for r in caplog.records if r.exc_info]
    chain, exc = [], failed.value
    while exc is not None:  # __context__ too: `raise ... from None` hides it from tracebacks, not from code
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    texts += [f"{e}\n{e!r}\n{e.args!r}" for e in chain]
    texts += ["".join(traceback.format_exception(failed.value))]
    for secret in (world["token"], wrong):
        assert not [t for t in texts if secret in t]
    assert_nowhere(world["token"], files_under(tmp_path))


def test_no_option_or_params_key_takes_the_token(world):
    """The token only comes from huggingface_hub's own places (HF_TOKEN, the token file), so it cannot end up in
    params.yaml, which is versioned and published in synthforge.json, or in a shell history."""
    assert "--token" not in run(world, "publish", "--help").stdout
    schema = json.loads((Path(__file__).resolve().parents[1] / "schemas" / "params.schema.json").read_text())
    assert "token" not in json.dumps(schema["properties"]["publish"]).lower()
