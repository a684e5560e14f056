"""croissant.json: a version's Croissant 1.1 metadata (http://mlcommons.org/croissant/1.1).

    distribution      a FileObject per data shard and for provenance/manifest.parquet, with sha256 and size
    recordSet         one per split: sample_id, the content columns (image: sc:ImageObject, label: cr:Label with
                      its class names) and a summary of each sample's provenance; plus the class names
    prov:             wasDerivedFrom the sources (and the version a quarantine release was made from),
                      wasGeneratedBy the pipeline and its stages, wasAttributedTo synthforge and the generators,
                      wasRevisionOf the previous version
    rai:              dataCollection, machineAnnotationTools (the judge's checks), dataManipulationProtocol (the
                      stages and what each dropped), dataAnnotationProtocol (manual review) where it applies

It is written last into a version's folder, since it holds the checksums of the other files; `verify_checksums`
checks a folder against it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from synthforge.errors import BadInput

CROISSANT_1_1 = "http://mlcommons.org/croissant/1.1"
PARQUET = "application/x-parquet"
MANIFEST = "provenance/manifest.parquet"
CLASSES = "classes"  # the record set of class names (a split of that name would clash)

# The @context mlcroissant 1.1 writes (it warns about any key left out), plus PROV-O.
CONTEXT = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "arrayShape": "cr:arrayShape",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "containedIn": "cr:containedIn",
    "cr": "http://mlcommons.org/croissant/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "description": {"@container": "@language"},
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileObject": "cr:fileObject",
    "fileProperty": "cr:fileProperty",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isArray": "cr:isArray",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "name": {"@container": "@language"},
    "parentField": "cr:parentField",
    "path": "cr:path",
    "prov": "http://www.w3.org/ns/prov#",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}

# Per-sample provenance as sub-fields read from the `provenance` struct column: (name, path in the struct, the
# PROV-O relation the value stands for). The full record stays in that column and in the manifest.
PROVENANCE_FIELDS = [
    ("source_uri", "source.uri", "prov:wasDerivedFrom"),
    ("source_record_id", "source.record_id", None),
    ("generation_method", "generation.method", None),
    ("generation_model", "generation.model", "prov:wasAttributedTo"),
    ("generation_model_revision", "generation.model_revision", None),
    ("prompt_version", "generation.prompt_version", None),
    ("batch_id", "generation.batch_id", None),
    ("judge_verdict", "judge.verdict", None),
    ("difficulty", "difficulty", None),
    ("dedup_cluster_id", "dedup.cluster_id", None),
]

STAGE_PURPOSE = {
    "generate": "generates the samples",
    "judge": "runs every check on every sample and drops a sample that fails one",
    "dedup": "drops duplicates and near-duplicates (one representative per cluster is kept) and overlaps with protected sets",
    "tag": "assigns each sample a difficulty and tags",
    "split": "assigns each sample to one split",
    "quarantine": "removes the quarantined samples of the version this one was made from",
    "agent": "runs GenDataAgent's on-the-fly loop: per iteration the marginal real images, their images generated (or taken "
    "from a pool), VoG-filtered, and the classifier fine-tuned",
}

IMPORTED = "imported"  # the generation method of samples the ingest stage took from files made elsewhere
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def write_croissant(tree: Path, meta: dict, provenance_rows: list[dict], url: str | None = None) -> Path:
    """Write `tree`/croissant.json for the version in `tree` (data/ and provenance/manifest.parquet written);
    `meta` is its synthforge.json, `provenance_rows` the provenance of every published sample, `url` where the
    version lives (None for a local registry). Returns the path written."""
    document = croissant_metadata(tree, meta, provenance_rows, url)
    path = tree / "croissant.json"
    path.write_text(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def verify_checksums(tree: Path) -> list[str]:
    """What differs between the files in `tree` and its croissant.json: a listed file missing or changed, a data
    shard that is not listed. An empty list when everything matches."""
    path = tree / "croissant.json"
    if not path.is_file():
        return [f"{path}: missing, so the files of {tree} cannot be checked"]
    listed = {o["contentUrl"]: o for o in json.loads(path.read_text())["distribution"] if o["@type"] == "cr:FileObject"}
    problems = []
    for relative, file_object in listed.items():
        file = tree / relative
        if not file.is_file():
            problems.append(f"{file}: listed in croissant.json but missing")
        elif (digest := _sha256(file)) != file_object["sha256"]:
            problems.append(
                f"{file}: sha256 {digest} differs from {file_object['sha256']} in croissant.json (changed after publishing)"
            )
    for shard in sorted((tree / "data").glob("*.parquet")):
        if shard.relative_to(tree).as_posix() not in listed:
            problems.append(f"{shard}: a data shard that croissant.json does not list (added after publishing)")
    return problems


def croissant_metadata(tree: Path, meta: dict, provenance_rows: list[dict], url: str | None = None) -> dict:
    """The croissant.json document (see `write_croissant`)."""
    params = (meta.get("pipeline") or {}).get("params") or {}
    publish = params.get("publish") or {}
    shards = _split_shards(tree, meta)
    classes = _class_label_names(pq.read_schema(next(iter(shards.values()))[0]))
    document: dict[str, Any] = {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CROISSANT_1_1,
        "name": meta["name"],
        "description": publish.get("description", f"Synthetic dataset {meta['name']}."),
        "version": meta["version"],
        "datePublished": meta["published_at"],
        "keywords": ["synthetic"],
        "distribution": _distribution(tree, shards),
        "recordSet": [_record_set(tree, split, files, classes) for split, files in shards.items()],
        "prov:wasDerivedFrom": _derived_from(meta, provenance_rows),
        "prov:wasGeneratedBy": _generated_by(meta),
        "prov:wasAttributedTo": _attributed_to(meta, provenance_rows),
        **_rai(meta, params, provenance_rows),
    }
    if revised := _revision_of(meta):
        document["prov:wasRevisionOf"] = revised
    if classes:
        document["recordSet"].append(_class_names(classes))
    if publish.get("license"):
        document["license"] = publish["license"]
    if url:
        document["url"] = url
    return document


# -- files -------------------------------------------------------------------------------------------------


def _split_shards(tree: Path, meta: dict) -> dict[str, list[Path]]:
    """The data shards of every split in meta's counts, in that order."""
    shards = {}
    for split in meta["counts"]:
        files = sorted(tree.glob(_shard_glob(split)))
        if not files:
            version = f"{meta['name']} {meta['version']}"
            raise BadInput(f"{tree}: {version} has no data shard for split {split!r} (data/{split}-NNNNN-of-NNNNN.parquet)")
        shards[split] = files
    return shards


