"""diff: samples added, removed, changed and moved between two version manifests, distribution shifts, and the
semantic version that difference calls for (Croissant 1.1: PATCH same records, MINOR additions, MAJOR the rest)."""

from __future__ import annotations

import io
import json
import random
import re

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from synthforge.diff import ScoreStats, check_version, diff_manifests, next_version, print_diff
from synthforge.errors import BadInput
from synthforge.provenance import PROVENANCE_TYPE, new_record

# The version manifest as published (synthforge.registry): content identity, split, the label, the hashes trace
# searches by, and the provenance struct.
SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("split", pa.string()),
        ("content_hash", pa.string()),
        ("label", pa.string()),
        ("text_hash", pa.string()),
        ("minhash_bands", pa.list_(pa.uint64())),
        ("provenance", PROVENANCE_TYPE),
    ]
)


def check(name: str, score: float | None) -> dict:
    return {
        "name": name,
        "verdict": "pass",
        "score": score,
        "reason": None,
        "raw_output": None,
        "parsed": True,
        "judged_by": None,
        "difficulty": None,
    }


def provenance(
    sample_id: str,
    split: str,
    *,
    difficulty: str = "easy",
    method: str = "template",
    model: str = "jinja2",
    prompt: str = "qa@1",
    scores: dict[str, float | None] | None = None,
    vog: float | None = None,
) -> dict:
    template, version = prompt.split("@")
    record = new_record(
        sample_id=sample_id,
        run_id="run-1",
        source={"uri": "sources/seed.jsonl", "record_id": sample_id, "row": 0},
        method=method,
        model=model,
        batch_id="batch-1",
        prompt_template_id=template,
        prompt_version=version,
    )
    checks = [check(name, score) for name, score in (scores or {}).items()]
    record.update(difficulty=difficulty, split=split, judge={"verdict": "pass", "checks": checks})
    if vog is not None:
        record["vog"] = {"score": vog, "normalized": 0.0, "direction": "drop_lowest", "target": "logit"}
    return record


def row(sample_id: str, split: str = "train", content: str = "v1", label: str | None = None, **prov) -> dict:
    return {
        "sample_id": sample_id,
        "split": split,
        "content_hash": f"{sample_id}-{content}",
        "label": label,
        "text_hash": None,
        "minhash_bands": None,
        "provenance": provenance(sample_id, split, **prov),
    }


