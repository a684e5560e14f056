"""generate (images): each selected seed x its caption variants -> images from the adapted generator.

Every image records its real seed as parent (so a bad real image traces to all its synthetic children), the
seed's marginal score, the caption and perturbation model, the generator, its LoRA adapter hash, the per-image
seed and the sampling settings. Images are made a generation batch at a time, and each finished batch goes to a
journal beside the output (synthforge.resume.Journal): a run killed midway and run again makes only the batches
the journal lacks.

`plan_images` and `ImageMaker` are shared with the on-the-fly loop (synthforge.onthefly), which makes one batch
per iteration from the marginal examples of that iteration.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from synthforge.engine import get_engine
from synthforge.errors import BadInput
from synthforge.provenance import canonical_json, make_sample_id, new_record, sha256_hex
from synthforge.resume import Journal
from synthforge.stagedir import Row, StageWriter, stage_fingerprint, with_provenance
from synthforge.vision.generator import ImageRequest
from synthforge.vision.images import IMAGE_CONTENT_SCHEMA

PROMPT_TEMPLATE_ID = "gendataagent-caption-prompt"


def image_seed(global_seed: int, real_id: str, variant: int, iteration: int | None = None) -> int:
    """A stable per-image seed: the same seed image and variant give the same image in any run or batch.

    The on-the-fly loop passes its iteration, so a real image that is marginal again gets new images.
    """
    key = f"{global_seed}:{real_id}:{variant}" + (f":{iteration}" if iteration is not None else "")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")


def generator_digest(path: str | Path) -> str:
    """What identifies an adapted generator for stage fingerprints: its generator.json (which holds the adapter
    and base hashes), or every file when there is none."""
    path = Path(path)
    meta = path / "generator.json" if (path / "generator.json").exists() else None
    files = [meta] if meta else sorted(p for p in path.rglob("*") if p.is_file())
    return sha256_hex(b"".join(p.read_bytes() for p in files))


@dataclass(frozen=True)
class ImageJob:
    """One image to make: its seed (a seeds.parquet row), the real image row, which caption variant, the request."""

    seed: dict[str, Any]
    real: dict[str, Any]
    variant_index: int
    variant: dict[str, Any] | None
    request: ImageRequest


def plan_images(seed: dict[str, Any], real: dict[str, Any], global_seed: int, iteration: int | None = None) -> list[ImageJob]:
    """The seed's n_images jobs: variant v uses the seed's v-th perturbed caption when it has one, else its caption."""
    variants = seed["variants"] or []
    jobs = []
    for v in range(seed["n_images"]):
        variant = variants[v] if v < len(variants) else None
        request = ImageRequest(
            label=seed["label"],
            class_name=seed["label_name"],
            seed=image_seed(global_seed, seed["real_id"], v, iteration),
            caption=variant["text"] if variant else seed["caption"],
            init_image=real["image"],
        )
        jobs.append(ImageJob(seed, real, v, variant, request))
    return jobs


def image_method(family, options) -> str:
    """The generation method samples record: the family, and whether it starts from the real image (img2img)."""
    return f"{family.name}-img2img" if options.strength is not None else family.name


class ImageMaker:
    """The adapted generator plus what every image it makes records: run, method, sampling settings, prompt."""

    def __init__(self, family, generator, source_uri: str, run_id: str | None = None):
        self.generator = generator
        self.source_uri = source_uri
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.params = generator.params()
        template = getattr(getattr(generator, "options", None), "prompt_template", None)
        self.prompt_hash = sha256_hex(template) if template else None
        self.method = image_method(family, generator.options)

    def make(self, jobs: list[ImageJob], batch_id: str, extra_params: dict[str, Any] | None = None) -> list[Row]:
        """Generate the jobs' images as sample rows with provenance; extra_params join the generation params."""
        images = self.generator.generate([job.request for job in jobs])
        return [self._row(job, png, batch_id, extra_params or {}) for job, png in zip(jobs, images, strict=True)]

    def _row(self, job: ImageJob, png: bytes, batch_id: str, extra_params: dict[str, Any]) -> Row:
        s, req, gen = job.seed, job.request, self.generator
        # The id comes from the request, not the PNG bytes: float rounding can differ by batch size.
        origin = {"method": self.method, "real_id": s["real_id"], "variant": job.variant_index, "adapter": gen.adapter_hash}
        sid = make_sample_id(origin, {"image_seed": req.seed, "label": req.label, "caption": req.caption})
        prov = new_record(
            sample_id=sid,
            run_id=self.run_id,
            source={"uri": self.source_uri, "record_id": s["real_id"], "row": job.real["source_row"]},
            method=self.method,
            model=gen.model,
            model_revision=gen.model_revision,
            adapter_hash=gen.adapter_hash,
            batch_id=batch_id,
            seed=req.seed,
            params={**self.params, "variant": job.variant_index, **extra_params},
            prompt_template_id=PROMPT_TEMPLATE_ID if self.prompt_hash else None,
            prompt_version="1" if self.prompt_hash else None,
            prompt_hash=self.prompt_hash,
            parent_ids=[s["real_id"]],
            caption={
                "raw": s["caption"],
                "perturbed": job.variant["text"] if job.variant else None,
                "model": s["variants_model"] if job.variant else s["caption_model"],
                "parsed": job.variant["parsed"] if job.variant else None,
            },
            seed_marginal_score=s["marginal_score"],
        )
        prov["tags"] = [f"label:{req.class_name}"]
        return {
            "sample_id": sid,
            "image": png,
            "label": req.label,
            "label_name": req.class_name,
            "caption": req.caption,
            "provenance": prov,
        }


