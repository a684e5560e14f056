"""Resume after a kill: a stage SIGKILLed at any point leaves no partial output, and its rerun finishes the work
and equals an uninterrupted run; generation makes only the batches its journal lacks.

A stage runs in a child process that stops for good at a chosen point (after its Nth journal batch, or after the
first write of its stage directory) and is SIGKILLed once the files of that point appear: where a kill lands
does not depend on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml
from conftest import FAST, merge_params, read_rows, tree_digest

from synthforge.resume import recover, temp_name

TESTS = Path(__file__).resolve().parent
RECIPE = TESTS.parent / "pipelines" / "text-eval"
MODEL = {"backend": "transformers", "model": "unused"}  # answered by ScriptedLLM
OUTS = {
    "generate": "data/generated",
    "generate_images": "data/generated",
    "judge": "data/judged",
    "dedup": "data/deduped",
    "split": "data/split",
}


class ScriptedLLM:
    """The LLM interface with answers that are a function of the request: what the LLM methods parse, a rewrite
    that keeps every fact, and an empty rewrite now and then (a rejected sample)."""

    model_id, model_revision, identity = "scripted/model", "r1", "scripted/model@r1"

    def __init__(self):
        self.requests = []

    def request(self, messages, seed=0):
        from synthforge.llm.backends import ChatRequest

        return ChatRequest(tuple(tuple(m) for m in messages), seed=seed)

    def complete(self, requests, desc="llm"):
        from synthforge.llm.backends import Completion

        self.requests += requests
        answers = []
        for r in requests:
            text = r.messages[-1][1]
            if "passage" in text.lower():
                answer = json.dumps({"question": "What does it say?", "answer": text.split()[-1]})
            else:
                answer = "" if r.seed % 5 == 0 else "Reworded: " + text
            answers.append(Completion(answer, self.model_id, self.model_revision, cached=False, finish_reason="stop"))
        return answers


def run(stage: str, project: Path, out: str | None = None, llm: ScriptedLLM | None = None) -> dict:
    """One stage of the project, through the library, with the scripted model for generation."""
    from synthforge.llm import backends
    from synthforge.params import load_params
    from synthforge.stages.dedup import run_dedup
    from synthforge.stages.generate import run_generate
    from synthforge.stages.judge import run_judge
    from synthforge.stages.split import run_split

    out = out or OUTS[stage]
    llm = llm or ScriptedLLM()
    with contextlib.chdir(project), mock.patch.object(backends, "shared_llm", lambda spec, where, params_file: llm):
        p = load_params("params.yaml")
        if stage == "generate_images":
            from synthforge.stages.generate_images import run_generate_images

            return run_generate_images(p, "data/seeds", "data/real", "models/generator", out)
        return {
            "generate": lambda: run_generate(p, out),
            "judge": lambda: run_judge(p, "data/generated", out),
            "dedup": lambda: run_dedup(p, "data/judged", out),
            "split": lambda: run_split(p, "data/deduped", out),
        }[stage]()


def stop_after(target: str, calls: int) -> None:
    """Make the `calls`-th call of `target` ("module:Class.method") the last thing this process does."""
    import importlib

    module, attribute = target.split(":")
    owner_name, method_name = attribute.split(".")
    owner = getattr(importlib.import_module(module), owner_name)
    original, count = getattr(owner, method_name), [0]

    def stopping(*args, **kwargs):
        original(*args, **kwargs)
        count[0] += 1
        if count[0] == calls:
            threading.Event().wait()  # until the test kills this process

    setattr(owner, method_name, stopping)


CHILD = """
import sys
sys.path.insert(0, {tests!r})
import test_resume
test_resume.stop_after({target!r}, {calls})
test_resume.run({stage!r}, test_resume.Path.cwd())
"""


def kill_at(project: Path, stage: str, point: str, calls: int = 1) -> None:
    """Run the stage in a child that stops for good after its `calls`-th journal batch (point "journal") or its
    `calls`-th write into its new stage directory ("writing"), and SIGKILL it once that point's files are there."""
    out = OUTS[stage]
    target, reached = {
        "journal": ("synthforge.resume:Journal.write", lambda: len(journal_batches(project, out)) == calls),
        "writing": ("synthforge.stagedir:StageWriter.write", lambda: any(".tmp-" in name for name in leftovers(project, out))),
    }[point]
    code = CHILD.format(tests=str(TESTS), target=target, calls=calls, stage=stage)
    with tempfile.TemporaryFile() as log:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see the one_torch_thread fixture
        child = subprocess.Popen([sys.executable, "-c", code], cwd=project, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 300  # only a broken test waits this long
            while not reached():
                if child.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"{stage} ended (exit {child.returncode}) before its kill point:\n{log.read().decode()}")
                assert time.monotonic() < deadline, f"{stage} never reached its kill point"
                time.sleep(0.01)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()