def manifest(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


BASE = [row("a"), row("b"), row("c", "test"), row("d", "test")]


# -- which samples differ, and the bump --------------------------------------------------------------------------


def test_same_records_are_a_patch_even_when_provenance_changes():
    # Re-tagged difficulty and a new judge score leave the records as they were: a patch release.
    retagged = [row(r["sample_id"], r["split"], difficulty="hard", scores={"llm_judge": 0.9}) for r in BASE]
    diff = diff_manifests(manifest(BASE), manifest(retagged), "1.2.3", None)
    assert (diff.added, diff.removed, diff.changed, diff.moved) == ([], [], [], [])
    assert diff.unchanged == 4
    assert diff.bump == "patch"
    assert next_version("1.2.3", diff) == "1.2.4"


def test_additions_only_are_a_minor_release():
    diff = diff_manifests(manifest(BASE), manifest([*BASE, row("f"), row("e", "test")]), "1.2.3", "1.3.0")
    assert diff.added == ["e", "f"]
    assert (diff.removed, diff.changed, diff.moved, diff.unchanged) == ([], [], [], 4)
    assert diff.bump == "minor"
    assert next_version("1.2.3", diff) == "1.3.0"


@pytest.mark.parametrize(
    ("new_rows", "field", "expected"),
    [
        ([row("a"), row("b"), row("c", "test")], "removed", ["d"]),
        ([row("a"), row("b", content="v2"), row("c", "test"), row("d", "test")], "changed", ["b"]),
        ([row("a"), row("b", "test"), row("c", "test"), row("d", "test")], "moved", [("b", "train", "test")]),
        # Additions do not soften a removal.
        ([row("a"), row("b"), row("c", "test"), row("e")], "removed", ["d"]),
    ],
    ids=["removed", "changed", "moved", "removed-and-added"],
)
def test_removed_changed_or_moved_records_are_a_major_release(new_rows, field, expected):
    diff = diff_manifests(manifest(BASE), manifest(new_rows), "1.2.3", None)
    assert getattr(diff, field) == expected
    assert diff.bump == "major"
    assert next_version("1.2.3", diff) == "2.0.0"


def test_a_changed_record_in_another_split_counts_as_changed_and_moved():
    new = [row("a"), row("b", "test", content="v2"), row("c", "test"), row("d", "test")]
    diff = diff_manifests(manifest(BASE), manifest(new))
    assert diff.changed == ["b"]
    assert diff.moved == [("b", "train", "test")]
    assert diff.unchanged == 3
    assert diff.to_dict()["counts"] == {"old": 4, "new": 4, "added": 0, "removed": 0, "changed": 1, "moved": 1, "unchanged": 3}


def test_the_first_version_adds_everything_and_starts_at_1_0_0():
    diff = diff_manifests(None, manifest(BASE), None, None)
    assert diff.added == ["a", "b", "c", "d"]
    assert diff.bump == "none"
    assert next_version(None, diff) == "1.0.0"
    check_version(None, "0.1.0", diff)  # the first version may be any version


# -- check_version: a requested version must say what the diff does ----------------------------------------------


def test_a_patch_version_for_removed_and_moved_samples_is_refused_with_the_counts():
    new = [row("a", "test"), row("x"), row("y", "test")]  # b, c, d removed; a moved
    diff = diff_manifests(manifest(BASE), manifest(new), "2.0.0", None)
    with pytest.raises(BadInput) as err:
        check_version("2.0.0", "2.0.1", diff)
    assert str(err.value) == (
        "2.0.1 would be a patch release, but 3 samples were removed and 1 moved between splits: the next version is 3.0.0"
    )
    with pytest.raises(BadInput, match=r"^2\.1\.0 would be a minor release, but .*: the next version is 3\.0\.0$"):
        check_version("2.0.0", "v2.1.0", diff)
    check_version("2.0.0", "3.0.0", diff)


def test_a_patch_version_for_additions_is_refused_and_a_bigger_bump_allowed():
    diff = diff_manifests(manifest(BASE), manifest([*BASE, row("e")]), "2.0.0", None)
    with pytest.raises(
        BadInput, match=r"^2\.0\.1 would be a patch release, but 1 sample was added: the next version is 2\.1\.0$"
    ):
        check_version("2.0.0", "2.0.1", diff)
    check_version("2.0.0", "2.1.0", diff)
    check_version("2.0.0", "3.0.0", diff)  # MAJOR for additions only: more caution than needed, not a lie


@pytest.mark.parametrize("proposed", ["2.0.0", "1.9.9", "v1.0.0"])
def test_a_version_not_after_the_latest_is_refused(proposed):
    diff = diff_manifests(manifest(BASE), manifest(BASE), "2.0.0", None)
    with pytest.raises(BadInput, match=r"is not greater than the latest version 2\.0\.0: the next version is 2\.0\.1$"):
        check_version("2.0.0", proposed, diff)


def test_a_version_that_is_not_semantic_is_refused():
    diff = diff_manifests(manifest(BASE), manifest(BASE))
    with pytest.raises(BadInput, match="'2.1' is not semantic"):
        check_version("2.0.0", "2.1", diff)


# -- distribution shifts ------------------------------------------------------------------------------------------


def test_shifts_count_each_value_before_and_after():
    old = [
        row("a", difficulty="easy", prompt="qa@1"),
        row("b", difficulty="easy", prompt="qa@1"),
        row("c", "test", difficulty="hard", prompt="qa@1"),
        row("d", "test", difficulty="hard", prompt="qa@1"),
    ]
    new = [
        row("a", difficulty="easy", prompt="qa@1", label="yes"),
        row("c", "test", difficulty="hard", prompt="qa@1", label="no"),
        row("e", difficulty="hard", method="llm", model="tiny-gpt2", prompt="qa@2", label="no"),
        row("f", difficulty="adversarial", method="llm", model="tiny-gpt2", prompt="qa@2"),
        row("g", "test", difficulty="hard", method="llm", model="tiny-gpt2", prompt="qa@2", label="yes"),
    ]
    # The old manifest predates the label column: its labels read as missing.
    diff = diff_manifests(manifest(old).drop_columns(["label"]), manifest(new), "1.0.0", "2.0.0")

    def table(name):
        return {
            r.value: (r.old, r.new, round(r.old_share, 4), round(r.new_share, 4), round(r.delta_pp, 4))
            for r in diff.shifts[name].rows()
        }

    assert table("difficulty") == {
        "easy": (2, 1, 0.5, 0.2, -30.0),
        "hard": (2, 3, 0.5, 0.6, 10.0),
        "adversarial": (0, 1, 0.0, 0.2, 20.0),
    }
    assert table("label") == {None: (4, 1, 1.0, 0.2, -80.0), "yes": (0, 2, 0.0, 0.4, 40.0), "no": (0, 2, 0.0, 0.4, 40.0)}
    assert table("generator") == {"template · jinja2": (4, 2, 1.0, 0.4, -60.0), "llm · tiny-gpt2": (0, 3, 0.0, 0.6, 60.0)}
    assert table("prompt_version") == {"qa@1": (4, 2, 1.0, 0.4, -60.0), "qa@2": (0, 3, 0.0, 0.6, 60.0)}
    assert table("split") == {"train": (2, 3, 0.5, 0.6, 10.0), "test": (2, 2, 0.5, 0.4, -10.0)}
    assert [r.value for r in diff.shifts["difficulty"].rows()] == ["hard", "easy", "adversarial"]  # most frequent first


def test_judge_scores_summarise_numeric_checks_and_vog():
    old = [
        row(s, scores={"llm_judge": v, "format": None}, vog=10 * v)
        for s, v in zip("abcde", [1.0, 2.0, 3.0, 4.0, 5.0], strict=True)
    ]
    new = [
        row(s, scores={"llm_judge": v, "format": None, "faithfulness": 0.5})
        for s, v in zip("abcdefghij", range(1, 11), strict=True)
    ]
    diff = diff_manifests(manifest(old), manifest(new), "1.0.0", "1.1.0")

    # `format` passes or fails without a score: no distribution to show. VoG comes last.
    assert list(diff.judge_scores) == ["faithfulness", "llm_judge", "vog.score"]
    judge = diff.judge_scores["llm_judge"]
    assert judge.old == ScoreStats(n=5, mean=3.0, median=3.0, p10=pytest.approx(1.4), p90=pytest.approx(4.6))
    assert judge.new == ScoreStats(n=10, mean=5.5, median=5.5, p10=pytest.approx(1.9), p90=pytest.approx(9.1))
    assert judge.delta_mean == pytest.approx(2.5)
    assert diff.judge_scores["faithfulness"].old is None
    assert diff.judge_scores["faithfulness"].delta_mean is None
    assert diff.judge_scores["vog.score"].old.mean == pytest.approx(30.0)
    assert diff.judge_scores["vog.score"].new is None


# -- output ------------------------------------------------------------------------------------------------------


def test_to_dict_is_json_and_does_not_depend_on_row_order():
    new = [
        row("a", "test"),
        row("b", content="v2"),
        row("e", label="x", scores={"llm_judge": 0.3}),
        row("f", scores={"llm_judge": 0.7}),
    ]
    shuffled = new[:]
    random.Random(0).shuffle(shuffled)
    first = diff_manifests(manifest(BASE), manifest(new), "1.0.0", None).to_dict()
    again = diff_manifests(manifest(list(reversed(BASE))), manifest(shuffled), "1.0.0", None).to_dict()
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert first["bump"] == "major"
    assert first["moved"] == [{"sample_id": "a", "from": "train", "to": "test"}]
    assert first["removed"] == ["c", "d"]


def test_print_diff_shows_counts_moved_samples_and_deltas():
    new = [row("a", "test"), row("b", difficulty="hard"), row("c", "test"), row("d", "test"), row("e")]
    diff = diff_manifests(manifest(BASE), manifest(new), "1.0.0", "2.0.0")
    out = io.StringIO()
    print_diff(diff, Console(file=out, width=160))
    text = out.getvalue()
    assert "1.0.0 → 2.0.0: major release" in text
    assert re.search(r"│ moved\s+│ 1\s+│ a\s+│", text)
    assert re.search(r"│ a\s+│ train\s+│ test\s+│", text)  # the moved sample, from and to
    # easy: 4 of 4 -> 4 of 5 samples; hard: none -> 1 of 5.
    assert re.search(r"│ easy\s+│ 4\s+│ 100.0%\s+│ 4\s+│ 80.0%\s+│ -20.0 │", text)
    assert re.search(r"│ hard\s+│ 0\s+│ 0.0%\s+│ 1\s+│ 20.0%\s+│ \+20.0 │", text)


def test_manifests_in_several_chunks_or_sliced_compare_like_whole_ones():
    old = pa.concat_tables([manifest(BASE[:2]), manifest(BASE[2:])])
    new = manifest([*BASE, row("e", difficulty="hard")]).slice(1)  # "a" sliced off
    diff = diff_manifests(old, new)
    assert (diff.added, diff.removed, diff.unchanged) == (["e"], ["a"], 3)
    assert diff.shifts["difficulty"].new == {"easy": 3, "hard": 1}


# -- bad manifests ------------------------------------------------------------------------------------------------


def test_a_sample_listed_twice_is_refused_naming_it_and_the_version():
    with pytest.raises(BadInput, match="the manifest of version 1.0.0 lists sample b 2 times"):
        diff_manifests(manifest([*BASE, row("b", "test")]), manifest(BASE), "1.0.0", None)


def test_a_manifest_without_content_hashes_is_refused():
    with pytest.raises(BadInput, match="the manifest of the candidate version lacks the column.* content_hash"):
        diff_manifests(manifest(BASE), manifest(BASE).drop_columns(["content_hash"]))


# -- properties ---------------------------------------------------------------------------------------------------

SPLITS = ["train", "validation", "test"]
RECORDS = st.dictionaries(
    st.integers(0, 40).map(lambda i: f"s{i:02d}"), st.tuples(st.sampled_from(SPLITS), st.sampled_from(["h1", "h2"])), max_size=30
)


@st.composite
def next_records(draw, old: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """A later version of `old`: each record kept, removed, edited, moved or both, plus new records. Kept
    comes first so that shrinking leads to the smallest change."""
    new = {}
    for sample_id, (split, content) in old.items():
        fate = draw(st.sampled_from(["keep", "remove", "edit", "move", "edit and move"]))
        if fate != "remove":
            moved = draw(st.sampled_from([x for x in SPLITS if x != split])) if "move" in fate else split
            new[sample_id] = (moved, content + "'" if "edit" in fate else content)
    additions = draw(st.dictionaries(st.integers(0, 20).map(lambda i: f"n{i:02d}"), st.sampled_from(SPLITS), max_size=5))
    return new | {sample_id: (split, "h1") for sample_id, split in additions.items()}


def bare(records: dict[str, tuple[str, str]]) -> pa.Table:
    rows = [{"sample_id": s, "split": split, "content_hash": h, "provenance": None} for s, (split, h) in records.items()]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), old=RECORDS)
