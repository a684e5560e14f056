"""The Ray Data engine runs the same stage functions as the local one and writes the same stage directories.

Ray starts once for this module on 127.0.0.1 (dashboard off, usage stats off, auth disabled) with 2 CPUs, and
every stage runs in small batches so that work spreads over many tasks and every keyed reduce over several
partitions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

if importlib.util.find_spec("ray") is None:  # not imported here: Ray reads its loopback setting at import
    pytest.skip("the Ray engine is the optional extra synthforge[ray]; make test installs it", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH_ROWS = 16


@pytest.fixture(scope="module")
def ray_engine():
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import ray

    from synthforge.engine import RayEngine, RayOptions

    engine = RayEngine(RayOptions(num_cpus=2, actors=2, partitions=3))
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    yield engine
    engine.close()
    assert not ray.is_initialized()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def stage_contents(stage_dir: Path) -> dict:
    """Everything a stage wrote except when it finished: samples, rejected, manifest, stats, fingerprint."""
    tables = {}
    for kind in ("samples", "rejected"):
        shards = sorted((stage_dir / kind).glob("*.parquet"))
        tables[kind] = [row for s in shards for row in pq.read_table(s).to_pylist()]
    tables["manifest"] = pq.read_table(stage_dir / "manifest.parquet").to_pylist()
    tables["stats"] = json.loads((stage_dir / "stats.json").read_text())
    info = json.loads((stage_dir / "stage.json").read_text())
    tables["fingerprint"] = info["fingerprint"]
    return tables


def run_on(engine, runner, params: dict, src: Path, out: Path) -> dict:
    from synthforge.engine import LocalEngine

    params = {**params, "engine": {"name": engine.name, "batch_rows": BATCH_ROWS}}
    if isinstance(engine, LocalEngine):
        return runner(params, src, out)
    from synthforge import engine as engine_module

    engine_module._ENGINE = engine  # the module's Ray instance, not a second one
    return runner(params, src, out)


def assert_same_output(local_dir: Path, ray_dir: Path) -> None:
    local, ray = stage_contents(local_dir), stage_contents(ray_dir)
    for part in ("samples", "rejected", "manifest", "stats", "fingerprint"):
        assert ray[part] == local[part], f"{ray_dir.name}: {part} differ between the local and the Ray engine"


def stage_runners():
    from synthforge.stages.dedup import run_dedup
    from synthforge.stages.judge import run_judge
    from synthforge.stages.split import run_split
    from synthforge.stages.tag import run_tag

    return [
        ("judge", run_judge, "generated"),
        ("dedup", run_dedup, "judged"),
        ("tag", run_tag, "deduped"),
        ("split", run_split, "tagged"),
    ]


def test_text_stages_give_the_same_output_on_ray_and_locally(project, ray_engine, tmp_path):
    """judge (rules, LLM judge), dedup (exact, MinHash LSH, semantic), tag and split, each on the same input."""
    from synthforge.engine import LocalEngine
    from synthforge.params import load_params

    with contextlib.chdir(project):
        params = load_params("params.yaml")
        for name, runner, src in stage_runners():
            stats = {}
            for engine in (LocalEngine(), ray_engine):
                out = tmp_path / engine.name / name
                stats[engine.name] = run_on(engine, runner, params, project / "data" / src, out)
            assert_same_output(tmp_path / "local" / name, tmp_path / "ray" / name)
            assert stats["ray"]["entered"] > BATCH_ROWS * 3, "too few samples to spread over tasks"
    dedup = json.loads((tmp_path / "ray" / "dedup" / "stats.json").read_text())
    assert dedup["exact_duplicates"] + dedup["near_duplicates"] > 0, "the input should exercise the keyed reduces"


def test_image_stages_give_the_same_output_on_ray_and_locally(digits, ray_engine, tmp_path):
    """judge with VoG (per-class normalisation as a reduce keyed by class), image dedup, tag, split by label."""
    from synthforge.engine import LocalEngine
    from synthforge.params import load_params

    root, _ = digits
    with contextlib.chdir(root):
        params = load_params("params.yaml")
        for name, runner, src in stage_runners():
            for engine in (LocalEngine(), ray_engine):
                run_on(engine, runner, params, root / "data" / src, tmp_path / engine.name / name)
            assert_same_output(tmp_path / "local" / name, tmp_path / "ray" / name)
    judged = stage_contents(tmp_path / "ray" / "judge")
    assert any(r["rejected_by"] == "judge.vog" for r in judged["rejected"]), "VoG should drop a share of each class"


def test_split_leakage_is_refused_on_ray_as_locally(tmp_path, ray_engine):
    """A text under two sources would sit in two splits: the distributed leakage reduce finds it, nothing is written."""
    from synthforge.errors import LeakageError
    from synthforge.stages.ingest import run_ingest
    from synthforge.stages.split import run_split

    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question number {i % 5}"}) + "\n" for i in range(60)))
    run_ingest(src, tmp_path / "ingested", ["prompt"])
    params = {"seed": 1, "split": {"ratios": {"train": 0.5, "test": 0.5}, "group_by": "sample", "stratify_by": None}}
    params["dedup"] = {"fields": ["prompt"]}
    with contextlib.chdir(tmp_path), pytest.raises(LeakageError, match="same text in"):
        run_on(ray_engine, run_split, params, tmp_path / "ingested", tmp_path / "split")
    assert not (tmp_path / "split").exists()


def test_the_engine_is_chosen_by_params_or_the_command_line(project, tmp_path):
    from synthforge.engine import LocalEngine, engine_options, get_engine
    from synthforge.errors import BadInput

    assert isinstance(get_engine({})[0], LocalEngine)
    assert engine_options({"engine": {"name": "ray", "batch_rows": 8, "ray": {"actors": 3}}})[:2] == ("ray", 8)
    assert engine_options({"engine": {"name": "ray"}}, override="local")[0] == "local"
    with pytest.raises(BadInput, match="unknown engine 'spark'"):
        engine_options({}, override="spark")


def test_a_damaged_shard_read_by_a_ray_worker_is_a_named_bad_input(tmp_path, ray_engine):
    """A data page that does not decompress is found by the worker reading it; the driver raises the same BadInput
    the local engine raises (exit code 2, the shard and rows named) and writes nothing."""
    from conftest import damage_page

    from synthforge.engine import LocalEngine
    from synthforge.errors import BadInput
    from synthforge.stages.ingest import run_ingest
    from synthforge.stages.split import run_split

    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"question {i}: " + "why " * (i % 17)}) + "\n" for i in range(200)))
    run_ingest(src, tmp_path / "ingested", ["prompt"])
    shard = next((tmp_path / "ingested" / "samples").glob("*.parquet"))
    damage_page(shard, "prompt")
    params = {"seed": 1, "split": {"ratios": {"train": 0.5, "test": 0.5}, "group_by": "sample", "stratify_by": None}}
    for engine in (LocalEngine(), ray_engine):
        # The page holds every row, so each batch fails; on Ray, whichever worker fails first is reported.
        named = rf"^{re.escape(str(shard))}: rows \d+ to \d+ are damaged \(rerun its stage\)"
        with contextlib.chdir(tmp_path), pytest.raises(BadInput, match=named):
            run_on(engine, run_split, params, tmp_path / "ingested", tmp_path / engine.name)
        assert not (tmp_path / engine.name).exists()


def without_run(row: dict) -> dict:
    """A generated sample without what names its run: the run id and when it was made."""
    generation = {**row["provenance"]["generation"], "created_at": None}
    return {**row, "provenance": {**row["provenance"], "run_id": None, "generation": generation}}


def test_image_generation_on_ray_makes_the_same_images_in_an_actor_pool(digits, ray_engine, tmp_path):
    """Generation batches run as Ray actors that each load the generator once; the images, ids and provenance are
    those of the local engine, down to the run id every actor is handed by the driver."""
    from synthforge.engine import LocalEngine
    from synthforge.params import load_params
    from synthforge.stages.generate_images import run_generate_images

    root, _ = digits

    def generate(params, src, out):
        return run_generate_images(params, src, root / "data" / "real", root / "models" / "generator", out)

    with contextlib.chdir(root):
        params = load_params("params.yaml")
        params["generate"] = {**params["generate"], "batch_size": 8}  # several batches, spread over both actors
        engines = (LocalEngine(), ray_engine)
        stats = {e.name: run_on(e, generate, params, root / "data" / "seeds", tmp_path / e.name) for e in engines}
    assert stats["ray"]["made_batches"] == stats["local"]["made_batches"] > 2
    local, ray = (stage_contents(tmp_path / name) for name in ("local", "ray"))
    for part in ("samples", "rejected", "stats", "fingerprint"):
        rows = (ray[part], local[part])
        if part == "samples":  # each run has its own run id and clock; the rest is the same
            rows = tuple([without_run(r) for r in side] for side in rows)
        assert rows[0] == rows[1], f"generate: {part} differ between the local and the Ray engine"
    assert all(r["image"] for r in ray["samples"])
    run_ids = {r["provenance"]["run_id"] for r in ray["samples"]}
    assert len(run_ids) == 1, "every actor must record the driver's run id"


def test_text_generation_on_ray_makes_the_same_samples_in_an_actor_pool(project, ray_engine, tmp_path):
    """Every method of the text recipe (templates, adversarial variants, LLM paraphrases, grounded Q&A) plans on
    the driver and makes its batches on Ray actors that each load the tiny LLM: the same samples as locally."""
    from synthforge.engine import LocalEngine
    from synthforge.params import load_params
    from synthforge.stages.generate import run_generate

    with contextlib.chdir(project):
        params = load_params("params.yaml")
        params["generate"] = {**params["generate"], "batch_size": 8}
        engines = (LocalEngine(), ray_engine)
        stats = {e.name: run_on(e, lambda p, _, out: run_generate(p, out), params, None, tmp_path / e.name) for e in engines}
    local, ray = (stage_contents(tmp_path / name) for name in ("local", "ray"))
    for part in ("samples", "rejected"):
        assert [without_run(r) for r in ray[part]] == [without_run(r) for r in local[part]], f"generate: {part} differ"
    assert ray["fingerprint"] == local["fingerprint"]
    assert stats["ray"]["by_method"] == stats["local"]["by_method"], "metrics counted on actors reach the driver"
    assert stats["ray"]["made_batches"] > 4
    llm_made = [r for r in ray["samples"] + ray["rejected"] if r["provenance"]["generation"]["raw_output"] is not None]
    assert llm_made, "the recipe's LLM methods should make samples on the actors"