def _shard_glob(split: str) -> str:
    # `?` per digit: `train-*` would also take the shards of a split named `train-extra`
    return f"data/{glob.escape(split)}-?????-of-?????.parquet"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_object(tree: Path, path: Path, description: str) -> dict:
    relative = path.relative_to(tree).as_posix()
    return {
        "@type": "cr:FileObject",
        "@id": relative,
        "name": relative,
        "description": description,
        "contentUrl": relative,
        "encodingFormat": PARQUET,
        "contentSize": f"{path.stat().st_size} B",
        "sha256": _sha256(path),
    }


def _distribution(tree: Path, shards: dict[str, list[Path]]) -> list[dict]:
    from synthforge.progress import progress_bar

    distribution = []
    with progress_bar("croissant checksums", total=sum(map(len, shards.values())) + 1) as advance:
        for split, files in shards.items():
            for k, file in enumerate(files):
                distribution.append(_file_object(tree, file, f"Split {split}, shard {k + 1} of {len(files)}."))
                advance(1)
            if len(files) > 1:
                distribution.append(
                    {
                        "@type": "cr:FileSet",
                        "@id": f"{split}-shards",
                        "name": f"{split}-shards",
                        "description": f"The {len(files)} shards of split {split}.",
                        "encodingFormat": PARQUET,
                        "includes": _shard_glob(split),
                    }
                )
        manifest = _file_object(
            tree,
            tree / MANIFEST,
            "One row per published sample: sample_id, split, content_hash and the full provenance record.",
        )
        distribution.append(manifest)
        advance(1)
    return distribution


# -- record sets -------------------------------------------------------------------------------------------


