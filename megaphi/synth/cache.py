"""A request cache in SQLite: a rerun of a synthetic-data workflow makes no request it has
already made.

The key is the SHA-256 of the canonical JSON of the request: the model, the sampling
parameters (seed included, so a new seed misses) and the messages. Only successful responses
are stored; a failure is retried by the next run. The value is the response as the client
records it (texts, token counts, raw body). The file is written in WAL mode and each entry is
committed when it is stored, so a killed run keeps everything it received.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Dict, List, Optional


def request_key(model: str, params: Dict[str, Any], messages: List[Dict[str, str]]) -> str:
    """The cache key of a chat request (stable across processes and runs)."""
    canonical = json.dumps({"model": model, "params": params, "messages": messages},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class RequestCache:
    """``key -> response`` in one SQLite file (used from one thread: the client's event loop).

    Args:
        path: the database file (created with its directory).
        read: look entries up (``False`` for ``--no-cache``: every request is made, and its
            response replaces the stored one).
    """

    def __init__(self, path: str, read: bool = True):
        self.path, self.read = Path(path), read
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, "
                         "model TEXT NOT NULL, value TEXT NOT NULL)")
        self._db.commit()
        self.hits = self.misses = 0

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        if not self.read:
            return None
        row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, model: str, value: Dict[str, Any]) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses (key, model, value) VALUES (?, ?, ?)",
                         (key, model, json.dumps(value, ensure_ascii=False)))
        self._db.commit()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()


__all__ = ["RequestCache", "request_key"]
