"""The service's append-only audit log: one JSON line per generation (pure: standard library only).

    REGISTRY/serve/audit.jsonl   {"time", "request", "key", "sources", "credit", "router", "images", "steps"}

Lines are appended, each with one `write` on a file opened O_APPEND (so concurrent writers never
interleave within a line) and flushed to disk before the request is answered. The one rewrite is
`registry forget`'s redaction of a forgotten source's name (registry.Registry._redact_audit): appends
take the registry's writer lock (`lock_folder`) so that no line is written into a file being replaced.
"""
from __future__ import annotations

import json
import os
import threading
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

from ..util.lock import locked

AUDIT_FILE = "audit.jsonl"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class AuditLog:
    """Append-only JSONL file at `path` (created with its folder on the first append); `lock_folder`: the
    registry whose writer lock each append holds."""

    def __init__(self, path: str | os.PathLike, lock_folder: str | os.PathLike | None = None):
        self.path = Path(path)
        self.lock_folder = lock_folder
        self._lock = threading.Lock()

    def append(self, record: dict) -> dict:
        """Append `record` (a "time" field is added first when missing); returns what was written."""
        row = {"time": now(), **record}
        line = (json.dumps(row, sort_keys=False) + "\n").encode()
        with self._lock, (locked(self.lock_folder) if self.lock_folder is not None else nullcontext()):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return row

    def read(self) -> list[dict]:
        """Every record, oldest first ([] before the first append)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