def journal_batches(project: Path, out: str) -> list[Path]:
    return sorted((project / out).parent.glob(f".{Path(out).name}.journal-*/*.parquet"))


def leftovers(project: Path, out: str) -> list[str]:
    return sorted(p.name for p in (project / out).parent.glob(f".{Path(out).name}.*"))


def content(stage_dir: Path) -> dict[str, list[dict]]:
    """What a stage wrote, but the run id and the timestamps that differ between two runs of the same work."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("run_id", "created_at")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    import pyarrow.parquet as pq

    return {
        "samples": strip(read_rows(stage_dir)),
        "rejected": strip(read_rows(stage_dir, "rejected")),
        "manifest": strip(pq.read_table(stage_dir / "manifest.parquet").to_pylist()),
    }


def batch_order(stage_dir: Path) -> list[tuple[str, str]]:
    """(batch id, method) of every generation batch, in generation order (the number ending the id)."""
    rows = read_rows(stage_dir) + read_rows(stage_dir, "rejected")
    batches = {r["provenance"]["generation"]["batch_id"]: r["provenance"]["generation"]["method"] for r in rows}
    return sorted(batches.items(), key=lambda b: int(b[0].rsplit("-", 1)[1]))


# -- the text pipeline: generate (templates, the LLM methods, adversarial), judge, dedup, split ---------------------


@pytest.fixture(scope="module")
def text_project(tmp_path_factory) -> Path:
    """The text-eval recipe's inputs, small: ~200 samples in generation batches of 16, checks without models."""
    root = tmp_path_factory.mktemp("resume") / "text"
    root.mkdir()
    for name in ("sources", "prompts", "docs"):
        shutil.copytree(RECIPE / name, root / name)
    params = yaml.safe_load((RECIPE / "params.yaml").read_text())
    params["generate"]["batch_size"] = 16
    params["generate"]["methods"] = [
        {"name": "template", "max_constraints": 1, "variants_per_record": 2},
        {"name": "paraphrase", "rate": 0.5, "model": MODEL},
        {"name": "grounded", "docs": "docs", "model": MODEL},
        {"name": "adversarial", "kinds": ["injection", "format_breaking"], "rate": 0.3},
    ]
    params["judge"]["checks"] = [
        c for c in params["judge"]["checks"] if c["name"] in ("required_fields", "length", "banned_patterns")
    ]
    for key in ("semantic", "decontaminate"):
        del params["dedup"][key]
    params["split"]["stratify_by"] = "label"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("generate", "judge", "dedup", "split"):
        run(stage, root)
    return root


@pytest.fixture
def text_copy(text_project, tmp_path) -> Path:
    """A copy of the text project to kill stages in; the module's project holds the uninterrupted outputs."""
    root = tmp_path / "text"
    shutil.copytree(text_project, root)
    return root


