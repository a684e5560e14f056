"""Publishing to the Hugging Face Hub: through the CLI against the Hub-API server the tests start on 127.0.0.1
(tests/hub_server.py), and once against the real Hub when a token for it is given (opt-in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import cli, read_manifest, read_rows
from hub_server import hub_env, use_hub

REPO = "acme/evalset"
TARGET = f"hf://{REPO}"


@pytest.fixture(scope="module")
def hub(hub_server, project, tmp_path_factory):
    """evalset 1.0.0 published to the Hub from the session project through the CLI."""
    cache = tmp_path_factory.mktemp("hf")
    env = hub_env(hub_server, cache)
    first = cli("publish", "--to", TARGET, "--private", cwd=project, env=env)
    assert first.returncode == 0, first.stderr
    return {"server": hub_server, "env": env, "cache": cache, "first": first}


def python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)


def test_a_version_is_one_commit_and_a_tag_on_a_private_repo(hub):
    server = hub["server"]
    assert "published hf://acme/evalset v1.0.0" in hub["first"].stdout
    assert server.repos[REPO].private
    tags = server.tags(REPO)
    assert list(tags) == ["v1.0.0"]
    head = server.commits(REPO)[0]
    assert tags["v1.0.0"] == head.oid and head.title == "hf://acme/evalset v1.0.0"
    files = set(server.files(REPO, "v1.0.0"))
    for needed in ("README.md", "synthforge.json", "croissant.json", "advisories.json", "provenance/manifest.parquet"):
        assert needed in files
    assert any(f.startswith("data/train-") and f.endswith(".parquet") for f in files)
    assert server.unknown_requests == []


def test_training_code_loads_the_version_with_plain_datasets(hub, project):
    code = (
        "import datasets, json;"
        f"ds = datasets.load_dataset({REPO!r}, revision='v1.0.0');"
        "print(json.dumps({s: sorted(ds[s]['sample_id']) for s in ds}))"
    )
    out = python(code, hub["env"])
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    expected: dict[str, list[str]] = {}
    for row in read_rows(project / "data" / "split"):
        expected.setdefault(row["provenance"]["split"], []).append(row["sample_id"])
    assert loaded == {s: sorted(ids) for s, ids in expected.items()}
    assert hub["server"].unknown_requests == []


def test_the_card_tells_how_to_load_from_the_hub(hub):
    card = hub["server"].files(REPO, "v1.0.0")["README.md"].decode()
    assert f'datasets.load_dataset("{REPO}", revision="v1.0.0")' in card
    assert "load it with: datasets.load_dataset" in hub["first"].stdout


def test_the_same_version_again_is_a_no_op_and_other_content_is_refused(hub, project, tmp_path):
    server = hub["server"]
    commits = len(server.commits(REPO))
    again = cli("publish", "--to", TARGET, cwd=project, env=hub["env"])
    assert again.returncode == 0 and "already published" in again.stdout
    assert len(server.commits(REPO)) == commits
    other = tmp_path / "split"
    rows = read_rows(project / "data" / "split")
    _write_split(project, other, rows[1:])
    refused = cli("publish", "--to", TARGET, "--version", "1.0.0", "--data", str(other), cwd=project, env=hub["env"])
    assert refused.returncode == 2 and "v1.0.0 already exists" in refused.stderr
    assert len(server.commits(REPO)) == commits and list(server.tags(REPO)) == ["v1.0.0"]


def _write_split(project: Path, out: Path, rows: list[dict]) -> None:
    from synthforge.stagedir import StageInput, StageWriter

    source = StageInput.open(project / "data" / "split")
    with StageWriter(out, "split", source.schema, source.info) as writer:
        writer.write(rows)


def test_a_concurrent_publish_is_detected_and_loses_nothing(hub, project, tmp_path, monkeypatch):
    """Someone else's commit lands between our read of main and our commit: the Hub answers 412, we report it,
    and neither their commit nor any tag of ours appears."""
    from synthforge.hub import HubDataset
    from synthforge.registry import ConcurrentPublish
    from synthforge.release import from_split_stage
    from synthforge.versions import publish

    server = hub["server"]
    rows = read_rows(project / "data" / "split")
    _write_split(project, tmp_path / "split", rows[:-1])
    with use_hub(server, tmp_path / "hf"):
        store = HubDataset(REPO)
        stale = store.head()
        store.api.upload_file(path_or_fileobj=b"theirs\n", path_in_repo="NOTES.md", repo_id=REPO, repo_type="dataset")
        theirs = server.commits(REPO)[0].oid
        monkeypatch.setattr(store, "head", lambda: stale)
        content = from_split_stage(tmp_path / "split", {}, project)
        with pytest.raises(ConcurrentPublish, match="main moved during publish of v2.0.0"):
            publish(store, content, project=project)
    assert server.commits(REPO)[0].oid == theirs and "NOTES.md" in server.files(REPO)
    assert "v2.0.0" not in server.tags(REPO)


def test_diff_quarantine_and_load_work_on_the_hub_too(hub, project, tmp_path):
    """A quarantine on a Hub dataset publishes the clean MAJOR version there; loading the old one warns."""
    env = hub["env"]
    manifest = read_manifest(project / "data" / "split")
    batch = sorted(
        {m["provenance"]["generation"]["batch_id"] for m in manifest if m["provenance"]["generation"]["method"] == "template"}
    )[0]
    repo = f"acme/quarantine-{uuid.uuid4().hex[:6]}"
    assert cli("publish", "--to", f"hf://{repo}", cwd=project, env=env).returncode == 0
    out = cli("quarantine", f"hf://{repo}", "--batch", batch, "--reason", "bad batch", cwd=project, env=env)
    assert out.returncode == 0, out.stderr
    assert list(hub["server"].tags(repo)) == ["v1.0.0", "v2.0.0"]
    diff = cli("diff", f"hf://{repo}", "1.0.0", "2.0.0", "--json", cwd=project, env=env)
    assert diff.returncode == 0, diff.stderr
    removed = json.loads(diff.stdout)["removed"]
    assert removed and all(m["provenance"]["generation"]["batch_id"] == batch for m in manifest if m["sample_id"] in removed[:1])
    code = (
        "import warnings, synthforge;"
        "warnings.simplefilter('always');"
        f"ds = synthforge.load('hf://{repo}', '1.0.0');"
        "print(sum(ds[s].num_rows for s in ds))"
    )
    loaded = python(code, env)
    assert loaded.returncode == 0, loaded.stderr
    assert "1.0.0 is quarantined: bad batch" in loaded.stderr and "clean version is 2.0.0" in loaded.stderr
    assert hub["server"].unknown_requests == []


def test_the_token_reaches_no_output_and_no_published_file(hub):
    token = hub["server"].token
    assert token not in hub["first"].stdout + hub["first"].stderr
    for repo in hub["server"].repos:
        for content in hub["server"].files(repo).values():
            assert token.encode() not in content


def test_a_wrong_token_is_a_clear_error_without_the_token(hub, project):
    env = {**hub["env"], "HF_TOKEN": "hf_wrongwrongwrong"}
    out = cli("publish", "--to", "hf://acme/other", cwd=project, env=env)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "hf://acme/other" in out.stderr and "hf_wrongwrongwrong" not in out.stderr


@pytest.mark.skipif(
    not (os.environ.get("SYNTHFORGE_HUB_TEST_REPO") and os.environ.get("HF_TOKEN")),
    reason="opt-in: set HF_TOKEN and SYNTHFORGE_HUB_TEST_REPO=ORG/NAME (a private repo it may create and delete)",
)
def test_publish_and_load_on_the_real_hub(project):
    """Against huggingface.co: publish a private version, load it back with plain datasets, delete the repo."""
    from huggingface_hub import HfApi

    repo = f"{os.environ['SYNTHFORGE_HUB_TEST_REPO']}-{uuid.uuid4().hex[:6]}"
    env = {"HF_HUB_DISABLE_XET": "1", "HF_ENDPOINT": "https://huggingface.co"}
    try:
        out = cli("publish", "--to", f"hf://{repo}", "--private", cwd=project, env=env)
        assert out.returncode == 0, out.stderr
        code = f"import datasets; ds = datasets.load_dataset({repo!r}, revision='v1.0.0'); print(sum(ds[s].num_rows for s in ds))"
        loaded = python(code, env)
        assert loaded.returncode == 0, loaded.stderr
        assert int(loaded.stdout.split()[-1]) == len(read_rows(project / "data" / "split"))
    finally:
        HfApi().delete_repo(repo, repo_type="dataset", missing_ok=True)


def test_trace_by_text_reaches_the_versions_on_the_hub(hub, project):
    row = read_rows(project / "data" / "split")[0]
    out = cli(
        "trace",
        "--text",
        row["prompt"],
        "--hub",
        TARGET,
        "--json",
        "--registry",
        str(hub["cache"] / "none"),
        cwd=project,
        env=hub["env"],
    )
    assert out.returncode == 0, out.stderr
    found = {s["sample_id"]: s for s in json.loads(out.stdout)["samples"]}
    assert f"{TARGET} v1.0.0 {row['provenance']['split']}" in found[row["sample_id"]]["published"]
