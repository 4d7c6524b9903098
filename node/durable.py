"""Durable file writes: temp file in the same folder, fsync, atomic rename, fsync of the folder.

After ``write_atomic`` returns, the file exists with its full content even if the machine loses
power; before it returns, either the old content or nothing is there (never half a file).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """``tmp_dir`` must be on the same file system (rename is atomic only there)."""
    tmp = (tmp_dir or path.parent) / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def make_dir_durable(path: Path) -> None:
    """mkdir -p, then fsync the parent so the new entry survives a crash."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    fsync_dir(path.parent)
