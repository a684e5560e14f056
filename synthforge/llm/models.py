"""Where a model comes from: a local directory (pinned by a hash of its files) or a hub id (pinned to a commit).

Every model synthforge loads (LLMs, captioners, sentence encoders, diffusion pipelines) goes through here, so
provenance always records what exactly ran.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synthforge.errors import BadInput

if TYPE_CHECKING:
    import torch


def resolve_model(model: str, param: str) -> tuple[str, str | None]:
    """(what to load, its revision): a local directory with a content hash, or a hub id pinned to its commit."""
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise BadInput(f"{param}: {model}: not a transformers model directory (no config.json)")
        return str(local), local_revision(local)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise BadInput(f"{param}: {model}: no such directory (and not a hub id of the form owner/name)")
    from huggingface_hub import resolve_revision

    try:
        # One commit for the tokenizer and the weights, and the commit is what provenance records.
        return model, resolve_revision(model).resolved
    except Exception as exc:  # offline and not cached, unknown or gated repo: huggingface_hub raises many kinds
        raise BadInput(f"{param}: {model}: no such directory, and the hub model cannot be resolved: {exc}") from None


def hub_revision(source: str, revision: str | None) -> str | None:
    return None if Path(source).exists() else revision


def local_revision(path: Path) -> str:
    """First 16 hex digits of a sha256 over the files transformers reads from the directory (names and bytes).

    Weights are hashed in the format that loads: when safetensors are there, the .bin copies many hub repos also
    carry are skipped (they would double the time spent hashing a 7B model for nothing)."""
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    has_safetensors = any(p.suffix == ".safetensors" for p in files)
    digest = hashlib.sha256()
    for file in files:
        if has_safetensors and file.suffix in {".bin", ".pt", ".pth"}:
            continue
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def pick_device(device: str | None) -> torch.device:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def load_dtype(device: torch.device) -> Any:
    import torch

    # The checkpoint's own dtype on a GPU (half precision for most LLMs); float32 on CPU, where half is slow.
    return "auto" if device.type == "cuda" else torch.float32


def load_causal_lm(model: str, source: str, revision: str | None, device: torch.device, where: str) -> tuple[Any, Any]:
    """(tokenizer, model) of a causal LM ready for batched generation: a pad token (eos when it has none), left
    padding, on `device` in eval mode. `where` is the params key that named the model, for errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pinned = hub_revision(source, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=pinned)
        lm = AutoModelForCausalLM.from_pretrained(source, revision=pinned, dtype=load_dtype(device))
    except (OSError, ValueError, KeyError) as exc:  # missing files, not a causal LM, unknown architecture
        raise BadInput(f"{where}: {model}: cannot load a causal language model and its tokenizer: {exc}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BadInput(f"{where}: {model}: the tokenizer has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only: every prompt must end where generation starts
    return tokenizer, lm.to(device).eval()
