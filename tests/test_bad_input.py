"""Bad input: one line naming the file, line or key; exit code 2; nothing already written changes."""

from __future__ import annotations

import shutil

import pytest
from conftest import cli, tree_digest


@pytest.fixture
def workdir(project, tmp_path):
    """A copy of the session project, so a test can break its inputs."""
    target = tmp_path / "proj"
    shutil.copytree(project, target, ignore=shutil.ignore_patterns(".git", ".dvc"))
    return target


def _assert_refused(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (("max_chars: 4000", "max_chars: lots"), ["params.yaml: judge.checks[2].max_chars: expected", "'lots'"]),
        (("  exact: true", "  exact: true\n  threshhold: 0.5"), ["params.yaml: dedup: unknown key 'threshhold'"]),
        (("- name: length", "- name: lenght"), ["params.yaml: judge.checks[2].name: unknown check 'lenght'", "length"]),
        (("ratios: {train: 0.7", "ratios: {train: -1"), ["params.yaml: split.ratios.train"]),
        (
            ("      min_chars: 40", "      min_chars: 40\n      max_words: 3"),
            ["judge.checks[2].max_words: unknown option for 'length'"],
        ),
    ],
)
def test_bad_params_are_refused_naming_the_key(workdir, edit, fragments):
    params = workdir / "params.yaml"
    assert edit[0] in params.read_text()
    params.write_text(params.read_text().replace(edit[0], edit[1], 1))
    before = tree_digest(workdir / "data")
    _assert_refused(cli("judge", "--in", "data/generated", "--out", "data/judged", cwd=workdir), *fragments)
    assert tree_digest(workdir / "data") == before


def test_unknown_generation_method_is_refused(workdir):
    params = workdir / "params.yaml"
    params.write_text(params.read_text().replace("- name: adversarial", "- name: paraphrse"))
    before = tree_digest(workdir / "data")
    _assert_refused(
        cli("generate", "--out", "data/generated", cwd=workdir), "generate.methods[3].name: unknown generator 'paraphrse'"
    )
    assert tree_digest(workdir / "data") == before


def test_broken_source_line_is_refused_naming_file_and_line(workdir):
    sources = workdir / "sources" / "customer_requests.jsonl"
    lines = sources.read_text().splitlines()
    lines[3] = lines[3][:-10]  # truncated JSON on line 4
    sources.write_text("\n".join(lines) + "\n")
    before = tree_digest(workdir / "data")
    _assert_refused(cli("generate", "--out", "data/generated", cwd=workdir), "customer_requests.jsonl:4: invalid JSON")
    assert tree_digest(workdir / "data") == before


def test_missing_input_stage_is_refused(workdir):
    before = tree_digest(workdir / "data")
    _assert_refused(cli("dedup", "--in", "data/nowhere", "--out", "data/deduped", cwd=workdir), "data/nowhere", "does not exist")
    shutil.rmtree(workdir / "data" / "tagged" / "samples")
    _assert_refused(cli("split", "--in", "data/tagged", "--out", "data/split", cwd=workdir), "data/tagged: not a stage directory")
    assert tree_digest(workdir / "data" / "split") == {k[len("split/") :]: v for k, v in before.items() if k.startswith("split/")}


def test_params_file_that_is_not_yaml_names_the_line(workdir):
    (workdir / "params.yaml").write_text("seed: 1\njudge: [unclosed\n")
    _assert_refused(cli("judge", cwd=workdir), "params.yaml:3: not valid YAML")


def test_bad_regular_expression_names_the_pattern(workdir):
    params = workdir / "params.yaml"
    params.write_text(params.read_text().replace('"lorem ipsum"', '"lorem (ipsum"'))
    _assert_refused(cli("judge", cwd=workdir), "judge.checks[3].patterns[1]: invalid regular expression 'lorem (ipsum'")
