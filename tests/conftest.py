"""Shared fixtures: one scaffolded project whose pipeline runs once per session."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

# Tiny GPT-2s with a locally trained tokenizer, and `transformers serve` on 127.0.0.1 (session fixtures).
pytest_plugins = ["tiny_llm", "hub_server"]

STAGES = ["generated", "judged", "deduped", "tagged", "split"]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Load caches and registries never touch the user's home."""
    old = {k: os.environ.get(k) for k in ("SYNTHFORGE_CACHE", "SYNTHFORGE_REGISTRY", "HF_DATASETS_CACHE", "DVC_NO_ANALYTICS")}
    os.environ["SYNTHFORGE_CACHE"] = str(tmp_path_factory.mktemp("sfcache"))
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hfcache"))
    os.environ["DVC_NO_ANALYTICS"] = "1"
    os.environ.pop("SYNTHFORGE_REGISTRY", None)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny torch models (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): threads
    only add OpenMP spin-waits, which make a step 8-100x slower on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_pipeline(project: Path, params_file: str = "params.yaml", data: str = "data") -> dict[str, dict]:
    """Run the five stages through the library, as `dvc repro` would through the CLI."""
    from synthforge.params import load_params
    from synthforge.stages.dedup import run_dedup
    from synthforge.stages.generate import run_generate
    from synthforge.stages.judge import run_judge
    from synthforge.stages.split import run_split
    from synthforge.stages.tag import run_tag

    with contextlib.chdir(project):
        p = load_params(params_file)
        d = Path(data)
        return {
            "generate": run_generate(p, d / "generated"),
            "judge": run_judge(p, d / "generated", d / "judged"),
            "dedup": run_dedup(p, d / "judged", d / "deduped"),
            "tag": run_tag(p, d / "deduped", d / "tagged"),
            "split": run_split(p, d / "tagged", d / "split"),
        }


def use_tiny_models(root: Path, generator: Path, judge: Path) -> None:
    """Point the recipe's LLMs at the tiny local models (it names hub models nothing here can download), as a user
    would: by editing params.yaml, so the rest of the file stays as shipped."""
    path = root / "params.yaml"
    text = path.read_text()
    edits = [
        ("model: Qwen/Qwen2.5-0.5B-Instruct", f"model: {generator}"),
        ("model: HuggingFaceTB/SmolLM2-1.7B-Instruct", f"model: {judge}"),
        ("max_new_tokens: 256", "max_new_tokens: 48"),
        ("max_new_tokens: 160", "max_new_tokens: 48"),
        # Shorter prompts: the tiny models' context is 2k tokens.
        ("      docs: docs\n", "      docs: docs\n      max_passage_words: 60\n      distractors: 1\n"),
        # The tiny judge learned its answer's shape, not this rubric: what it writes is recorded as unparsed and
        # let through, so the stages after the judge have samples to work on.
        ("      min_score: 3\n", "      min_score: 3\n      on_unparsed: pass\n"),
    ]
    for old, new in edits:
        assert old in text, f"the text-eval recipe no longer has {old!r}"
        text = text.replace(old, new, 1)
    path.write_text(text)
    subprocess.run(["git", "commit", "-qam", "tiny local models"], cwd=root, check=True, capture_output=True)


@pytest.fixture(scope="session")
def project(tmp_path_factory, generator_lm, judge_lm) -> Path:
    """A text-eval project made by `synthforge init`, with its pipeline run once on the tiny models.
    Tests must not modify it."""
    from synthforge.project import init_project

    root = init_project(tmp_path_factory.mktemp("proj") / "evalset", pipeline="text-eval")
    use_tiny_models(root, generator_lm, judge_lm)
    run_pipeline(root)
    return root


