"""croissant.json of a published version: validated and read back with mlcroissant, the reference implementation."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlcroissant as mlc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rdflib

from synthforge import release
from synthforge.croissant import verify_checksums, write_croissant
from synthforge.provenance import make_sample_id, new_record
from synthforge.registry import Registry
from synthforge.stagedir import StageWriter, reject, stage_fingerprint
from synthforge.stages.generate import CONTENT_SCHEMA
from synthforge.versions import PublishResult, quarantine
from synthforge.vision.images import IMAGE_CONTENT_SCHEMA, decode_image, encode_png

PROV = rdflib.Namespace("http://www.w3.org/ns/prov#")
RAI = rdflib.Namespace("http://mlcommons.org/croissant/RAI/")
SDO = rdflib.Namespace("https://schema.org/")
DCT = rdflib.Namespace("http://purl.org/dc/terms/")

GENERATOR = {"model": "tiny-gpt2", "model_revision": "abc123"}
JUDGE_MODEL = "judge-lm@def456"
SOURCES = ["sources/customer_requests.jsonl", "https://example.org/docs/refunds.md"]
JUDGE_CHECKS = [
    {"name": "length", "field": "prompt", "min_chars": 10, "max_chars": 400},
    {"name": "llm_judge", "rubric": "rubrics/quality.yaml", "min_score": 3, "model": {"backend": "openai", "model": "judge-lm"}},
    {"name": "review", "ledger": "reviews/verdicts.jsonl"},
]
TEXT_PARAMS = {
    "judge": {"checks": JUDGE_CHECKS},
    "split": {"ratios": {"train": 0.75, "test": 0.25}},
    "publish": {"description": "Support questions with reference answers.", "license": "cc-by-4.0"},
}
CLASSES = ["circle", "square", "triangle"]

# Deprecations inside rdflib's JSON-LD parser and mlcroissant's Parquet reader, not in synthforge
pytestmark = [
    pytest.mark.filterwarnings("ignore:ConjunctiveGraph is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index is deprecated"),
]


def _verdict(name: str, ok: bool = True, judged_by: str | None = None, score: float | None = None) -> dict:
    return {
        "name": name,
        "verdict": "pass" if ok else "fail",
        "score": score,
        "reason": None if ok else "scored below the rubric's minimum",
        "raw_output": None,
        "parsed": True,
        "judged_by": judged_by,
        "difficulty": None,
    }


def text_rows(n: int = 22) -> list[dict]:
    """Templates from a bundled source and paraphrases of documentation by a model; every 4th in test."""
    rows = []
    for i in range(n):
        paraphrase = i % 3 == 0
        source = {"uri": SOURCES[paraphrase], "record_id": f"r{i}", "row": i}
        content = {
            "prompt": f"Question {i}: how do I get a refund for order {1000 + i}?",
            "reference": f"Answer {i}: open the order page and press refund.",
            "label": "refund" if i % 2 else "billing",
            "constraints": [f"Mention order {1000 + i}."] * (i % 3),
            "locale": "en-GB",
            "context": None,
        }
        sid = make_sample_id(source, content)
        prov = new_record(
            sample_id=sid,
            run_id="run-1",
            source=source,
            method="paraphrase" if paraphrase else "template",
            model=GENERATOR["model"] if paraphrase else "jinja2-template-engine",
            model_revision=GENERATOR["model_revision"] if paraphrase else "3.1.6",
            batch_id=f"b{i % 2}",
            prompt_version="2",
        )
        checks = [_verdict("length", score=float(len(content["prompt"]))), _verdict("llm_judge", i != 5, JUDGE_MODEL, 4.0)]
        if i in (2, 7):
            checks.append(_verdict("review", judged_by="alice"))
        prov["judge"] = {"verdict": "pass" if i != 5 else "fail", "checks": checks}
        prov["difficulty"] = ["easy", "medium", "hard"][i % 3]
        prov["split"] = "test" if i % 4 == 0 else "train"
        rows.append({"sample_id": sid, **content, "provenance": prov})
    return rows


def write_text_pipeline(data: Path, rows: list[dict]) -> Path:
    """generate -> judge (one sample dropped by the LLM judge) -> split, as stage directories."""
    generate = stage_fingerprint("generate", {"generate": {"sources": SOURCES[0]}}, {})
    judge = stage_fingerprint("judge", {"judge": {"checks": JUDGE_CHECKS}}, {"generate": generate["fingerprint"]})
    split = stage_fingerprint("split", {"split": TEXT_PARAMS["split"]}, {"judge": judge["fingerprint"]})
    with StageWriter(data / "generated", "generate", CONTENT_SCHEMA, generate) as writer:
        writer.write(rows)
    failed = [r for r in rows if r["provenance"]["judge"]["verdict"] == "fail"]
    kept = [r for r in rows if r not in failed]
    with StageWriter(data / "judged", "judge", CONTENT_SCHEMA, judge) as writer:
        writer.write(kept, [reject(r, "judge.llm_judge", "scored below the rubric's minimum") for r in failed])
        writer.metrics = {"failed_by_check": {"length": 0, "llm_judge": len(failed)}}
    with StageWriter(data / "split", "split", CONTENT_SCHEMA, split) as writer:
        writer.write(kept)
    return data / "split"


def image_rows(per_class: int = 8) -> list[dict]:
    """Tiny grey images, each unique; every 4th in test. VoG scored them with a reference classifier."""
    rows = []
    for label, name in enumerate(CLASSES):
        for k in range(per_class):
            pixels = np.full((4, 4), 40 * label, dtype=np.uint8)
            pixels[k // 4, k % 4] = 255
            source = {"uri": "generated://unet", "record_id": f"{name}-{k}", "row": None}
            sid = make_sample_id(source, {"label": label, "k": k})
            prov = new_record(
                sample_id=sid, run_id="run-1", source=source, method="class_conditional", model="unet", batch_id="b0"
            )
            prov["vog"] = {
                "score": 0.5,
                "normalized": 0.1,
                "direction": "drop_lowest",
                "target": "logit",
                "checkpoints": ["epoch-10", "epoch-20"],
                "normalization": "per_class_zscore",
                "drop_fraction": 0.25,
                "class_threshold": -0.5,
                "classifier": "sha256:feedbeef",
            }
            prov["judge"] = {"verdict": "pass", "checks": [_verdict("image_format"), _verdict("vog", score=0.1)]}
            prov["split"] = "test" if k % 4 == 0 else "train"
            content = {"image": encode_png(pixels), "label": label, "label_name": name, "caption": None}
            rows.append({"sample_id": sid, **content, "provenance": prov})
    return rows


def published_tree(registry: Registry, name: str, commit: str, target: Path) -> Path:
    """A version's files in a folder of our own (a checkout is a shared cache)."""
    shutil.copytree(registry.checkout(name, commit), target)
    return target