def _features(schema: pa.Schema) -> dict[str, dict]:
    """The `datasets` features the shards carry in their schema metadata (image and class label columns)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    return json.loads(raw)["info"]["features"] if raw else {}


def _class_label_names(schema: pa.Schema) -> list[str] | None:
    """The class names of a `label` ClassLabel column (the same in every shard of a version)."""
    label = _features(schema).get("label") or {}
    return label["names"] if label.get("_type") == "ClassLabel" else None


def _data_type(arrow_type: pa.DataType, where: str) -> str:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "sc:Text"
    if pa.types.is_boolean(arrow_type):
        return "sc:Boolean"
    if pa.types.is_integer(arrow_type):
        return "sc:Integer"
    if pa.types.is_floating(arrow_type):
        return "sc:Float"
    raise BadInput(
        f"{where}: type {arrow_type} has no Croissant data type here (text, numbers, booleans, lists of those, images)"
    )


def _record_set(tree: Path, split: str, files: list[Path], classes: list[str] | None) -> dict:
    """The split's records: a field per column of its shards, read from its one shard or its file set."""
    first = files[0].relative_to(tree).as_posix()
    source = {"fileObject": {"@id": first}} if len(files) == 1 else {"fileSet": {"@id": f"{split}-shards"}}
    schema = pq.read_schema(files[0])
    features = _features(schema)
    fields = []
    for column in schema:
        field: dict[str, Any] = {
            "@type": "cr:Field",
            "@id": f"{split}/{column.name}",
            "name": column.name,
            "source": {**source, "extract": {"column": column.name}},
        }
        where = f"{first}: column {column.name!r}"
        if column.name == "provenance":
            field["description"] = f"A summary of the sample's provenance; the full record is in this column and in {MANIFEST}."
            field["subField"] = [_provenance_field(split, source, *spec) for spec in PROVENANCE_FIELDS]
        elif (features.get(column.name) or {}).get("_type") == "Image":
            field["dataType"] = "sc:ImageObject"
            field["source"]["transform"] = {"jsonPath": "bytes"}  # datasets.Image stores {bytes, path}
        elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            field["dataType"] = _data_type(column.type.value_type, where)
            field["isArray"] = True
            field["arrayShape"] = "-1"
        else:
            field["dataType"] = _data_type(column.type, where)
        if column.name == "sample_id":
            field["description"] = "The sample's id: stable from generation on, derived from its content and origin."
        if column.name == "label":
            field["dataType"] = [field["dataType"], "cr:Label"]
            if classes:
                field["description"] = f"The class id; record set {CLASSES!r} names the classes."
                field["references"] = {"field": {"@id": f"{CLASSES}/id"}}
        fields.append(field)
    return {
        "@type": "cr:RecordSet",
        "@id": split,
        "name": split,
        "description": f"The samples of split {split}.",
        "key": {"@id": f"{split}/sample_id"},
        "field": fields,
    }


def _provenance_field(split: str, source: dict, name: str, path: str, relation: str | None) -> dict:
    field = {
        "@type": "cr:Field",
        "@id": f"{split}/provenance/{name}",
        "name": name,
        "dataType": "sc:Text",
        "source": {**source, "extract": {"column": "provenance"}, "transform": {"jsonPath": path}},
    }
    if relation:
        field["equivalentProperty"] = relation
    return field


def _class_names(classes: list[str]) -> dict:
    return {
        "@type": "cr:RecordSet",
        "@id": CLASSES,
        "name": CLASSES,
        "description": "The class names of the label column, by class id.",
        "dataType": "sc:Enumeration",
        "key": {"@id": f"{CLASSES}/id"},
        "field": [
            {"@type": "cr:Field", "@id": f"{CLASSES}/id", "name": "id", "dataType": "sc:Integer"},
            {"@type": "cr:Field", "@id": f"{CLASSES}/name", "name": "name", "dataType": "sc:Text"},
        ],
        "data": [{f"{CLASSES}/id": i, f"{CLASSES}/name": name} for i, name in enumerate(classes)],
    }


# -- provenance (PROV-O) -----------------------------------------------------------------------------------


def _property(name: str, value: Any) -> dict:
    return {"@type": "PropertyValue", "name": name, "value": value}


def _derived_from(meta: dict, provenance_rows: list[dict]) -> list[dict]:
    """The sources the samples came from and, for a quarantine release, the version it was made from."""
    counts = Counter(p["source"]["uri"] for p in provenance_rows)
    entities = []
    for uri in sorted(counts):
        entity = {"@type": "prov:Entity", "prov:label": uri, "description": f"Source of {counts[uri]} samples."}
        if _URI_SCHEME.match(uri):  # a relative path is no IRI: it would resolve against croissant.json's address
            entity["@id"] = uri
        entities.append(entity)
    if previous := meta.get("derived_from"):
        entities.append(
            {
                "@type": "prov:Entity",
                "prov:label": f"{meta['name']} {previous['version']}",
                "description": "The version this one was made from.",
                "version": previous["version"],
                "identifier": _property("commit", previous["commit"]),
            }
        )
    return entities