@pytest.fixture
def fresh_project(tmp_path, generator_lm, judge_lm) -> Path:
    """A scaffolded text-eval project of the test's own, on the tiny models (pipeline not run)."""
    from synthforge.project import init_project

    root = init_project(tmp_path / "evalset", pipeline="text-eval")
    use_tiny_models(root, generator_lm, judge_lm)
    return root


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line in a subprocess: exit codes and stderr as a user sees them."""
    bin_dir = str(Path(sys.executable).parent)
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "synthforge", *args], cwd=cwd, env=full_env, capture_output=True, text=True)


def read_manifest(stage_dir: Path):
    import pyarrow.parquet as pq

    return pq.read_table(stage_dir / "manifest.parquet").to_pylist()


def read_rows(stage_dir: Path, kind: str = "samples") -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for shard in sorted((stage_dir / kind).glob("*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    return rows


def tree_digest(path: Path) -> dict[str, bytes]:
    """Every file's bytes under path: to prove that a failed command changed nothing."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and ".git" not in p.parts}


# -- the digits image pipeline, with small settings, run once per session ---------------------------------------

FAST = {
    "classifier": {"epochs": 12},
    "generator": {"unet": {"base_steps": 150, "lora_steps": 30, "batch_size": 64}},
    "seeds": {"fraction": 0.1, "budget": "accuracy"},  # test_image_pipeline checks this mode; test_gaps the file budget
    "generate": {"unet": {"sample_steps": 10}},
}


def merge_params(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_params(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def run_image_pipeline(root: Path) -> dict:
    from synthforge.gaps import find_gaps
    from synthforge.params import load_params
    from synthforge.stages.dedup import run_dedup
    from synthforge.stages.generate_images import run_generate_images
    from synthforge.stages.judge import run_judge
    from synthforge.stages.prepare import run_adapt, run_classifier, run_real
    from synthforge.stages.seeds import run_seeds
    from synthforge.stages.split import run_split
    from synthforge.stages.tag import run_tag

    with contextlib.chdir(root):
        p = load_params("params.yaml")
        return {
            "real": run_real(p, "data/real"),
            "classifier": run_classifier(p, "data/real", "models/classifier"),
            "adapt": run_adapt(p, "data/real", "models/generator"),
            "gaps": find_gaps(p, "data/real", "models/classifier", "data/gaps"),
            "seeds": run_seeds(p, "data/real", "models/classifier", "data/seeds"),
            "generate": run_generate_images(p, "data/seeds", "data/real", "models/generator", "data/generated"),
            "judge": run_judge(p, "data/generated", "data/judged"),
            "dedup": run_dedup(p, "data/judged", "data/deduped"),
            "tag": run_tag(p, "data/deduped", "data/tagged"),
            "split": run_split(p, "data/tagged", "data/split"),
        }


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    from synthforge.project import init_project

    root = init_project(tmp_path_factory.mktemp("digits") / "proj")
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(merge_params(params, FAST), sort_keys=False))
    stats = run_image_pipeline(root)
    return root, stats


def use_rules_only(root: Path) -> None:
    """The text-eval recipe without its models: templates and adversarial variants, rule checks, exact and MinHash
    dedup. The whole pipeline runs in seconds."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["generate"]["methods"] = [m for m in params["generate"]["methods"] if m["name"] in ("template", "adversarial")]
    rules = ("format", "required_fields", "length", "banned_patterns", "safety")
    params["judge"]["checks"] = [c for c in params["judge"]["checks"] if c["name"] in rules]
    for model_step in ("semantic", "decontaminate"):
        params["dedup"].pop(model_step)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


@pytest.fixture(scope="session")
def rules_project(tmp_path_factory) -> Path:
    """A text-eval project on rules only, its pipeline run once. Tests work on copies (`workdir`)."""
    from synthforge.project import init_project

    root = init_project(tmp_path_factory.mktemp("faults") / "evalset", pipeline="text-eval")
    use_rules_only(root)
    run_pipeline(root)
    return root


def damage_page(path: Path, column: str) -> None:
    """Overwrite the middle of one column's data in a Parquet file; its footer (the schema) stays readable."""
    meta = pq.ParquetFile(path).metadata
    index = next(j for j in range(meta.num_columns) if meta.row_group(0).column(j).path_in_schema == column)
    chunk = meta.row_group(0).column(index)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(path.read_bytes())
    middle = start + chunk.total_compressed_size // 2
    data[middle : middle + 32] = bytes(range(32))
    path.write_bytes(bytes(data))