def records(tree: Path, record_set: str) -> list[dict]:
    return list(mlc.Dataset(jsonld=tree / "croissant.json").records(record_set=record_set))


def shard_rows(tree: Path, split: str) -> list[dict]:
    return [r for shard in sorted((tree / "data").glob(f"{split}-*.parquet")) for r in pq.read_table(shard).to_pylist()]


@dataclass
class TextVersion:
    registry: Registry
    result: PublishResult
    tree: Path  # a copy of the version's files
    rows: list[dict]  # what went into the pipeline, the dropped sample too
    root: Path


@pytest.fixture(scope="module")
def text_version(tmp_path_factory) -> TextVersion:
    root = tmp_path_factory.mktemp("text")
    rows = text_rows()
    split_dir = write_text_pipeline(root / "data", rows)
    registry = Registry(root / "registry")
    result = registry.publish(split_dir, "support", "1.0.0", TEXT_PARAMS, root)
    return TextVersion(registry, result, published_tree(registry, "support", result.info.commit, root / "v1"), rows, root)


@pytest.fixture(scope="module")
def image_version(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    fingerprint = stage_fingerprint("split", {}, {})
    with StageWriter(root / "data" / "split", "split", IMAGE_CONTENT_SCHEMA, fingerprint) as writer:
        writer.write(image_rows())
    registry = Registry(root / "registry")
    params = {
        "split": {"ratios": {"train": 0.75, "test": 0.25}},
        "judge": {"checks": [{"name": "image_format"}, {"name": "vog"}]},
    }
    result = registry.publish(root / "data" / "split", "shapes", "1.0.0", params, root)
    return published_tree(registry, "shapes", result.info.commit, root / "v1")


def test_mlcroissant_validates_the_version_and_reads_every_published_row(text_version):
    result, tree = text_version.result, text_version.tree
    dataset = mlc.Dataset(jsonld=tree / "croissant.json")  # raises ValidationError on any error
    metadata = dataset.metadata
    assert not metadata.ctx.issues.errors
    assert metadata.conforms_to == ["http://mlcommons.org/croissant/1.1"] and metadata.ctx.is_v1_1()
    assert (metadata.name, metadata.version, metadata.license) == ("support", "1.0.0", ["cc-by-4.0"])
    assert metadata.description == "Support questions with reference answers."
    assert [rs.id for rs in metadata.record_sets] == ["train", "test"]
    for split, count in result.info.counts.items():
        got = list(dataset.records(record_set=split))
        expected = shard_rows(tree, split)
        assert len(got) == count == len(expected)
        for record, row in zip(got, expected, strict=True):
            assert record[f"{split}/sample_id"].decode() == row["sample_id"]
            assert record[f"{split}/prompt"].decode() == row["prompt"]
            assert record[f"{split}/label"].decode() == row["label"]
            assert [c.decode() for c in record[f"{split}/constraints"]] == row["constraints"]
            provenance = record[f"{split}/provenance"]
            assert provenance[f"{split}/provenance/source_uri"].decode() == row["provenance"]["source"]["uri"]
            assert provenance[f"{split}/provenance/generation_model"].decode() == row["provenance"]["generation"]["model"]
            assert provenance[f"{split}/provenance/difficulty"].decode() == row["provenance"]["difficulty"]


def test_images_come_back_as_the_published_pixels_with_their_class_names(image_version):
    tree = image_version
    document = json.loads((tree / "croissant.json").read_text())
    fields = {f["name"]: f for f in next(rs for rs in document["recordSet"] if rs["@id"] == "train")["field"]}
    assert fields["image"]["dataType"] == "sc:ImageObject"
    assert fields["label"]["dataType"] == ["sc:Integer", "cr:Label"]
    tools = sorted(document["rai:machineAnnotationTools"])
    assert tools[0].startswith("judge check 'image_format': a rule, no model")
    assert tools[1].startswith("judge check 'vog': reference classifier sha256:feedbeef")
    names = {r["classes/id"]: r["classes/name"] for r in records(tree, "classes")}
    assert names == dict(enumerate(CLASSES))
    for split in ("train", "test"):
        got = records(tree, split)
        expected = shard_rows(tree, split)
        assert len(got) == len(expected) > 0
        for record, row in zip(got, expected, strict=True):
            assert np.array_equal(np.asarray(record[f"{split}/image"]), np.asarray(decode_image(row["image"]["bytes"])))
            assert record[f"{split}/label"] == row["label"] and names[row["label"]] == row["label_name"]


def test_every_shard_and_the_manifest_are_listed_with_their_sha256_and_size(text_version):
    tree = text_version.tree
    document = json.loads((tree / "croissant.json").read_text())
    files = {o["contentUrl"]: o for o in document["distribution"] if o["@type"] == "cr:FileObject"}
    on_disk = {p.relative_to(tree).as_posix() for p in (tree / "data").glob("*.parquet")} | {"provenance/manifest.parquet"}
    assert set(files) == on_disk
    for relative, file_object in files.items():
        content = (tree / relative).read_bytes()
        assert file_object["sha256"] == hashlib.sha256(content).hexdigest()
        assert file_object["contentSize"] == f"{len(content)} B"
        assert file_object["encodingFormat"] == "application/x-parquet"
    assert verify_checksums(tree) == []


def test_a_split_of_several_shards_is_read_through_a_file_set(tmp_path, monkeypatch):
    monkeypatch.setattr(release, "SHARD_ROWS", 4)
    split_dir = write_text_pipeline(tmp_path / "data", text_rows())
    result = Registry(tmp_path / "registry").publish(split_dir, "support", "1.0.0", TEXT_PARAMS, tmp_path)
    tree = published_tree(Registry(tmp_path / "registry"), "support", result.info.commit, tmp_path / "v1")
    document = json.loads((tree / "croissant.json").read_text())
    file_sets = {o["@id"]: o for o in document["distribution"] if o["@type"] == "cr:FileSet"}
    assert file_sets["train-shards"]["includes"] == "data/train-?????-of-?????.parquet"
    assert len(list((tree / "data").glob("train-*.parquet"))) == -(-result.info.counts["train"] // 4) > 1
    got = [r["train/sample_id"].decode() for r in records(tree, "train")]
    assert got == [r["sample_id"] for r in shard_rows(tree, "train")] and len(got) == result.info.counts["train"]


def test_a_shard_changed_after_publishing_is_caught_by_its_checksum(text_version, tmp_path):
    published = text_version.tree
    tree = shutil.copytree(published, tmp_path / "v1")
    shard = tree / "data" / "test-00000-of-00001.parquet"
    table = pq.read_table(shard)
    prompts = pa.array(table.column("prompt").to_pylist()[::-1])
    pq.write_table(table.set_column(table.schema.get_field_index("prompt"), "prompt", prompts), shard)  # valid Parquet
    assert verify_checksums(tree) == [
        f"{shard}: sha256 {hashlib.sha256(shard.read_bytes()).hexdigest()} differs from "
        f"{hashlib.sha256((published / shard.relative_to(tree)).read_bytes()).hexdigest()} in croissant.json "
        "(changed after publishing)"
    ]
    with pytest.raises(mlc.GenerationError) as caught:
        records(tree, "test")
    assert "Hash of downloaded file" in str(caught.value.__cause__)
    (tree / "provenance" / "manifest.parquet").unlink()
    shutil.copy(shard, tree / "data" / "test-00001-of-00002.parquet")
    problems = verify_checksums(tree)
    assert f"{tree / 'provenance' / 'manifest.parquet'}: listed in croissant.json but missing" in problems
    unlisted = f"{tree / 'data' / 'test-00001-of-00002.parquet'}: a data shard that croissant.json does not list"
    assert any(p.startswith(unlisted) for p in problems)


def _graph(tree: Path) -> tuple[rdflib.Graph, rdflib.term.Node]:
    """croissant.json as RDF, so the assertions hold for what its @context makes of the keys."""
    graph = rdflib.Graph().parse(tree / "croissant.json", format="json-ld")
    return graph, graph.value(predicate=rdflib.RDF.type, object=SDO.Dataset, any=False)


def _labels(graph: rdflib.Graph, nodes) -> set[str]:
    return {str(graph.value(node, PROV.label)) for node in nodes}


def _stages(graph: rdflib.Graph, dataset) -> dict[str, rdflib.term.Node]:
    pipeline = graph.value(dataset, PROV.wasGeneratedBy)
    return {str(graph.value(s, PROV.label)): s for s in graph.objects(pipeline, DCT.hasPart)}


def _properties(graph: rdflib.Graph, node, predicate) -> dict[str, object]:
    """schema.org PropertyValues as {name: value}."""
    return {str(graph.value(p, SDO.name)): graph.value(p, SDO.value).toPython() for p in graph.objects(node, predicate)}


def test_prov_names_the_sources_the_stages_and_the_generators(text_version):
    tree, rows = text_version.tree, text_version.rows
    meta = json.loads((tree / "synthforge.json").read_text())
    graph, dataset = _graph(tree)
    published = [r for r in rows if r["provenance"]["judge"]["verdict"] == "pass"]
    assert _labels(graph, graph.objects(dataset, PROV.wasDerivedFrom)) == {r["provenance"]["source"]["uri"] for r in published}
    assert (rdflib.URIRef(SOURCES[1]), PROV.label, None) in graph  # an absolute URI is the entity's IRI
    assert (dataset, PROV.wasRevisionOf, None) not in graph  # the first version

    stages = _stages(graph, dataset)
    assert set(stages) == {"generate", "judge", "split"}
    for info in meta["lineage"]:
        assert _properties(graph, stages[info["stage"]], SDO.identifier) == {
            "fingerprint": info["fingerprint"],
            "params_hash": info["params_hash"],
        }
    assert _properties(graph, stages["generate"], SDO.additionalProperty) == {"entered": 22, "kept": 22, "rejected": 0}
    judged = {"entered": 22, "kept": 21, "rejected": 1, "rejected by judge.llm_judge": 1}
    assert _properties(graph, stages["judge"], SDO.additionalProperty) == judged
    assert graph.value(stages["judge"], PROV.wasInformedBy) == stages["generate"]
    assert graph.value(stages["split"], PROV.wasInformedBy) == stages["judge"]

    agents = list(graph.objects(dataset, PROV.wasAttributedTo))
    assert _labels(graph, agents) == {"synthforge", "tiny-gpt2@abc123", "jinja2-template-engine@3.1.6"}
    assert all(graph.value(a, rdflib.RDF.type) == PROV.SoftwareAgent for a in agents)
    synthforge = next(a for a in agents if str(graph.value(a, PROV.label)) == "synthforge")
    assert str(graph.value(synthforge, SDO.version)) == meta["synthforge_version"]


def test_rai_names_the_judges_the_reviewer_and_what_each_stage_dropped(text_version):
    tree, rows = text_version.tree, text_version.rows
    graph, dataset = _graph(tree)
    tools = sorted(str(t) for t in graph.objects(dataset, RAI.machineAnnotationTools))
    assert tools == [
        "judge check 'length': a rule, no model; settings: field=prompt, max_chars=400, min_chars=10; "
        "failed 0 of 22 judged samples",
        f"judge check 'llm_judge': model {JUDGE_MODEL}; settings: min_score=3, model=judge-lm, rubric=rubrics/quality.yaml; "
        "failed 1 of 22 judged samples",
    ]
    annotation = str(graph.value(dataset, RAI.dataAnnotationProtocol))
    assert "2 of the 21 samples carry a reviewer's verdict" in annotation and "reviewers: alice" in annotation
    protocol = str(graph.value(dataset, RAI.dataManipulationProtocol)).splitlines()
    assert [line.split(":")[0] for line in protocol] == ["generate", "judge", "split"]
    assert "22 entered, 21 kept, 1 dropped by judge.llm_judge (1)" in protocol[1]
    collection = str(graph.value(dataset, RAI.dataCollection))
    paraphrased = sum(
        r["provenance"]["generation"]["model"] == "tiny-gpt2" and r["sample_id"] != rows[5]["sample_id"] for r in rows
    )
    assert "from 2 source(s): 21 samples generated." in collection and f"tiny-gpt2@abc123 ({paraphrased})" in collection
    limitations = sorted(str(t) for t in graph.objects(dataset, RAI.dataLimitations))
    assert limitations[0].startswith("21 of the 21 samples are synthetic")
    assert "also reviewed by people" in limitations[1]


def test_a_quarantine_release_is_derived_from_the_version_it_was_made_from(text_version):
    registry, v1, rows, root = text_version.registry, text_version.result, text_version.rows, text_version.root
    affected = {rows[1]["sample_id"]}
    result = quarantine(
        registry.dataset("support"), affected, reason="leaked into an eval", selector={"samples": "x"}, project=root
    )
    tree = published_tree(registry, "support", result.published.info.commit, root / "v2")
    graph, dataset = _graph(tree)
    previous = next(s for s in graph.objects(dataset, PROV.wasDerivedFrom) if str(graph.value(s, PROV.label)) == "support 1.0.0")
    assert _properties(graph, previous, SDO.identifier) == {"commit": v1.info.commit}
    assert _labels(graph, graph.objects(dataset, PROV.wasRevisionOf)) == {"support 1.0.0"}
    removed = _properties(graph, _stages(graph, dataset)["quarantine"], SDO.additionalProperty)
    assert removed["rejected"] == removed["rejected by quarantine"] == 1
    assert "reason: leaked into an eval" in str(graph.value(dataset, RAI.dataManipulationProtocol))
    for split, count in result.published.info.counts.items():
        assert len(records(tree, split)) == count
    assert affected.isdisjoint(r["sample_id"] for split in result.published.info.counts for r in shard_rows(tree, split))


def test_the_same_version_gives_the_same_bytes_whatever_the_order_of_its_rows(text_version, tmp_path):
    published = text_version.tree
    tree = shutil.copytree(published, tmp_path / "v1")
    meta = json.loads((tree / "synthforge.json").read_text())
    provenance = pq.read_table(tree / "provenance" / "manifest.parquet").column("provenance").to_pylist()
    random.Random(0).shuffle(provenance)
    again = write_croissant(tree, meta, provenance).read_bytes()
    assert again == (published / "croissant.json").read_bytes()


def test_a_version_on_the_hub_names_its_url(text_version, tmp_path):
    tree = shutil.copytree(text_version.tree, tmp_path / "v1")
    meta = json.loads((tree / "synthforge.json").read_text())
    provenance = pq.read_table(tree / "provenance" / "manifest.parquet").column("provenance").to_pylist()
    url = "https://huggingface.co/datasets/acme/support"
    assert mlc.Dataset(jsonld=write_croissant(tree, meta, provenance, url=url)).metadata.url == url
    assert "url" not in json.loads((text_version.tree / "croissant.json").read_text())  # a local registry has none