def _revision_of(meta: dict) -> dict | None:
    """The version this one follows in the changelog, and what changed since."""
    entry = (meta.get("changelog") or [{}])[-1]
    if not entry.get("previous"):
        return None
    return {
        "@type": "prov:Entity",
        "prov:label": f"{meta['name']} {entry['previous']}",
        "version": entry["previous"],
        "description": f"{entry['bump']} change: {entry['summary']}.",
    }


def _stage_stats(meta: dict) -> dict[str, dict]:
    return {s["stage"]: s for s in meta.get("stats") or []}


def _generated_by(meta: dict) -> dict:
    """The pipeline as one activity whose parts are its stages, each informed by the one before it."""
    stats = _stage_stats(meta)
    stages = [(info["stage"], info) for info in meta.get("lineage") or []]
    stages += [(name, {}) for name in stats if name not in {s for s, _ in stages}]  # e.g. a quarantine
    parts, previous = [], None
    for stage, info in stages:
        activity: dict[str, Any] = {"@type": "prov:Activity", "@id": f"pipeline/{stage}", "prov:label": stage}
        if stage in STAGE_PURPOSE:
            activity["description"] = f"{stage} {STAGE_PURPOSE[stage]}."
        identifiers = [_property(key, info[key]) for key in ("fingerprint", "params_hash") if info.get(key)]
        if identifiers:
            activity["identifier"] = identifiers
        if info.get("finished_at"):
            activity["prov:endedAtTime"] = info["finished_at"]
        if stage in stats:
            activity["additionalProperty"] = _count_properties(stats[stage])
        if previous:
            activity["prov:wasInformedBy"] = {"@id": previous}
        parts.append(activity)
        previous = activity["@id"]
    return {
        "@type": "prov:Activity",
        "@id": "pipeline",
        "prov:label": "synthforge pipeline: " + " -> ".join(stage for stage, _ in stages),
        "dct:hasPart": parts,
    }


def _count_properties(stats: dict) -> list[dict]:
    counts = [_property(key, stats[key]) for key in ("entered", "kept", "rejected") if key in stats]
    return counts + [_property(f"rejected by {reason}", n) for reason, n in sorted((stats.get("rejected_by") or {}).items())]


def _attributed_to(meta: dict, provenance_rows: list[dict]) -> list[dict]:
    """synthforge, and every model that generated samples (with how many, by method)."""
    synthforge = {
        "@type": "prov:SoftwareAgent",
        "prov:label": "synthforge",
        "version": meta["synthforge_version"],
        "description": "The tool whose pipeline made the samples and published this version.",
    }
    if meta.get("code_revision"):
        synthforge["identifier"] = _property("code_revision", meta["code_revision"])
    generators: dict[str, tuple[dict, Counter]] = {}
    for p in provenance_rows:
        generation = p["generation"]
        generators.setdefault(_identity(generation), (generation, Counter()))[1][generation["method"]] += 1
    agents = [synthforge]
    for identity, (generation, methods) in sorted(generators.items()):
        agent = {
            "@type": "prov:SoftwareAgent",
            "prov:label": identity,
            "name": generation["model"],
            "description": f"Generated {sum(methods.values())} samples; methods (samples): {_counts(methods)}.",
        }
        if generation.get("model_revision"):
            agent["version"] = generation["model_revision"]
        agents.append(agent)
    return agents


def _counts(counter: Counter | dict) -> str:
    """ "a (3), b (1)": most first."""
    return ", ".join(f"{key} ({n})" for key, n in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))


# -- responsible AI ----------------------------------------------------------------------------------------


