"""Per-series state machine on disk: one folder per received batch, its state in ``state.json``.

    receiving -> queued -> inferred -> built -> delivered
             \\-> dropped (selection said no)       \\-> failed (refused input, or attempts used up)

A *batch* is what arrived for one SeriesInstanceUID between two quiet periods; a series sent again
later is a new batch (generation + 1) of the same series. Every transition is an atomic rewrite of
``state.json``; the artefacts of a step (``result.json``, ``out/*.dcm``) are written atomically
before the state that says they exist, so on restart a batch simply resumes from its state.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctlesion_node.durable import make_dir_durable, read_json, write_json_atomic

RECEIVING, QUEUED, INFERRED, BUILT, DELIVERED, DROPPED, FAILED = (
    "receiving", "queued", "inferred", "built", "delivered", "dropped", "failed")
OPEN_STATES = (QUEUED, INFERRED, BUILT)  # work left to do
FINAL_STATES = (DELIVERED, DROPPED, FAILED)


def series_key(series_uid: str) -> str:
    """A file-name-safe, fixed-length name for a series (UIDs may be 64 characters)."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:24]


@dataclass
class BatchState:
    batch_id: str
    series_uid: str
    study_uid: str
    calling_aet: str
    peer_host: str
    state: str = RECEIVING
    created: float = field(default_factory=time.time)
    closed: float | None = None  # when the quiet timer ended it
    n_instances: int = 0  # set at close (the files are the truth while receiving)
    reason: str | None = None  # why dropped / failed
    attempts: int = 0
    patient_pseudonym: str | None = None
    delivered_uids: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchState:
        return cls(**data)


class BatchStore:
    """The folder ``<spool>/batches``; all reads and writes of batch state go through here."""

    def __init__(self, root: Path) -> None:
        self.root = root / "batches"
        make_dir_durable(self.root)

    def dir(self, batch_id: str) -> Path:
        return self.root / batch_id

    def instances_dir(self, batch_id: str) -> Path:
        return self.dir(batch_id) / "instances"

    def out_dir(self, batch_id: str) -> Path:
        return self.dir(batch_id) / "out"

    def result_path(self, batch_id: str) -> Path:
        return self.dir(batch_id) / "result.json"

    def create(self, state: BatchState) -> None:
        """Folder + state.json durable before the first instance goes in (a folder without a state
        file therefore never holds an acknowledged instance and is removed on start-up)."""
        d = self.dir(state.batch_id)
        make_dir_durable(d)
        make_dir_durable(self.instances_dir(state.batch_id))
        self.save(state)

    def save(self, state: BatchState) -> None:
        write_json_atomic(self.dir(state.batch_id) / "state.json", state.to_dict())

    def load(self, batch_id: str) -> BatchState:
        return BatchState.from_dict(read_json(self.dir(batch_id) / "state.json"))

    def scan(self) -> list[BatchState]:
        """Every batch with a state file, oldest first; half-created folders are removed."""
        out = []
        for d in sorted(self.root.iterdir()):
            if not d.is_dir():
                continue
            if not (d / "state.json").exists():
                shutil.rmtree(d, ignore_errors=True)
                continue
            out.append(self.load(d.name))
        return sorted(out, key=lambda s: s.created)

    def next_generation(self, series_uid: str) -> str:
        key = series_key(series_uid)
        gens = [int(d.name.rsplit("-", 1)[1]) for d in self.root.glob(f"{key}-*") if d.name.rsplit("-", 1)[1].isdigit()]
        return f"{key}-{max(gens, default=0) + 1:04d}"

    def instance_files(self, batch_id: str) -> list[Path]:
        d = self.instances_dir(batch_id)
        return sorted(p for p in d.glob("*.dcm")) if d.is_dir() else []

    def release_files(self, batch_id: str) -> None:
        """After a final state: the images and built objects go, state.json (no pixels, no PHI) stays."""
        for sub in (self.instances_dir(batch_id), self.out_dir(batch_id)):
            shutil.rmtree(sub, ignore_errors=True)
        self.result_path(batch_id).unlink(missing_ok=True)

    def previous_report(self, series_uid: str, before: str) -> str | None:
        """SR SOP Instance UID delivered for an earlier batch of this series (the predecessor)."""
        key = series_key(series_uid)
        best = None
        for d in sorted(self.root.glob(f"{key}-*")):
            if d.name >= before or not (d / "state.json").exists():
                continue
            st = self.load(d.name)
            if st.state == DELIVERED and st.delivered_uids:
                best = st.delivered_uids[0]  # the SR is stored first
        return best