@dataclass
class ImageWorker:
    """Makes generation batches, (jobs, batch_id), as an engine task. The generator loads on the first batch,
    where the batch runs (this process, or each Ray actor), and never travels: what pickles is how to load it."""

    project: str  # the folder params' paths are relative to
    params: dict[str, Any]
    generator: Path
    source_uri: str
    run_id: str
    maker: ImageMaker | None = None

    def __call__(self, task: tuple[list[ImageJob], str]) -> list[Row]:
        if self.maker is None:
            from synthforge.stages.prepare import load_generator

            os.chdir(self.project)
            self.maker = ImageMaker(*load_generator(self.params, self.generator), self.source_uri, self.run_id)
        return self.maker.make(*task)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "maker": None}


def run_generate_images(
    params: dict[str, Any], seeds: str | Path, real: str | Path, generator: str | Path, out: str | Path
) -> dict[str, Any]:
    from synthforge.progress import progress_bar
    from synthforge.stages.prepare import family_options
    from synthforge.vision.real import read_real, real_info

    section = params["generate"]
    seeds, real, generator = Path(seeds), Path(real), Path(generator)
    if not (seeds / "seeds.parquet").exists():
        raise BadInput(f"{seeds}: no seeds.parquet (run `synthforge seeds` first)")
    seed_rows = [r for r in pq.read_table(seeds / "seeds.parquet").to_pylist() if r["selected"]]
    real_rows = {r["real_id"]: r for r in read_real(real, "train").to_pylist()}
    stale = [s["real_id"] for s in seed_rows if s["real_id"] not in real_rows]
    if stale:
        raise BadInput(
            f"{seeds / 'seeds.parquet'}: {len(stale)} seeds (e.g. {stale[0]}) are not in {real}; rerun `synthforge seeds`"
        )
    info = real_info(real)
    inputs = {
        "seeds": sha256_hex((seeds / "seeds.parquet").read_bytes()),
        "real": info["digest"],
        "generator": generator_digest(generator),
    }
    engine, _ = get_engine(params)  # first: a missing Ray fails before any work
    family, options = family_options(params, "generate")
    fingerprint = stage_fingerprint(
        "generate", {"generate": section, "generator": params.get("generator"), "seed": params["seed"]}, inputs
    )
    method = image_method(family, options)
    planned = [job for s in seed_rows for job in plan_images(s, real_rows[s["real_id"]], int(params["seed"]))]
    batch_size = int(section.get("batch_size", 256))
    batches = [planned[start : start + batch_size] for start in range(0, len(planned), batch_size)]
    # Batch ids number the batches of the whole stage, so they are the same in every run of the same work.
    batch_ids = [f"{fingerprint['fingerprint'][:8]}-{method}-{b:04d}" for b in range(len(batches))]
    # Every worker (this process, or each Ray actor) records this run's id.
    worker = ImageWorker(os.getcwd(), params, generator, info["source_id"], uuid.uuid4().hex[:12])
    with Journal.open(out, fingerprint["fingerprint"], with_provenance(IMAGE_CONTENT_SCHEMA)) as journal:
        todo = [(jobs, batch_id) for jobs, batch_id in zip(batches, batch_ids, strict=True) if batch_id not in journal]
        with progress_bar("generate", len(planned)) as advance:
            advance(len(planned) - sum(len(jobs) for jobs, _ in todo))
            for (jobs, batch_id), rows in zip(todo, engine.run_tasks(worker, todo), strict=True):
                journal.write(batch_id, rows)
                advance(len(jobs))
        with StageWriter(out, "generate", IMAGE_CONTENT_SCHEMA, fingerprint) as writer:
            made_by = None  # the generator and sampling settings, as the samples record them
            for batch_id in batch_ids:
                rows = journal.read(batch_id)
                made_by = made_by or (rows[0]["provenance"]["generation"] if rows else None)
                writer.write(rows)
            sampling = {k: v for k, v in json.loads(made_by["params"]).items() if k != "variant"} if made_by else None
            writer.metrics = {
                "seeds": len(seed_rows),
                "images": len(planned),
                "family": family.name,
                "method": method,
                "model": made_by and made_by["model"],
                "adapter_hash": made_by and made_by["adapter_hash"],
                "sampling": canonical_json(sampling) if made_by else None,
                "resumed_batches": len(batch_ids) - len(todo),
                "made_batches": len(todo),
            }
    return writer.stats