def _rai(meta: dict, params: dict, provenance_rows: list[dict]) -> dict:
    from synthforge.text.review import ReviewCheck

    total = len(provenance_rows)
    stats = _stage_stats(meta)
    stages = [info["stage"] for info in meta.get("lineage") or []]
    sources = Counter(p["source"]["uri"] for p in provenance_rows)
    models = Counter(_identity(p["generation"]) for p in provenance_rows)
    methods = Counter(p["generation"]["method"] for p in provenance_rows)
    created = sorted(p["generation"]["created_at"] for p in provenance_rows if p["generation"].get("created_at"))
    checks = _judge_checks(meta, params, provenance_rows)
    reviewed = checks.pop(ReviewCheck.name, None)
    reviewed = reviewed if reviewed and reviewed["samples"] else None
    judge_stats = stats.get("judge") or {}

    generated = total - methods[IMPORTED]
    collection = (
        f"Made by the synthforge pipeline ({' -> '.join(stages)}) from {len(sources)} source(s): {generated} samples generated"
    )
    if methods[IMPORTED]:
        collection += f", {methods[IMPORTED]} imported (made elsewhere, then judged and filtered here)"
    limitations = []
    if generated:
        limitations.append(
            f"{generated} of the {total} samples are synthetic: they reflect their sources and the generators in "
            "prov:wasAttributedTo, not real user data."
        )
    if checks:
        people = (
            "; a sample of them was also reviewed by people (rai:dataAnnotationProtocol)"
            if reviewed
            else "; no person reviewed them"
        )
        limitations.append(f"Their quality was judged by the automated checks in rai:machineAnnotationTools{people}.")
    rai: dict[str, Any] = {
        "rai:dataCollection": f"{collection}. Generators (samples): {_counts(models)}. Methods (samples): {_counts(methods)}.",
        "rai:dataCollectionRawData": f"The sources the samples were made from (samples): {_counts(sources)}.",
        "rai:dataManipulationProtocol": "\n".join(
            _stage_line(stage, stats.get(stage) or {}) for stage in [*stages, *(s for s in stats if s not in stages)]
        ),
    }
    if limitations:
        rai["rai:dataLimitations"] = limitations
    if created:
        rai["rai:dataCollectionTimeframe"] = [created[0], created[-1]]
    if checks:
        failed = judge_stats.get("failed_by_check") or {}
        rai["rai:machineAnnotationTools"] = [
            _tool_line(name, check, failed.get(name), judge_stats.get("entered")) for name, check in checks.items()
        ]
    if reviewed:
        rai["rai:dataAnnotationProtocol"] = (
            f"Manual review (judge check {ReviewCheck.name!r}): {reviewed['samples']} of the {total} samples carry a "
            f"reviewer's verdict; reviewers: {', '.join(sorted(reviewed['judged_by']))}."
        )
    return rai


def _identity(generation: dict) -> str:
    """model@revision, as provenance records a judge's identity."""
    return f"{generation['model']}@{generation.get('model_revision') or 'unknown'}"


def _judge_checks(meta: dict, params: dict, provenance_rows: list[dict]) -> dict[str, dict]:
    """Every judge check, with the options it ran with (the judge stage's params, in their order), who judged
    (model@revision or reviewer), the VoG reference classifier, and how many samples it has a verdict on."""
    ran = next((info.get("params") or {} for info in meta.get("lineage") or [] if info["stage"] == "judge"), params)
    checks: dict[str, dict] = {}

    def check(name: str, options: dict) -> dict:
        return checks.setdefault(name, {"options": options, "judged_by": set(), "classifiers": set(), "samples": 0})

    for options in (ran.get("judge") or {}).get("checks") or []:
        check(options["name"], options)
    for p in provenance_rows:
        for verdict in (p.get("judge") or {}).get("checks") or []:
            entry = check(verdict["name"], {})
            entry["samples"] += 1
            if verdict.get("judged_by"):
                entry["judged_by"].add(verdict["judged_by"])
            if verdict["name"] == "vog" and (p.get("vog") or {}).get("classifier"):
                entry["classifiers"].add(p["vog"]["classifier"])
    return checks


def _tool_line(name: str, check: dict, failed: int | None, judged: int | None) -> str:
    settings = ", ".join(
        f"{key}={_setting(value)}" for key, value in check["options"].items() if key != "name" and _setting(value) is not None
    )
    if check["judged_by"]:
        by = "model " + ", ".join(sorted(check["judged_by"]))
    elif check["classifiers"]:
        by = "reference classifier " + ", ".join(sorted(check["classifiers"]))
    elif check["samples"]:
        by = "a rule, no model"
    else:
        by = "no verdict recorded on the published samples"
    line = f"judge check {name!r}: {by}" + (f"; settings: {settings}" if settings else "")
    if failed is not None and judged:
        line += f"; failed {failed} of {judged} judged samples"
    return line


def _setting(value: Any) -> str | None:
    """An option as text: scalars and lists of scalars, a model by its id; None for anything else."""
    if isinstance(value, str | int | float | bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str | int | float | bool) for v in value):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, dict) and isinstance(value.get("model"), str):
        return value["model"]  # a model spec: only its id (no server address or key variable)
    return None


def _stage_line(stage: str, stats: dict) -> str:
    line = f"{stage}: {STAGE_PURPOSE.get(stage, 'a pipeline stage')}"
    if "entered" in stats:
        line += f"; {stats['entered']} entered, {stats.get('kept', 0)} kept, {stats.get('rejected', 0)} dropped"
    if stats.get("rejected_by"):
        line += f" by {_counts(stats['rejected_by'])}"
    if stats.get("reason"):
        line += f"; reason: {stats['reason']}"
    return line + "."
