"""Dataset cards: the figures (PNG in images/), the card's sections, and the standalone HTML report."""

from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml
from PIL import Image

from synthforge.card import card_figures, class_key, render_card
from synthforge.errors import BadInput
from synthforge.provenance import make_sample_id, new_record
from synthforge.registry import Registry
from synthforge.report import write_report
from synthforge.stagedir import StageWriter, stage_fingerprint
from synthforge.stages.generate import CONTENT_SCHEMA
from synthforge.vision.images import IMAGE_CONTENT_SCHEMA, encode_png

LEVELS = ["easy", "medium", "hard", "adversarial"]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
INTENTS = ["refund-request", "order-status", "cancel-order"]
JUDGE_PARAMS = {"judge": {"checks": [{"name": "length", "min_chars": 40}, {"name": "llm_judge", "min_score": 3}]}}
IMAGE_FIGURES = {
    "difficulty_by_split.png",
    "grid_by_class.png",
    "grid_by_difficulty.png",
    "labels_by_split.png",
    "judge_scores.png",
    "vog.png",
    "generators.png",
}


def _check(name: str, score: float | None) -> dict:
    return {"name": name, "verdict": "pass", "score": score, "reason": None, "raw_output": None, "parsed": True}


def image_rows(n: int = 60) -> list[dict]:
    """n sklearn digits with the image_format and VoG scores a judged image pipeline records; every 5th is test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = []
    for i in range(n):
        label = int(digits.target[i])
        source = {"uri": "sklearn://digits", "row": i}
        sid = make_sample_id(source, {"label": label})
        prov = new_record(
            sample_id=sid,
            run_id="run-1",
            source=source,
            method="diffusion",
            model="unet-lora",
            batch_id="b1",
            prompt_template_id="class_name",
            prompt_version="1",
        )
        normalized = (i % 7) / 3 - 0.5
        prov["vog"] = {
            "score": 0.01 * (i % 11),
            "normalized": normalized,
            "direction": "drop_lowest",
            "target": "logit",
            "checkpoints": ["epoch-10", "epoch-20"],
            "normalization": "per_class_zscore",
            "drop_fraction": 0.25,
            "class_threshold": -0.6,
            "classifier": None,
        }
        prov["judge"] = {"verdict": "pass", "checks": [_check("image_format", 20.0 + i % 30), _check("vog", normalized)]}
        prov["difficulty"] = LEVELS[i % 4]
        prov["split"] = "test" if i % 5 == 0 else "train"
        grey = (digits.images[i] * 255 / 16).astype(np.uint8)
        rows.append({"sample_id": sid, "image": encode_png(grey), "label": label, "label_name": DIGITS[label], "caption": None})
        rows[-1]["provenance"] = prov
    return rows


def text_rows(n: int = 40, scored: bool = True) -> list[dict]:
    """n eval items from two generators; with `scored`, the length and LLM-judge scores a text judge records."""
    rows = []
    for i in range(n):
        source = {"uri": "sources/faq.jsonl", "record_id": f"faq-{i}", "row": i}
        content = {
            "prompt": f"Customer message number {i}: where is my order and when will it arrive?",
            "reference": '{"answer": "It ships in two days."}',
            "label": INTENTS[i % 3],
            "constraints": [],
            "locale": "en",
            "context": None,
        }
        sid = make_sample_id(source, content)
        llm = i % 4 == 0
        prov = new_record(
            sample_id=sid,
            run_id="run-1",
            source=source,
            method="paraphrase" if llm else "template",
            model="tiny-gpt2" if llm else "jinja2-template-engine",
            batch_id="b2" if llm else "b1",
            prompt_template_id="support_qa",
            prompt_version="2" if llm else "1",
        )
        checks = (
            [_check("length", len(content["prompt"])), _check("llm_judge", 3 + i % 3)] if scored else [_check("format", None)]
        )
        prov["judge"] = {"verdict": "pass", "checks": checks}
        prov["difficulty"] = LEVELS[i % 3]
        prov["split"] = ["train", "validation", "test"][i % 3]
        rows.append({"sample_id": sid, **content, "provenance": prov})
    return rows


def by_split(rows: list[dict], order: list[str]) -> dict[str, list[dict]]:
    return {s: [r for r in rows if r["provenance"]["split"] == s] for s in order}


def _card(figures, splits, schema, classes, **extra) -> str:
    stages = [
        stage_fingerprint("generate", {"generate": {"methods": ["template"]}, "seed": 7}, {}),
        stage_fingerprint("judge", JUDGE_PARAMS, {}),
        stage_fingerprint("split", {"split": {"ratios": {"train": 0.8, "test": 0.2}}}, {}),
    ]
    return render_card(
        name="demo",
        version="2.0.0",
        description="A demo dataset.",
        license="mit",
        schema=schema,
        split_files={s: f"data/{s}-*.parquet" for s in splits},
        split_bytes=dict.fromkeys(splits, 1000),
        by_split=splits,
        stage_stats=[{"stage": "judge", "entered": 70, "kept": 60, "rejected": 10, "rejected_by": {"judge.vog": 10}}],
        stage_info=stages,
        load_call='synthforge.load("demo", version="2.0.0")',
        figures=figures,
        class_key=classes,
        **extra,
    )


@pytest.fixture(scope="module")
def image_version(tmp_path_factory):
    """A version folder (README.md + images/) of an image dataset, as card_figures and render_card write it."""
    root = tmp_path_factory.mktemp("image-version")
    rows = image_rows()
    splits = by_split(rows, ["train", "test"])
    classes = class_key(IMAGE_CONTENT_SCHEMA, rows)
    figures = card_figures(root / "images", splits, image_column="image", class_key=classes)
    (root / "README.md").write_text(_card(figures, splits, IMAGE_CONTENT_SCHEMA, classes))
    return root, figures, rows


def test_image_figures_are_readable_pngs_and_the_same_data_draws_the_same_bytes(image_version, tmp_path):
    root, figures, rows = image_version
    assert {f.path for f in figures} == {f"images/{name}" for name in IMAGE_FIGURES}
    again = card_figures(
        tmp_path / "images",
        by_split(rows, ["train", "test"]),
        image_column="image",
        class_key=class_key(IMAGE_CONTENT_SCHEMA, rows),
    )
    assert [f.path for f in again] == [f.path for f in figures]
    for figure in figures:
        png = (root / figure.path).read_bytes()
        with Image.open(root / figure.path) as image:
            assert image.format == "PNG" and 500 <= image.width <= 900 and 100 <= image.height <= 1000, figure.path
            assert np.asarray(image.convert("L")).std() > 10, figure.path  # something is drawn
            assert "Software" not in image.info  # no matplotlib version in the bytes
        assert (tmp_path / figure.path).read_bytes() == png, f"{figure.path} differs between two runs"


def test_text_without_scores_or_images_gets_no_judge_vog_or_grid_figure(tmp_path):
    rows = text_rows(scored=False)
    splits = by_split(rows, ["train", "validation", "test"])
    figures = card_figures(tmp_path / "images", splits, image_column=None, class_key=class_key(CONTENT_SCHEMA, rows))
    files = {p.name for p in (tmp_path / "images").iterdir()}
    assert files == {"difficulty_by_split.png", "labels_by_split.png", "generators.png"}
    assert {f.path for f in figures} == {f"images/{name}" for name in files}


def test_judge_histograms_show_the_pass_threshold_the_judge_stage_ran_with(tmp_path):
    splits = by_split(text_rows(), ["train", "validation", "test"])
    judged = [stage_fingerprint("judge", JUDGE_PARAMS, {})]
    with_threshold = card_figures(tmp_path / "a", splits, image_column=None, class_key=None, stage_info=judged)
    card_figures(tmp_path / "b", splits, image_column=None, class_key=None)
    assert [f.path for f in with_threshold] == ["a/difficulty_by_split.png", "a/judge_scores.png", "a/generators.png"]
    assert (tmp_path / "a" / "judge_scores.png").read_bytes() != (tmp_path / "b" / "judge_scores.png").read_bytes()
    assert "pass thresholds" in next(f.caption for f in with_threshold if f.path.endswith("judge_scores.png"))


def test_many_labels_fold_into_other_so_the_figure_stays_readable(tmp_path):
    rows = text_rows(120)
    for i, row in enumerate(rows):
        row["label"] = f"intent-{i % 40:02d}"
    splits = by_split(rows, ["train", "validation", "test"])
    card_figures(tmp_path / "images", splits, image_column=None, class_key=class_key(CONTENT_SCHEMA, rows))
    with Image.open(tmp_path / "images" / "labels_by_split.png") as image:
        assert image.height <= 800  # 12 labels and "other", not 40 rows of bars


def test_card_shows_every_figure_with_its_caption_and_the_lineage_with_params(image_version):
    root, figures, rows = image_version
    card = (root / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert "synthetic" in meta["tags"] and meta["source_datasets"] == ["original"] and meta["size_categories"] == ["n<1K"]
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == {"train": 48, "test": 12}
    for figure in figures:
        assert f"![{figure.title}]({figure.path})" in body and figure.caption in body
    lineage = body.split("## Lineage", 1)[1]
    judge = stage_fingerprint("judge", JUDGE_PARAMS, {})
    assert f"| judge | `{judge['fingerprint'][:16]}` | `{judge['params_hash'][:16]}` |" in lineage
    assert "<summary>judge params</summary>" in lineage and "min_score: 3" in lineage and "seed: 7" in lineage
    assert "| diffusion | unet-lora | class_name | 1 | 60 |" in body
    nines = sum(r["label"] == 9 for r in rows)
    assert f"| nine | {nines} | 0 | {nines} |" in body.split("## Labels", 1)[1]
    assert 'ds = synthforge.load("demo", version="2.0.0")' in body and "load_dataset" not in body


def test_card_warns_of_advisories_and_lists_the_changelog_and_the_hub_revision():
    rows = text_rows()
    splits = by_split(rows, ["train", "validation", "test"])
    advisory = {
        "affects": ["1.0.0", "1.1.0"],
        "reason": "batch b2 copied a held-out eval item.",
        "clean_version": "2.0.0",
        "selector": {"batch": "b2"},
        "samples": {"1.0.0": 10, "1.1.0": 7},
        "date": "2026-11-20",
    }
    changelog = [
        {
            "version": "2.0.0",
            "date": "2026-11-19",
            "summary": "new intents",
            "diff": {"added": 12, "removed": 1, "changed": 2, "moved": 0},
        },
    ]
    card = _card([], splits, CONTENT_SCHEMA, None, changelog=changelog, advisories=[advisory], hub_repo="acme/demo")
    body = card.split("---\n", 2)[2]
    quarantined = body.split("## Quarantined versions", 1)[1]
    assert "**batch b2 copied a held-out eval item.** (batch=b2, 2026-11-20)" in quarantined
    assert "affects 1.0.0 (10 samples), 1.1.0 (7 samples); clean: this version." in quarantined
    assert "| 2.0.0 | 2026-11-19 | new intents | 12 | 1 | 2 | 0 |" in body.split("## Changelog", 1)[1]
    assert 'datasets.load_dataset("acme/demo", revision="v2.0.0")' in body


class _Resources(HTMLParser):
    """Every tag name in a page, the links of <a> tags and the src/href of every other tag (what a browser loads)."""

    def __init__(self):
        super().__init__()
        self.tags, self.links, self.sources = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for key, value in attrs:
            if tag == "a" and key == "href":
                self.links.append(value)
            elif key in ("src", "href"):
                self.sources.append(value)


def test_report_is_one_standalone_page_with_the_tables_and_every_figure_inlined(image_version, tmp_path):
    root, figures, _ = image_version
    out = write_report(root, tmp_path / "report" / "demo-2.0.0.html")
    page = out.read_text()
    parser = _Resources()
    parser.feed(page)
    assert "script" not in parser.tags and "link" not in parser.tags and "iframe" not in parser.tags
    assert parser.links == []  # the card has no links, so none may point out
    inlined = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in parser.sources]
    assert all(src.startswith("data:image/png;base64,") for src in parser.sources)
    assert inlined == [(root / f.path).read_bytes() for f in figures]  # every figure, in card order, byte for byte
    assert parser.tags.count("table") >= 6  # metadata, splits, classes, stages, generators, lineage
    assert "<h2>Lineage</h2>" in page and "<summary>judge params</summary>" in page and "<td>nine</td>" in page
    assert list(out.parent.iterdir()) == [out]  # the temporary file was renamed, not left behind


def test_report_names_an_image_the_version_does_not_have(image_version, tmp_path):
    root, _, _ = image_version
    version = tmp_path / "version"
    shutil.copytree(root, version)
    (version / "images" / "vog.png").unlink()
    with pytest.raises(BadInput, match=r"image 'images/vog\.png' is not a PNG file of the version"):
        write_report(version, tmp_path / "report.html")
    readme = version / "README.md"
    readme.write_text(readme.read_text().replace("images/vog.png", "https://example.com/vog.png"))
    with pytest.raises(BadInput, match=r"image 'https://example\.com/vog\.png'"):
        write_report(version, tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()


def test_a_published_version_holds_the_figures_its_card_shows(tmp_path):
    rows = image_rows(40)
    split_dir = tmp_path / "data" / "split"
    with StageWriter(split_dir, "split", IMAGE_CONTENT_SCHEMA, stage_fingerprint("split", {}, {})) as writer:
        writer.write(rows)
    result = Registry(tmp_path / "registry").publish(
        split_dir, "digits", "1.0.0", {"split": {"ratios": {"train": 0.8, "test": 0.2}}}, tmp_path
    )
    git = ["git", "--git-dir", str(result.repo)]
    files = subprocess.run([*git, "ls-tree", "-r", "--name-only", "v1.0.0"], capture_output=True, text=True, check=True).stdout
    card = subprocess.run([*git, "show", "v1.0.0:README.md"], capture_output=True, text=True, check=True).stdout
    assert {f"images/{name}" for name in IMAGE_FIGURES} <= set(files.split())
    for name in IMAGE_FIGURES:
        assert f"(images/{name})" in card
