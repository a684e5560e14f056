"""Thin wrapper over the git command line, used by the registry and `init`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from synthforge.errors import SynthforgeError

IDENTITY = {"GIT_AUTHOR_NAME": "synthforge", "GIT_AUTHOR_EMAIL": "synthforge@localhost"}


class GitError(SynthforgeError):
    pass


def git(
    *args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None, check: bool = True, input: bytes | None = None
) -> str:
    full_env = {**os.environ, **(env or {})}
    for key, value in IDENTITY.items():  # a registry commit needs an identity even on a bare CI machine
        full_env.setdefault(key, value)
        full_env.setdefault(key.replace("AUTHOR", "COMMITTER"), value)
    proc = subprocess.run(["git", *args], cwd=cwd, env=full_env, capture_output=True, input=input)
    if check and proc.returncode != 0:
        raise GitError(f"git {' '.join(args[:3])} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode(errors="replace").strip()
