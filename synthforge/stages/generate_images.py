"""generate (images): each selected seed x its caption variants -> images from the adapted generator.

Every image records its real seed as parent (so a bad real image traces to all its synthetic children), the
seed's marginal score, the caption and perturbation model, the generator, its LoRA adapter hash, the per-image
seed and the sampling settings. Images are made and written a generation batch at a time.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from synthforge.errors import BadInput
from synthforge.provenance import canonical_json, make_sample_id, new_record, sha256_hex
from synthforge.stagedir import StageWriter, stage_fingerprint
from synthforge.vision.generator import ImageRequest
from synthforge.vision.images import IMAGE_CONTENT_SCHEMA

PROMPT_TEMPLATE_ID = "gendataagent-caption-prompt"


def image_seed(global_seed: int, real_id: str, variant: int) -> int:
    """A stable per-image seed: the same seed image and variant give the same image in any run or batch."""
    return int.from_bytes(hashlib.sha256(f"{global_seed}:{real_id}:{variant}".encode()).digest()[:4], "big")


def _dir_digest(path: Path) -> str:
    meta = path / "generator.json" if (path / "generator.json").exists() else None
    files = [meta] if meta else sorted(p for p in path.rglob("*") if p.is_file())
    return sha256_hex(b"".join(p.read_bytes() for p in files))


def run_generate_images(
    params: dict[str, Any], seeds: str | Path, real: str | Path, generator: str | Path, out: str | Path
) -> dict[str, Any]:
    from synthforge.progress import progress_bar
    from synthforge.stages.prepare import load_generator
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
        "generator": _dir_digest(generator),
    }
    family, gen = load_generator(params, generator)
    fingerprint = stage_fingerprint(
        "generate", {"generate": section, "generator": params.get("generator"), "seed": params["seed"]}, inputs
    )
    run_id = uuid.uuid4().hex[:12]
    gen_params = gen.params()
    template = getattr(getattr(gen, "options", None), "prompt_template", None)
    prompt_hash = sha256_hex(template) if template else None
    method = f"{family.name}-img2img" if gen_params.get("strength") is not None else family.name

    planned = []  # (seed row, its caption variant or None, variant index, request)
    for s in seed_rows:
        variants = s["variants"] or []
        for v in range(s["n_images"]):
            variant = variants[v] if v < len(variants) else None
            caption = variant["text"] if variant else s["caption"]
            request = ImageRequest(
                label=s["label"],
                class_name=s["label_name"],
                seed=image_seed(int(params["seed"]), s["real_id"], v),
                caption=caption,
                init_image=real_rows[s["real_id"]]["image"],
            )
            planned.append((s, variant, v, request))

    batch_size = int(section.get("batch_size", 256))
    with (
        StageWriter(out, "generate", IMAGE_CONTENT_SCHEMA, fingerprint) as writer,
        progress_bar("generate", len(planned)) as advance,
    ):
        for b, start in enumerate(range(0, len(planned), batch_size)):
            batch = planned[start : start + batch_size]
            images = gen.generate([req for *_, req in batch])
            batch_id = f"{fingerprint['fingerprint'][:8]}-{method}-{b:04d}"
            rows = []
            for (s, variant, v, req), png in zip(batch, images, strict=True):
                # The id comes from the request, not the PNG bytes: float rounding can differ by batch size.
                origin = {"method": method, "real_id": s["real_id"], "variant": v, "adapter": gen.adapter_hash}
                sid = make_sample_id(origin, {"image_seed": req.seed, "label": req.label, "caption": req.caption})
                real_row = real_rows[s["real_id"]]
                prov = new_record(
                    sample_id=sid,
                    run_id=run_id,
                    source={"uri": info["source_id"], "record_id": s["real_id"], "row": real_row["source_row"]},
                    method=method,
                    model=gen.model,
                    model_revision=gen.model_revision,
                    adapter_hash=gen.adapter_hash,
                    batch_id=batch_id,
                    seed=req.seed,
                    params={**gen_params, "variant": v},
                    prompt_template_id=PROMPT_TEMPLATE_ID if template else None,
                    prompt_version="1" if template else None,
                    prompt_hash=prompt_hash,
                    parent_ids=[s["real_id"]],
                    caption={
                        "raw": s["caption"],
                        "perturbed": variant["text"] if variant else None,
                        "model": s["variants_model"] if variant else s["caption_model"],
                        "parsed": variant["parsed"] if variant else None,
                    },
                    seed_marginal_score=s["marginal_score"],
                )
                prov["tags"] = [f"label:{req.class_name}"]
                rows.append(
                    {
                        "sample_id": sid,
                        "image": png,
                        "label": req.label,
                        "label_name": req.class_name,
                        "caption": req.caption,
                        "provenance": prov,
                    }
                )
            writer.write(rows)
            advance(len(batch))
        writer.metrics = {
            "seeds": len(seed_rows),
            "images": len(planned),
            "family": family.name,
            "method": method,
            "model": gen.model,
            "adapter_hash": gen.adapter_hash,
            "sampling": canonical_json(gen_params),
        }
    return writer.stats
