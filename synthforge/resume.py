"""Resuming after a kill: what a killed writer leaves beside its output, and a journal of finished generation batches.

A stage writes into `.<out>.tmp-<pid>-<hex>` beside its output and renames it into place; an output it replaces
is first moved aside to `.<out>.old-<pid>-<hex>` (synthforge.stagedir). A SIGKILL can leave either behind.
`recover(out)` runs before every write of `out`: it removes the leftovers of dead writers and moves back an output
that was moved aside but never replaced. The pid in the names tells a dead writer's leftovers from a live one's.

Generation is the slow stage, so it also keeps a `Journal` of the batches it has finished: a killed run, rerun
with the same stage fingerprint, makes only the batches it lacks.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from synthforge.errors import BadInput

Row = dict[str, Any]


def temp_name(out: Path, kind: str = "tmp") -> Path:
    """A fresh hidden path beside `out` for this process: "tmp" to write a new output into, "old" to move the
    current output aside to while the new one takes its place."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill would signal a process group
        return False
    if os.name == "nt":  # os.kill there terminates the process: keep what may be in use
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(out: str | Path) -> None:
    """Clear what killed writers of `out` left beside it; call before writing `out`.

    A temporary folder of a dead writer is removed. An output a dead writer moved aside is moved back when `out`
    is missing (the writer was killed between its two renames: the previous output is restored, not lost), and
    removed when `out` is there (the writer was killed while deleting it). Names without a pid (written before
    pids were recorded) count as dead writers': concurrent writers of one output are not supported.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(?:(\d+)-)?[0-9a-f]{{8}}")
    stale: dict[str, list[Path]] = {"tmp": [], "old": []}
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and not (match[2] and _alive(int(match[2]))):
            stale[match[1]].append(path)
    old = sorted(stale["old"], key=lambda p: p.stat().st_ctime_ns)  # the last one moved aside is the newest output
    if old and not out.exists():
        os.replace(old.pop(), out)
    for path in stale["tmp"] + old:
        _remove(path)


class Journal:
    """The generation batches one stage fingerprint has finished, one Parquet file each, kept beside the output in
    `.<out>.journal-<fingerprint[:16]>/` until the output is in place.

    A batch file is written whole and renamed into the journal, so a file there is a finished batch. Use it as a
    context manager around the whole stage, its output written inside: the journal goes when the block ends, or
    fails on bad input (fixing the input changes the fingerprint, so the batches would not be reused); on any
    other failure, an interrupt or a kill it stays for the rerun.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema

    @classmethod
    def open(cls, out: str | Path, fingerprint: str, schema: pa.Schema) -> Journal:
        """The journal of `fingerprint` for `out`, with the batches earlier runs finished. A journal of another
        fingerprint (other settings or inputs: its batches are not this work's) and half-written batch files are
        removed."""
        out = Path(out)
        path = out.parent / f".{out.name}.journal-{fingerprint[:16]}"
        if out.parent.is_dir():
            for other in out.parent.iterdir():
                if other.name.startswith(f".{out.name}.journal-") and other != path:
                    _remove(other)
        path.mkdir(parents=True, exist_ok=True)
        for partial in path.glob(".*.tmp"):
            partial.unlink()
        return cls(path, schema)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or issubclass(exc_type, BadInput):
            self.remove()

    def _file(self, batch_id: str) -> Path:
        if not re.fullmatch(r"[\w-][\w.-]*", batch_id):
            raise ValueError(f"batch id {batch_id!r} is not usable as a file name")
        return self.path / f"{batch_id}.parquet"

    def __contains__(self, batch_id: str) -> bool:
        return self._file(batch_id).exists()

    def write(self, batch_id: str, rows: list[Row]) -> None:
        """Record a finished batch. Synced before the rename: a file in the journal is whole even after a crash."""
        final = self._file(batch_id)
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def read(self, batch_id: str, columns: list[str] | None = None) -> list[Row]:
        return pq.read_table(self._file(batch_id), columns=columns).to_pylist()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