def test_every_new_sample_is_added_unchanged_or_changed_and_the_bump_follows_the_rule(data, old):
    # Half the time an unrelated manifest, half the time a later version of the same one.
    new = data.draw(st.one_of(RECORDS, next_records(old)))
    diff = diff_manifests(bare(old), bare(new), "1.4.2", None)
    differing = set(diff.changed) | {s for s, _, _ in diff.moved}
    assert not set(diff.added) & differing
    assert len(diff.added) + diff.unchanged + len(differing) == len(new)
    assert set(diff.added) | differing <= new.keys()
    assert set(diff.added) == new.keys() - old.keys()
    assert set(diff.removed) == old.keys() - new.keys()
    assert set(diff.changed) == {s for s in old.keys() & new.keys() if old[s][1] != new[s][1]}
    assert set(diff.moved) == {(s, old[s][0], new[s][0]) for s in old.keys() & new.keys() if old[s][0] != new[s][0]}

    if old.keys() - new.keys() or any(old[s] != new[s] for s in old.keys() & new.keys()):
        assert (diff.bump, next_version("1.4.2", diff)) == ("major", "2.0.0")
    elif new.keys() - old.keys():
        assert (diff.bump, next_version("1.4.2", diff)) == ("minor", "1.5.0")
    else:
        assert (diff.bump, next_version("1.4.2", diff)) == ("patch", "1.4.3")
    check_version("1.4.2", next_version("1.4.2", diff), diff)


