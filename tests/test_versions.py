"""Versions people trust, through the CLI on a real pipeline run: semver proposed from the diff, `diff`,
`quarantine` (a MAJOR release without the affected samples, earlier versions marked), and `report`."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
from conftest import cli, read_manifest, read_rows

import synthforge
from synthforge.errors import BadInput
from synthforge.registry import Registry
from synthforge.stagedir import StageInput, StageWriter, stage_fingerprint
from synthforge.versions import QuarantinedVersionWarning

NAME = "evalset"


def write_split(project: Path, rows: list[dict]) -> None:
    """Replace the project's split stage with `rows`, as if the pipeline had produced them (same lineage)."""
    source = StageInput.open(project / "data" / "split")
    info = source.info
    with StageWriter(
        project / "data" / "split", "split", source.schema, stage_fingerprint("split", info["params"], info["inputs"])
    ) as w:
        w.write(rows)


@pytest.fixture(scope="module")
def workdir(project, tmp_path_factory) -> Path:
    """A copy of the session project this module may change, with its own registry."""
    copy = tmp_path_factory.mktemp("versions") / "evalset"
    shutil.copytree(project, copy, symlinks=True)
    return copy


def publish(workdir: Path, *args: str):
    return cli("publish", "--name", NAME, "--registry", str(workdir / "registry"), *args, cwd=workdir)


@pytest.fixture(scope="module")
def history(workdir) -> dict:
    """1.0.0: the run minus its last 5 test samples; then the full run (additions only); then one prompt edited."""
    full = read_rows(workdir / "data" / "split")
    held_back = [r["sample_id"] for r in full if r["provenance"]["split"] == "test"][-5:]
    write_split(workdir, [r for r in full if r["sample_id"] not in held_back])
    first = publish(workdir)
    write_split(workdir, full)
    second = publish(workdir)
    again = publish(workdir)
    edited = [dict(r) for r in full]
    edited[0]["prompt"] = edited[0]["prompt"] + " (edited)"
    write_split(workdir, edited)
    refused = publish(workdir, "--version", "1.1.1")
    third = publish(workdir)
    return {
        "full": full,
        "held_back": held_back,
        "edited": edited[0]["sample_id"],
        "runs": {"first": first, "second": second, "again": again, "refused": refused, "third": third},
    }


def test_publish_without_a_version_proposes_it_from_the_diff(history):
    runs = history["runs"]
    for key in ("first", "second", "again", "third"):
        assert runs[key].returncode == 0, runs[key].stderr
    assert "first version -> 1.0.0" in runs["first"].stdout
    assert re.search(r"against 1\.0\.0: 5 added, a MINOR release -> 1\.1\.0", runs["second"].stdout)
    assert "already published with this exact content" in runs["again"].stdout
    assert re.search(r"against 1\.1\.0: 1 changed, a MAJOR release -> 2\.0\.0", runs["third"].stdout)


def test_a_version_that_understates_the_change_is_refused_naming_the_right_one(history, workdir):
    refused = history["runs"]["refused"]
    assert refused.returncode == 2
    assert "1.1.1 would be a patch release" in refused.stderr and "the next version is 2.0.0" in refused.stderr
    assert [v.version for v in Registry(workdir / "registry").versions(NAME)] == ["1.0.0", "1.1.0", "2.0.0"]


def test_diff_names_added_changed_and_moved_samples(history, workdir):
    out = cli("diff", NAME, "1.0.0", "2.0.0", "--json", "--registry", str(workdir / "registry"), cwd=workdir)
    assert out.returncode == 0, out.stderr
    diff = json.loads(out.stdout)
    assert sorted(diff["added"]) == sorted(history["held_back"])
    assert diff["changed"] == [history["edited"]] and diff["removed"] == [] and diff["bump"] == "major"
    split_shift = {row["value"]: row for row in diff["shifts"]["split"]}
    assert split_shift["test"]["new"] - split_shift["test"]["old"] == 5
    table = cli("diff", NAME, "1.0.0", "1.1.0", "--registry", str(workdir / "registry"), cwd=workdir)
    assert table.returncode == 0, table.stderr
    assert "5 added" in table.stdout.replace("  ", " ") or "added" in table.stdout
    for dimension in ("difficulty", "generator", "prompt"):
        assert dimension in table.stdout.lower()


