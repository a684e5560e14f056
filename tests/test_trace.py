"""trace: from a batch, model, prompt version or sample to every sample it touched, its fate and its versions."""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from conftest import STAGES, cli, read_manifest, run_pipeline

from synthforge.params import load_params
from synthforge.registry import Registry
from synthforge.trace import trace

NAME = "evalset"
MODEL = "jinja2-template-engine"


# -- what the stage manifests say, independently of trace ---------------------------------------------------


@pytest.fixture(scope="module")
def generated(project) -> dict[str, dict]:
    """sample_id -> provenance.generation, for every sample the generate stage made."""
    return {m["sample_id"]: m["provenance"]["generation"] for m in read_manifest(project / "data" / "generated")}


@pytest.fixture(scope="module")
def fates(project) -> dict[str, dict]:
    """sample_id -> the manifest row of the last stage the sample entered (pipeline order)."""
    last = {}
    for name in STAGES:
        for m in read_manifest(project / "data" / name):
            last[m["sample_id"]] = m
    return last


@pytest.fixture(scope="module")
def children(generated) -> dict[str, set[str]]:
    out = defaultdict(set)
    for sid, gen in generated.items():
        for parent in gen["parent_ids"]:
            out[parent].add(sid)
    return out


@pytest.fixture(scope="module")
def template_batches(generated) -> list[str]:
    batches = sorted({g["batch_id"] for g in generated.values() if g["method"] == "template"})
    assert len(batches) >= 3, "the default recipe makes several template batches"
    return batches


def split_of(stage_dir: Path) -> dict[str, str]:
    return {m["sample_id"]: m["provenance"]["split"] for m in read_manifest(stage_dir)}


def expected_fate(m: dict) -> str:
    return f"kept through {m['stage']}" if m["kept"] else f"rejected at {m['stage']} by {m['rejected_by']}"


# -- registries ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(project, tmp_path_factory) -> Path:
    """The session project's split published once as evalset 1.0.0."""
    reg = tmp_path_factory.mktemp("registry")
    result = Registry(reg).publish(project / "data" / "split", NAME, "1.0.0", load_params(project / "params.yaml"), project)
    assert not result.already_published
    return reg