# -- scale --------------------------------------------------------------------------------------------------------


def big_manifest(ids: np.ndarray, splits: np.ndarray, hashes: np.ndarray, scores: np.ndarray) -> pa.Table:
    """A version manifest built column by column. Its provenance carries only what an older synthforge wrote
    (no vog, no contamination): the diff reads the fields a manifest has."""
    n = len(ids)
    checks = pa.ListArray.from_arrays(
        pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
        pa.StructArray.from_arrays(
            [pa.array(np.tile(["llm_judge", "format"], n)), pa.array(np.column_stack([scores, np.full(n, np.nan)]).ravel())],
            names=["name", "score"],
        ),
    )
    generation = pa.StructArray.from_arrays(
        [pa.array(np.full(n, "template")), pa.array(np.full(n, "jinja2")), pa.array(np.full(n, "qa")), pa.array(np.full(n, "1"))],
        names=["method", "model", "prompt_template_id", "prompt_version"],
    )
    judge = pa.StructArray.from_arrays([pa.array(np.full(n, "pass")), checks], names=["verdict", "checks"])
    difficulty = pa.array(np.where(scores > 0.5, "easy", "hard"))
    return pa.table(
        {
            "sample_id": pa.array(np.char.add("s", ids.astype(str))),
            "split": pa.array(splits),
            "content_hash": pa.array(np.char.add("h", hashes.astype(str))),
            "provenance": pa.StructArray.from_arrays(
                [generation, judge, difficulty], names=["generation", "judge", "difficulty"]
            ),
        }
    )


