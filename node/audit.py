"""The audit log: one JSON object per line, appended and fsynced; no PHI.

Who (calling AE, peer address), what (study / series UIDs, instance counts, SOP UIDs sent back),
when (UTC), what was found (counts, sizes, scores) and how long each step took. Patient identifiers
never appear: ``pseudonym`` is HMAC-SHA256 over the PatientID with a key from the environment, so
the same patient maps to the same token on this node and nobody without the key can invert it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import threading
from pathlib import Path
from typing import Any


def pseudonym(key: bytes, value: str) -> str:
    return "p-" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:24]


class AuditLog:
    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self._key = key
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def pseudonym(self, patient_id: str) -> str:
        return pseudonym(self._key, patient_id)

    def write(self, event: str, **fields: Any) -> None:
        record = {"ts": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"), "event": event, **fields}
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)


def read_audit(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