@pytest.mark.parametrize("point", ["after the first batch", "after the LLM's first batch", "before the last batch"])
def test_generation_resumes_from_the_batches_its_journal_holds(text_project, text_copy, point):
    batches = batch_order(text_project / "data/generated")
    methods = [method for _, method in batches]
    assert {"template", "paraphrase", "grounded", "adversarial"} == set(methods)
    stop = {"after the first batch": 1, "after the LLM's first batch": methods.index("paraphrase") + 1}.get(
        point, len(batches) - 1
    )
    shutil.rmtree(text_copy / "data/generated")
    kill_at(text_copy, "generate", "journal", stop)
    assert not (text_copy / "data/generated").exists()
    assert len(journal_batches(text_copy, "data/generated")) == stop

    llm = ScriptedLLM()
    stats = run("generate", text_copy, llm=llm)
    assert (stats["resumed_batches"], stats["made_batches"]) == (stop, len(batches) - stop)
    assert content(text_copy / "data/generated") == content(text_project / "data/generated")
    assert leftovers(text_copy, "data/generated") == []
    # The resumed batches hold the killed run's samples, and the model answered only the batches made again.
    rows = read_rows(text_copy / "data/generated") + read_rows(text_copy / "data/generated", "rejected")
    run_of = {r["provenance"]["generation"]["batch_id"]: r["provenance"]["run_id"] for r in rows}
    killed, rerun = {run_of[b] for b, _ in batches[:stop]}, {run_of[b] for b, _ in batches[stop:]}
    assert len(killed) == len(rerun) == 1 and killed != rerun
    made = {b for b, _ in batches[stop:]}
    answered = [r for r in rows if r["provenance"]["generation"]["raw_output"] is not None]
    assert len(llm.requests) == sum(r["provenance"]["generation"]["batch_id"] in made for r in answered)


def test_generation_killed_while_writing_keeps_the_previous_output_and_resumes_every_batch(text_project, text_copy):
    before = tree_digest(text_copy / "data/generated")
    total = len(batch_order(text_project / "data/generated"))
    kill_at(text_copy, "generate", "writing")
    assert tree_digest(text_copy / "data/generated") == before
    assert len(journal_batches(text_copy, "data/generated")) == total

    stats = run("generate", text_copy)
    assert (stats["resumed_batches"], stats["made_batches"]) == (total, 0)
    assert content(text_copy / "data/generated") == content(text_project / "data/generated")
    assert leftovers(text_copy, "data/generated") == []