def test_the_changelog_travels_with_every_version(history, workdir):
    registry = Registry(workdir / "registry")
    meta = json.loads((registry.checkout(NAME, registry.version(NAME, "2.0.0").commit) / "synthforge.json").read_text())
    assert [e["version"] for e in meta["changelog"]] == ["1.0.0", "1.1.0", "2.0.0"]
    assert meta["changelog"][1]["bump"] == "minor" and meta["changelog"][1]["diff"]["added"] == 5
    assert meta["changelog"][2]["diff"]["changed"] == 1


@pytest.fixture(scope="module")
def quarantined(history, workdir) -> dict:
    """Quarantine the template batch of the edited sample: 3.0.0 is published without it and its descendants."""
    registry = Registry(workdir / "registry")
    latest = registry.version(NAME, "2.0.0")
    manifest = read_manifest(registry.checkout(NAME, latest.commit) / "provenance")
    batches = sorted(
        {m["provenance"]["generation"]["batch_id"] for m in manifest if m["provenance"]["generation"]["method"] == "template"}
    )
    batch = batches[0]
    out = cli(
        "quarantine",
        NAME,
        "--batch",
        batch,
        "--reason",
        "template leaked the answer",
        "--registry",
        str(workdir / "registry"),
        cwd=workdir,
    )
    return {"batch": batch, "out": out, "manifest": manifest}


def _descendants(project: Path, roots: set[str]) -> set[str]:
    generated = read_manifest(project / "data" / "generated")
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {m["sample_id"] for m in generated if set(m["provenance"]["generation"]["parent_ids"]) & frontier} - found
        found |= frontier
    return found


def test_quarantine_publishes_the_next_major_version_without_the_batch_and_its_descendants(quarantined, workdir):
    out = quarantined["out"]
    assert out.returncode == 0, out.stderr
    registry = Registry(workdir / "registry")
    assert [v.version for v in registry.versions(NAME)][-1] == "3.0.0"
    in_batch = {
        m["sample_id"]
        for m in read_manifest(workdir / "data" / "generated")
        if m["provenance"]["generation"]["batch_id"] == quarantined["batch"]
    }
    affected = _descendants(workdir, in_batch)
    before = {m["sample_id"] for m in quarantined["manifest"]}
    clean = read_manifest(registry.checkout(NAME, registry.version(NAME, "3.0.0").commit) / "provenance")
    after = {m["sample_id"] for m in clean}
    assert before & affected, "the batch must have published samples for this test to mean anything"
    assert after == before - affected
    assert "3.0.0" in out.stdout and str(len(before & affected)) in out.stdout


def test_earlier_versions_are_marked_affected_and_load_warns_naming_the_clean_one(quarantined, workdir):
    registry = workdir / "registry"
    listing = cli("versions", NAME, "--registry", str(registry), cwd=workdir, env={"COLUMNS": "300"})
    assert listing.returncode == 0, listing.stderr
    rows = {line.split("│")[2].strip(): line for line in listing.stdout.splitlines() if line.count("│") > 3}
    assert "quarantined" in rows["2.0.0"] and "quarantined" not in rows["3.0.0"]
    with pytest.warns(
        QuarantinedVersionWarning, match=r"2\.0\.0 is quarantined: template leaked the answer .* clean version is 3\.0\.0"
    ):
        old = synthforge.load(NAME, "2.0.0", registry=registry)
    assert old["train"].num_rows > 0  # still loadable
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuarantinedVersionWarning)
        synthforge.load(NAME, "3.0.0", registry=registry)


