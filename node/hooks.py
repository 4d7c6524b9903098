"""Test hooks: ``CTLESION_NODE_PAUSE_AT=stage[:n]`` makes the node stop dead at a stage.

The thread that reaches the stage writes ``<spool>/paused-<stage>`` and sleeps for ever, so a
crash test can wait for the marker and ``kill -9`` the node at exactly that point. Stages:
``received:N`` (the N-th instance is on disk, its C-STORE response not yet sent), ``queued``
(the series is complete and queued, before inference), ``inference`` (one slab answered, others
not), ``sending`` (the SR is stored at the destination, the key images not yet). Unset in production.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "CTLESION_NODE_PAUSE_AT"
STAGES = ("received", "queued", "inference", "sending")


def pause_point(stage: str, spool_dir: Path, count: int | None = None) -> None:
    want = os.environ.get(ENV)
    if not want:
        return
    name, _, n = want.partition(":")
    if name != stage or (n and (count is None or count < int(n))):
        return
    (spool_dir / f"paused-{stage}").write_text(str(os.getpid()))
    while True:  # pragma: no cover - ended by the test's SIGKILL
        time.sleep(3600)