def test_a_journal_of_other_settings_is_not_reused(text_copy):
    kill_at(text_copy, "generate", "journal", 2)
    params = yaml.safe_load((text_copy / "params.yaml").read_text())
    params["seed"] += 1
    (text_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    stats = run("generate", text_copy)
    assert stats["resumed_batches"] == 0 and stats["made_batches"] > 2
    assert leftovers(text_copy, "data/generated") == []


def test_a_failed_generation_keeps_its_batches_unless_its_input_was_bad(text_project, text_copy):
    from synthforge.errors import BadInput
    from synthforge.llm.backends import LLMServerError

    class FailingLLM(ScriptedLLM):
        def complete(self, requests, desc="llm"):
            if self.requests:
                raise LLMServerError("the server went away")
            return super().complete(requests, desc)

    shutil.rmtree(text_copy / "data/generated")
    with pytest.raises(LLMServerError):
        run("generate", text_copy, llm=FailingLLM())
    methods = [method for _, method in batch_order(text_project / "data/generated")]
    finished = methods.index("paraphrase") + 1
    assert len(journal_batches(text_copy, "data/generated")) == finished
    stats = run("generate", text_copy)
    assert stats["resumed_batches"] == finished
    assert content(text_copy / "data/generated") == content(text_project / "data/generated")

    # Bad input found after some batches were made: the input must change, so its batches would never be reused.
    before = tree_digest(text_copy / "data")
    params = yaml.safe_load((text_copy / "params.yaml").read_text())
    params["generate"]["methods"][-1]["payloads"] = "no-such-payloads"
    (text_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(BadInput, match="no-such-payloads"):
        run("generate", text_copy)
    assert tree_digest(text_copy / "data") == before
    assert leftovers(text_copy, "data/generated") == []


@pytest.mark.parametrize("stage", ["judge", "dedup", "split"])
@pytest.mark.parametrize("previous", [True, False], ids=["replacing", "first"])
def test_a_stage_killed_while_writing_leaves_no_partial_output(text_project, text_copy, stage, previous):
    out = OUTS[stage]
    if not previous:
        shutil.rmtree(text_copy / out)
    before = tree_digest(text_copy / out) if previous else None
    kill_at(text_copy, stage, "writing")
    assert leftovers(text_copy, out), "the killed stage left no temporary directory: the kill came too late"
    if previous:
        assert tree_digest(text_copy / out) == before
    else:
        assert not (text_copy / out).exists()

    run(stage, text_copy)
    assert content(text_copy / out) == content(text_project / out)
    assert leftovers(text_copy, out) == []


def dead_writer(out: Path, kind: str) -> None:
    """What a writer of `out` killed at that point leaves, from a process that is gone: "tmp", its half-written
    output; "old", the previous output moved aside just before the new one would have taken its place."""
    code = (
        "import os, sys; from pathlib import Path; from synthforge.resume import temp_name\n"
        "out = Path(sys.argv[1])\n"
        "if sys.argv[2] == 'tmp':\n"
        "    shard = temp_name(out) / 'samples' / 'part-00000.parquet'\n"
        "    shard.parent.mkdir(parents=True); shard.write_bytes(b'PAR1')\n"
        "else:\n"
        "    os.replace(out, temp_name(out, 'old'))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(out), kind], check=True)


@pytest.mark.parametrize("stage", ["generate", "judge", "split"])
def test_a_kill_between_the_two_renames_loses_no_output(text_project, text_copy, stage):
    out = text_copy / OUTS[stage]
    dead_writer(out, "old")
    dead_writer(out, "tmp")
    assert not out.exists() and len(leftovers(text_copy, OUTS[stage])) >= 2

    run(stage, text_copy)
    assert content(out) == content(text_project / OUTS[stage])
    assert leftovers(text_copy, OUTS[stage]) == []


def test_recover_puts_back_the_output_a_dead_writer_moved_aside(text_copy):
    out = text_copy / "data/judged"
    before = tree_digest(out)
    dead_writer(out, "old")
    dead_writer(out, "tmp")
    recover(out)
    assert tree_digest(out) == before
    assert leftovers(text_copy, "data/judged") == []


def test_recover_leaves_what_live_writers_and_other_outputs_use(tmp_path):
    out = tmp_path / "data" / "judged"
    out.mkdir(parents=True)
    dead_writer(out, "old")  # moved aside; then written again, and the kill came while deleting the old one
    out.mkdir()
    dead_writer(out, "tmp")
    (out.parent / ".judged.tmp-0a1b2c3d").mkdir()  # named before pids were: its writer is unknown, so taken as dead
    live = [temp_name(out), temp_name(out, "old")]  # this process is alive
    others = [out.parent / ".judged2.tmp-1-00000000", out.parent / ".judged.journal-0123456789abcdef", out.parent / "judged.tmp"]
    for path in live + others:
        path.mkdir()
    recover(out)
    assert sorted(out.parent.iterdir()) == sorted([out, *live, *others])


# -- image generation with a tiny diffusion UNet -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_project(tmp_path_factory, one_torch_thread) -> Path:
    """A digits project with a barely trained classifier and generator: 10 images from 5 seeds, in batches of 3."""
    from synthforge.params import load_params
    from synthforge.project import init_project
    from synthforge.stages.prepare import run_adapt, run_classifier, run_real
    from synthforge.stages.seeds import run_seeds

    root = init_project(tmp_path_factory.mktemp("resume") / "digits")
    tiny = merge_params(
        FAST,
        {
            "classifier": {"epochs": 2, "checkpoints": 2},
            "generator": {"unet": {"base_steps": 2, "lora_steps": 1}},
            "seeds": {"fraction": None, "k": 5, "images_per_seed": 2, "budget": "uniform"},
            "generate": {"batch_size": 3, "unet": {"sample_steps": 2}},
        },
    )
    params = merge_params(yaml.safe_load((root / "params.yaml").read_text()), tiny)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with contextlib.chdir(root):
        p = load_params("params.yaml")
        run_real(p, "data/real")
        run_classifier(p, "data/real", "models/classifier")
        run_adapt(p, "data/real", "models/generator")
        run_seeds(p, "data/real", "models/classifier", "data/seeds")
    run("generate_images", root)
    return root


@pytest.mark.usefixtures("one_torch_thread")
def test_image_generation_resumes_from_the_batches_its_journal_holds(image_project, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(image_project, root, ignore=shutil.ignore_patterns("generated"))
    kill_at(root, "generate_images", "journal", 2)
    assert not (root / "data/generated").exists()

    stats = run("generate_images", root)
    assert (stats["resumed_batches"], stats["made_batches"]) == (2, 2)
    expected = content(image_project / "data/generated")
    assert len(expected["samples"]) == 10 and content(root / "data/generated") == expected
    assert leftovers(root, "data/generated") == []
