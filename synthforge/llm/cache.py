"""A response cache for LLM requests: a rerun of the same requests costs nothing.

One SQLite file per cache folder. The key is a hash of everything that decides a response (backend, model and
revision, messages, token limit, temperature, seed), never of credentials: nothing secret is sent to the key
or stored beside it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from synthforge.errors import BadInput

if TYPE_CHECKING:
    from synthforge.llm.backends import ChatRequest

FILENAME = "responses.sqlite"


def request_key(backend: str, model: str, revision: str | None, request: ChatRequest, scope: str | None = None) -> str:
    """sha256 of the canonical JSON of what decides the response to `request` (scope: the server, if any)."""
    fields = {
        "backend": backend,
        "scope": scope,
        "model": model,
        "revision": revision,
        "messages": [list(message) for message in request.messages],
        "max_new_tokens": request.max_new_tokens,
        "temperature": float(request.temperature),  # 0 and 0.0 are one request
        "seed": request.seed,
    }
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """`responses.sqlite` in `folder`: request key -> (text, finish_reason, created_at). Safe to share between threads."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / FILENAME
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            # WAL: readers (another process on the same cache) do not block the writer.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses "
                "(key TEXT PRIMARY KEY, text TEXT NOT NULL, finish_reason TEXT, created_at TEXT NOT NULL)"
            )
            self._db.execute("SELECT key, text, finish_reason, created_at FROM responses LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise BadInput(f"{self.path}: not a usable LLM response cache ({exc}); delete the file to start a new one") from None

    def get(self, key: str) -> tuple[str, str | None] | None:
        """(text, finish_reason) stored under key, or None; counted as a hit or a miss."""
        with self._lock:
            row = self._db.execute("SELECT text, finish_reason FROM responses WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            return row[0], row[1]

    def put(self, key: str, text: str, finish_reason: str | None) -> None:
        """Store one response, committed at once so that an interrupted run keeps what it paid for."""
        created_at = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)", (key, text, finish_reason, created_at))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path.parent)!r}, hits={self.hits}, misses={self.misses})"
