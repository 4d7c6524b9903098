"""The spool: where received instances wait, with the limits that make refusal safer than loss.

``reserve`` happens before the write, under a lock, so concurrent associations cannot together
overrun the limits; a refused reservation is answered 0xA700 (Out of Resources) and the sender
keeps the instance and may retry later.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from ctlesion_node.config import SpoolConfig
from ctlesion_node.durable import make_dir_durable, write_atomic


@dataclass
class SpoolUsage:
    bytes: int
    instances: int


class Spool:
    def __init__(self, config: SpoolConfig) -> None:
        self.config = config
        self.root = config.dir
        self.tmp = self.root / "tmp"
        make_dir_durable(self.root)
        make_dir_durable(self.tmp)
        for stale in self.tmp.iterdir():  # temp files of a write a crash interrupted: never acknowledged
            stale.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self.usage = SpoolUsage(0, 0)

    def recount(self, files: list[Path]) -> None:
        with self._lock:
            self.usage = SpoolUsage(sum(p.stat().st_size for p in files), len(files))

    def full_reason(self, size: int) -> str | None:
        """Why an instance of ``size`` bytes cannot be taken now, or None."""
        u, c = self.usage, self.config
        if u.instances + 1 > c.max_instances:
            return f"spool holds {u.instances} instances (limit {c.max_instances})"
        if u.bytes + size > c.max_bytes:
            return f"spool holds {u.bytes} bytes (limit {c.max_bytes})"
        free = shutil.disk_usage(self.root).free
        if free - size < c.min_free_bytes:
            return f"disk free {free} bytes below the threshold {c.min_free_bytes}"
        return None

    def reserve(self, size: int) -> str | None:
        """Count ``size`` bytes as used; returns the refusal reason instead when it does not fit."""
        with self._lock:
            reason = self.full_reason(size)
            if reason is None:
                self.usage = SpoolUsage(self.usage.bytes + size, self.usage.instances + 1)
            return reason

    def release(self, size: int, count: int = 1) -> None:
        with self._lock:
            self.usage = SpoolUsage(max(0, self.usage.bytes - size), max(0, self.usage.instances - count))

    @staticmethod
    def instance_name(sop_uid: str) -> str:
        # Same SOP instance sent twice in one batch -> same file (idempotent, counted once).
        return hashlib.sha256(sop_uid.encode()).hexdigest()[:32] + ".dcm"

    def write_instance(self, folder: Path, sop_uid: str, data: bytes) -> tuple[Path, bool]:
        """Durably store one Part-10 file; returns (path, True when it replaced a copy already there)."""
        path = folder / self.instance_name(sop_uid)
        existed = path.exists()
        write_atomic(path, data, tmp_dir=self.tmp)
        return path, existed

    def writable(self) -> bool:
        return os.access(self.root, os.W_OK)