def test_the_quarantine_release_card_and_changelog_say_why(quarantined, workdir):
    registry = Registry(workdir / "registry")
    files = registry.checkout(NAME, registry.version(NAME, "3.0.0").commit)
    meta = json.loads((files / "synthforge.json").read_text())
    entry = meta["changelog"][-1]
    assert entry["bump"] == "major" and entry["quarantine"]["reason"] == "template leaked the answer"
    assert entry["quarantine"]["selector"] == {"batch": quarantined["batch"]}
    assert "2.0.0" in entry["quarantine"]["affects"]
    assert meta["stats"][-1]["stage"] == "quarantine" and meta["stats"][-1]["rejected"] == entry["quarantine"]["samples"]["2.0.0"]
    card = (files / "README.md").read_text()
    assert "template leaked the answer" in card


def test_quarantining_what_no_version_holds_is_refused(quarantined, workdir):
    out = cli(
        "quarantine", NAME, "--batch", "no-such-batch", "--reason", "x", "--registry", str(workdir / "registry"), cwd=workdir
    )
    assert out.returncode == 2 and "no published version holds" in out.stderr


def test_quarantine_needs_one_selector_and_a_reason(workdir):
    out = cli("quarantine", NAME, "--reason", "x", "--registry", str(workdir / "registry"), cwd=workdir)
    assert out.returncode == 2 and "exactly one of" in out.stderr
    out = cli(
        "quarantine", NAME, "--batch", "b", "--model", "m", "--reason", "x", "--registry", str(workdir / "registry"), cwd=workdir
    )
    assert out.returncode == 2 and "exactly one of" in out.stderr


def test_report_writes_one_standalone_html_page(quarantined, workdir, tmp_path):
    out = tmp_path / "report.html"
    run = cli("report", NAME, "3.0.0", "--out", str(out), "--registry", str(workdir / "registry"), cwd=workdir)
    assert run.returncode == 0, run.stderr
    html = out.read_text()
    assert "<table" in html and "data:image/png;base64," in html
    assert not re.search(r"""<img[^>]+src=["'](?!data:)""", html)
    assert "3.0.0" in html and "template leaked the answer" in html


def test_an_unknown_version_is_a_clear_error(workdir):
    out = cli("diff", NAME, "1.0.0", "9.0.0", "--registry", str(workdir / "registry"), cwd=workdir)
    assert out.returncode == 2 and "no version 9.0.0" in out.stderr and "have: 1.0.0" in out.stderr
    with pytest.raises(BadInput, match="no version 9.0.0"):
        synthforge.load(NAME, "9.0.0", registry=workdir / "registry")


def test_the_records_of_a_quarantined_version_are_not_published_again(quarantined, workdir):
    """The split stage still holds 2.0.0's records: publishing them would bring the quarantined samples back."""
    out = publish(workdir)
    assert out.returncode == 2 and "quarantined (template leaked the answer)" in out.stderr and "3.0.0" in out.stderr


def test_the_same_quarantine_twice_is_refused(quarantined, workdir):
    args = ("--batch", quarantined["batch"], "--reason", "again", "--registry", str(workdir / "registry"))
    out = cli("quarantine", NAME, *args, cwd=workdir)
    assert out.returncode == 2 and "already quarantined" in out.stderr


def test_quarantine_by_a_list_of_samples_names_ids_nobody_holds(quarantined, workdir, tmp_path):
    registry = Registry(workdir / "registry")
    ids = [m["sample_id"] for m in read_manifest(registry.checkout(NAME, registry.version(NAME, "3.0.0").commit) / "provenance")]
    listed = tmp_path / "bad.txt"
    listed.write_text(f"{ids[0]}\nnot-a-sample-id\n")
    args = ("--samples", str(listed), "--reason", "spot check", "--registry", str(workdir / "registry"))
    out = cli("quarantine", NAME, *args, cwd=workdir)
    assert out.returncode == 2 and "1 sample ids are in no stage manifest" in out.stderr and "not-a-sample-id" in out.stderr
    listed.write_text(json.dumps({"sample_id": ids[0]}) + "\n")
    out = cli("quarantine", NAME, *args, cwd=workdir)
    assert out.returncode == 0, out.stderr
    after = registry.version(NAME, "4.0.0")
    assert after.total == registry.version(NAME, "3.0.0").total - len(_descendants(workdir, {ids[0]}) & set(ids))