@pytest.fixture(scope="module")
def subset_project(project, tmp_path_factory) -> Path:
    """A copy of the project whose judge keeps only the longer prompts and whose split has other ratios."""
    import pyarrow.parquet as pq

    copy = tmp_path_factory.mktemp("subset") / "evalset"
    shutil.copytree(project, copy, symlinks=True)
    prompts = pq.read_table(project / "data" / "split" / "samples", columns=["prompt"]).column("prompt").to_pylist()
    lengths = sorted(len(p) for p in prompts)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    length = next(c for c in params["judge"]["checks"] if c["name"] == "length")
    length["min_chars"] = lengths[len(lengths) // 2]
    params["split"]["ratios"] = {"train": 0.5, "test": 0.5}
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_pipeline(copy)
    return copy


@pytest.fixture(scope="module")
def two_versions(project, subset_project, tmp_path_factory) -> Path:
    """evalset 1.0.0 from the session project, 2.0.0 from the subset copy, in one registry."""
    reg = Registry(tmp_path_factory.mktemp("registry2"))
    reg.publish(project / "data" / "split", NAME, "1.0.0", load_params(project / "params.yaml"), project)
    reg.publish(subset_project / "data" / "split", NAME, "2.0.0", load_params(subset_project / "params.yaml"), subset_project)
    assert [v.version for v in reg.versions(NAME)] == ["1.0.0", "2.0.0"]
    return reg.root


# -- trace by batch ------------------------------------------------------------------------------------------


def test_trace_by_batch_finds_exactly_the_batch_its_descendants_and_each_fate(
    project, registry, generated, fates, children, template_batches
):
    split = split_of(project / "data" / "split")
    seen_fates = Counter()
    for batch in template_batches:
        result = trace(project / "data", registry, batch=batch)
        assert result.query == {"batch": batch}
        by_id = {s.sample_id: s for s in result.samples}
        assert len(by_id) == len(result.samples), f"{batch}: a sample is listed twice"

        matched = {s.sample_id for s in result.samples if s.relation == "match"}
        assert matched == {sid for sid, g in generated.items() if g["batch_id"] == batch}

        descendants = {s.sample_id: s for s in result.samples if s.relation != "match"}
        assert set(descendants) == set().union(*(children[sid] for sid in matched))
        for sid, s in descendants.items():
            parent = s.relation.removeprefix("descendant of ")
            assert s.relation == f"descendant of {parent}" and parent in matched
            assert parent in generated[sid]["parent_ids"] and s.batch_id != batch

        for sid, s in by_id.items():
            m = fates[sid]
            assert s.fate == expected_fate(m), sid
            assert (s.kept, s.rejected_by, s.reason) == (m["kept"], m["rejected_by"], m["reason"])
            assert s.batch_id == generated[sid]["batch_id"] and s.model == generated[sid]["model"]
            assert s.published == ([f"{NAME} v1.0.0 {split[sid]}"] if sid in split else [])
            seen_fates[s.fate if s.kept else f"{m['stage']} {m['rejected_by']}"] += 1

        expected_versions = Counter(split[sid] for sid in by_id if sid in split)
        assert result.versions == {f"{NAME} v1.0.0": dict(expected_versions)}

    # the recipe plants duplicates and a missing template variable: make sure those fates were traced
    assert seen_fates["kept through split"] > 0
    assert seen_fates["dedup dedup.exact"] > 0 and seen_fates["dedup dedup.minhash"] > 0
    assert any(k.startswith("judge judge.") for k in seen_fates)


def test_a_sample_rejected_at_dedup_shows_the_detector_and_the_representative(project, registry, fates, generated):
    for detector in ("dedup.exact", "dedup.minhash"):
        sid = next(s for s, m in fates.items() if m["rejected_by"] == detector)
        result = trace(project / "data", registry, batch=generated[sid]["batch_id"])
        s = next(s for s in result.samples if s.sample_id == sid)
        assert s.fate == f"rejected at dedup by {detector}" and s.last_stage == "dedup" and s.kept is False
        representative = fates[sid]["provenance"]["dedup"]["representative_id"]
        assert representative in s.reason and s.published == []


def test_an_unknown_batch_traces_nothing(project, registry):
    assert trace(project / "data", registry, batch="no-such-batch").samples == []


# -- other selectors -----------------------------------------------------------------------------------------


def _matched(result) -> set[str]:
    return {s.sample_id for s in result.samples if s.relation == "match"}


def test_trace_by_template_and_version(project, registry, generated, children):
    refund = {sid for sid, g in generated.items() if (g["prompt_template_id"], g["prompt_version"]) == ("refund-request", "3")}
    assert refund
    result = trace(project / "data", registry, prompt_version="refund-request@3")
    assert result.query == {"prompt_version": "refund-request@3"}
    assert _matched(result) == refund
    assert all(s.prompt == "refund-request@3" for s in result.samples if s.relation == "match")
    assert {s.sample_id for s in result.samples if s.relation != "match"} == set().union(*(children[s] for s in refund))

    assert trace(project / "data", registry, prompt_version="refund-request@2").samples == []
    assert trace(project / "data", registry, prompt_version="billing-dispute@3").samples == []


def test_trace_by_plain_version_matches_every_template_at_that_version(project, registry, generated):
    for version in ("2", "3"):
        expected = {sid for sid, g in generated.items() if g["prompt_version"] == version}
        assert expected, f"the default recipe has a template at version {version}"
        assert _matched(trace(project / "data", registry, prompt_version=version)) == expected
    assert trace(project / "data", registry, prompt_version="99").samples == []


def test_trace_by_model_reaches_every_sample_of_that_model(project, registry, generated, fates, children):
    result = trace(project / "data", registry, model=MODEL)
    assert result.query == {"model": MODEL}
    matched = {sid for sid, g in generated.items() if g["model"] == MODEL}
    assert _matched(result) == matched
    # Paraphrases (another model) of those samples come along as descendants.
    descendants = set().union(*(children[s] for s in matched)) - matched
    assert {s.sample_id for s in result.samples if s.relation != "match"} == descendants
    assert any(generated[s]["method"] == "paraphrase" for s in descendants)
    split = split_of(project / "data" / "split")
    in_split = Counter(split[s.sample_id] for s in result.samples if s.sample_id in split)
    assert result.versions == {f"{NAME} v1.0.0": dict(in_split)}
    assert all(s.fate == expected_fate(fates[s.sample_id]) for s in result.samples)
    assert trace(project / "data", registry, model="gpt-nobody").samples == []


def test_trace_by_model_calls_every_sample_of_that_model_a_match(project, registry, generated):
    result = trace(project / "data", registry, model=MODEL)
    assert _matched(result) == {sid for sid, g in generated.items() if g["model"] == MODEL}


def test_trace_by_sample_id_prefix(project, registry, generated, children, fates):
    parent = next(sid for sid in sorted(children) if children[sid])
    for selector in (parent, parent[:10]):
        result = trace(project / "data", registry, sample=selector)
        assert result.query == {"sample": selector}
        assert _matched(result) == {parent}
        assert {s.sample_id: s.relation for s in result.samples if s.relation != "match"} == {
            c: f"descendant of {parent}" for c in children[parent]
        }
    rejected = next(sid for sid, m in fates.items() if not m["kept"])
    (s,) = trace(project / "data", registry, sample=rejected[:12]).samples
    assert s.sample_id == rejected and s.fate == expected_fate(fates[rejected])


# -- two versions --------------------------------------------------------------------------------------------


def test_a_second_version_from_a_subset_shows_in_versions_and_per_sample(project, subset_project, two_versions, template_batches):
    v1 = split_of(project / "data" / "split")
    v2 = split_of(subset_project / "data" / "split")
    assert set(v2) < set(v1), "the subset copy must publish fewer samples (same ids) than 1.0.0"
    dropped_seen = False
    for batch in template_batches:
        result = trace(project / "data", two_versions, batch=batch)
        ids = [s.sample_id for s in result.samples]
        expected_versions = {}
        for label, splits in ((f"{NAME} v1.0.0", v1), (f"{NAME} v2.0.0", v2)):
            counts = Counter(splits[sid] for sid in ids if sid in splits)
            if counts:
                expected_versions[label] = dict(counts)
        assert result.versions == expected_versions
        for s in result.samples:
            want = [f"{NAME} v1.0.0 {v1[s.sample_id]}"] if s.sample_id in v1 else []
            want += [f"{NAME} v2.0.0 {v2[s.sample_id]}"] if s.sample_id in v2 else []
            assert sorted(s.published) == sorted(want), s.sample_id
            dropped_seen |= s.sample_id in v1 and s.sample_id not in v2
    assert dropped_seen, "some traced sample should be in 1.0.0 only"
    assert set(trace(project / "data", two_versions, model=MODEL).versions) == {f"{NAME} v1.0.0", f"{NAME} v2.0.0"}


# -- the command line ----------------------------------------------------------------------------------------


def test_cli_trace_json_matches_the_library(project, registry, template_batches, tmp_path):
    batch = template_batches[0]
    proc = cli("trace", "--batch", batch, "--json", "--data", str(project / "data"), "--registry", str(registry), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = trace(project / "data", registry, batch=batch)
    assert out["query"] == {"batch": batch}
    assert [s["sample_id"] for s in out["samples"]] == [s.sample_id for s in expected.samples]
    assert [(s["relation"], s["fate"], s["published"]) for s in out["samples"]] == [
        (s.relation, s.fate, s.published) for s in expected.samples
    ]
    assert out["versions"] == expected.versions


def test_cli_trace_table_names_the_batch_and_the_versions(project, two_versions, template_batches, tmp_path):
    batch = template_batches[0]
    proc = cli("trace", "--batch", batch, "--data", str(project / "data"), "--registry", str(two_versions), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = trace(project / "data", two_versions, batch=batch)
    n_match = sum(s.relation == "match" for s in expected.samples)
    assert f"batch={batch}: {n_match} samples, {len(expected.samples) - n_match} descendants" in proc.stdout
    assert "versions holding these samples" in proc.stdout
    for version, splits in expected.versions.items():
        for split, n in splits.items():
            row = [line for line in proc.stdout.splitlines() if version in line and split in line and f" {n} " in line]
            assert row, f"versions table lacks {version} {split} {n}"
    assert f"{NAME} v1.0.0" in proc.stdout and f"{NAME} v2.0.0" in proc.stdout


def test_cli_trace_of_nothing_says_so(project, registry, tmp_path):
    proc = cli("trace", "--batch", "no-such-batch", "--data", str(project / "data"), "--registry", str(registry), cwd=tmp_path)
    assert proc.returncode == 0 and "no samples match batch=no-such-batch" in proc.stdout


@pytest.mark.parametrize(
    "selectors",
    [[], ["--batch", "b", "--model", MODEL], ["--prompt-version", "3", "--sample", "ab"]],
    ids=["none", "batch+model", "version+sample"],
)
def test_cli_trace_needs_exactly_one_selector(project, registry, tmp_path, selectors):
    proc = cli("trace", *selectors, "--data", str(project / "data"), "--registry", str(registry), cwd=tmp_path)
    assert proc.returncode == 2
    assert "exactly one of --batch, --model, --prompt-version, --sample" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