def test_a_200k_sample_diff():
    n = 200_000
    rng = np.random.default_rng(0)
    ids = np.arange(n)
    splits = rng.choice(np.array(["train", "validation", "test"]), n)
    scores = rng.random(n)
    old = big_manifest(ids, splits, ids, scores)

    # New: the first 1,000 removed, 2,000 added, 500 edited, 300 moved to another split.
    new_ids = np.concatenate([ids[1000:], np.arange(n, n + 2000)])
    new_splits = np.concatenate([splits[1000:], np.full(2000, "train")])
    new_hashes = new_ids.copy()
    new_hashes[:500] += 10 * n
    new_splits[500:800] = np.where(new_splits[500:800] == "test", "train", "test")
    new = big_manifest(new_ids, new_splits, new_hashes, np.concatenate([scores[1000:], rng.random(2000)]))

    diff = diff_manifests(old, new, "1.0.0", None)
    counts = diff.to_dict()["counts"]
    assert counts == {
        "old": n,
        "new": n + 1000,
        "added": 2000,
        "removed": 1000,
        "changed": 500,
        "moved": 300,
        "unchanged": n - 1800,
    }
    assert diff.removed[:2] == ["s0", "s1"]
    assert diff.judge_scores["llm_judge"].new.n == n + 1000
    assert list(diff.judge_scores) == ["llm_judge"]  # `format` has no numeric score (NaN)
    assert sum(diff.shifts["difficulty"].new.values()) == n + 1000
    assert next_version("1.0.0", diff) == "2.0.0"
