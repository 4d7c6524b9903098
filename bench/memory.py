"""Memory of a server's process tree over time, and the soak verdict on it.

Summing RSS over tritonserver and its Python-backend stubs counts the shared-memory region that
they all map (the stubs exchange tensors through /dev/shm) once per process, so it grows with the
number of stubs touching it, not with what the server holds. PSS splits every shared page between
the processes mapping it: its sum is the memory the tree really occupies, and the soak judges it.
RSS, private anonymous memory (heaps, onnxruntime's arena) and the shared region are sampled beside
it, so a growth can be told apart.
"""

from __future__ import annotations

import csv
import statistics
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from ctlesion_client.server import process_tree

MIB = 2**20


@dataclass
class MemorySample:
    t_s: float  # since the sampler started
    processes: int
    rss_bytes: int  # sum of RSS (shared pages counted once per process mapping them)
    pss_bytes: int  # sum of PSS: what the tree occupies
    anon_bytes: int  # sum of private anonymous RSS (heaps, allocator arenas)
    shmem_bytes: int  # the largest RssShmem of one process (the shared region, counted once)
    # PSS per process kind: "tritonserver" and one entry per Python model (its instances summed)
    pss_by_process: dict[str, int] = field(default_factory=dict)


def process_label(pid: int) -> str:
    """``tritonserver``, the model name of a Python-backend stub (its first argument is
    ``<repository>/<model>/<version>/model.py``), or the executable's name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    exe = Path(argv[0].decode(errors="replace")).name if argv and argv[0] else "?"
    if exe == "triton_python_backend_stub" and len(argv) > 1:
        model_py = Path(argv[1].decode(errors="replace"))
        return model_py.parent.parent.name or exe
    return exe


def _kib_fields(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """``Name:   123 kB`` lines of /proc/PID/status or smaps_rollup, in bytes."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in names:
            out[key] = int(rest.split()[0]) * 1024
    return out


def tree_memory(root: int, t_s: float = 0.0) -> MemorySample | None:
    """One sample of ``root``'s tree; None once the root is gone."""
    rss = pss = anon = shmem = 0
    seen = 0
    by_label: dict[str, int] = {}
    for pid in process_tree(root):
        try:
            status = _kib_fields(Path(f"/proc/{pid}/status"), ("RssAnon", "RssShmem"))
            # RSS and PSS from one walk of the mappings: read apart (status, then smaps_rollup) a
            # growing process could show more PSS than RSS
            rollup = _kib_fields(Path(f"/proc/{pid}/smaps_rollup"), ("Rss", "Pss"))
        except (OSError, ValueError, IndexError):
            continue  # exited between listing and reading (or not readable): skip it
        seen += 1
        rss += rollup.get("Rss", 0)
        anon += status.get("RssAnon", 0)
        shmem = max(shmem, status.get("RssShmem", 0))
        pss += rollup.get("Pss", 0)
        label = process_label(pid)
        by_label[label] = by_label.get(label, 0) + rollup.get("Pss", 0)
    if seen == 0:
        return None
    return MemorySample(round(t_s, 2), seen, rss, pss, anon, shmem, by_label)


class MemorySampler:
    """Samples ``tree_memory(pid)`` every ``interval_s`` on a daemon thread until ``stop()``."""

    def __init__(self, pid: int, interval_s: float = 2.0) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[MemorySample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._t0 = 0.0
        self.t0_unix = 0.0  # wall clock of t_s = 0, to line samples up with locust's history

    def _run(self) -> None:
        while True:
            sample = tree_memory(self.pid, time.monotonic() - self._t0)
            if sample is not None:
                self.samples.append(sample)
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> MemorySampler:
        self._t0, self.t0_unix = time.monotonic(), time.time()
        self._thread.start()
        return self

    def stop(self) -> list[MemorySample]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.samples

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_csv(samples: list[MemorySample], path: Path) -> Path:
    """One row per sample; the per-process PSS as ``pss_<label>_bytes`` columns."""
    base = [f.name for f in fields(MemorySample) if f.name != "pss_by_process"]
    labels = sorted({label for s in samples for label in s.pss_by_process})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*base, *(f"pss_{label}_bytes" for label in labels)])
        for s in samples:
            writer.writerow([*(getattr(s, name) for name in base), *(s.pss_by_process.get(k, 0) for k in labels)])
    return path


def growth_by_process(samples: list[MemorySample], warmup_s: float) -> dict[str, int]:
    """PSS change per process kind from the first to the last sample after the warm-up
    (medians over a tenth of the phase each, as the verdict): which model grew."""
    measured = [s for s in samples if s.t_s >= warmup_s]
    if len(measured) < 6:
        return {}
    edge = max(3, len(measured) // 10)
    labels = sorted({label for s in measured for label in s.pss_by_process})
    return {
        label: _median_bytes([s.pss_by_process.get(label, 0) for s in measured[-edge:]])
        - _median_bytes([s.pss_by_process.get(label, 0) for s in measured[:edge]])
        for label in labels
    }


@dataclass
class SoakVerdict:
    metric: str  # the MemorySample field judged
    warmup_s: float
    measured_s: float
    samples: int
    baseline_bytes: int  # median of the samples in the first 10 % of the measured phase
    end_bytes: int  # median of the samples in its last 10 %
    growth_bytes: int
    allowed_bytes: int  # max(floor, fraction x baseline)
    slope_mib_per_min: float  # least-squares slope over the measured phase
    failures: int
    passed: bool
    reason: str
    growth_by_process: dict[str, int] = field(default_factory=dict)  # PSS change per process kind


def _median_bytes(values: list[int]) -> int:
    return int(statistics.median(values)) if values else 0


def judge_soak(
    samples: list[MemorySample],
    warmup_s: float,
    failures: int,
    metric: str = "pss_bytes",
    floor_bytes: int = 64 * MIB,
    fraction: float = 0.10,
) -> SoakVerdict:
    """Pass when no request failed and ``metric`` grew less than max(floor, fraction x baseline)
    between the start and the end of the measured phase (after the warm-up).

    Start and end are medians over a tenth of the phase each (at least 3 samples), so one sample
    taken while a large batch is in flight moves neither.
    """
    measured = [s for s in samples if s.t_s >= warmup_s]
    if len(measured) < 6:
        return SoakVerdict(metric, warmup_s, 0.0, len(measured), 0, 0, 0, 0, float("nan"), failures, False,
                           f"only {len(measured)} samples after the warm-up (need 6): run longer")  # fmt: skip
    edge = max(3, len(measured) // 10)
    values = [int(getattr(s, metric)) for s in measured]
    baseline, end = _median_bytes(values[:edge]), _median_bytes(values[-edge:])
    growth = end - baseline
    allowed = max(floor_bytes, int(fraction * baseline))
    ts = [s.t_s for s in measured]
    t_mean, v_mean = statistics.fmean(ts), statistics.fmean(values)
    var = sum((t - t_mean) ** 2 for t in ts)
    slope = sum((t - t_mean) * (v - v_mean) for t, v in zip(ts, values, strict=True)) / var if var else 0.0
    reasons = []
    if failures:
        reasons.append(f"{failures} failed requests")
    if growth >= allowed:
        reasons.append(f"{metric.removesuffix('_bytes').upper()} grew {growth / MIB:.1f} MiB >= allowed {allowed / MIB:.1f} MiB")
    return SoakVerdict(
        metric=metric,
        warmup_s=warmup_s,
        measured_s=round(ts[-1] - ts[0], 1),
        samples=len(measured),
        baseline_bytes=baseline,
        end_bytes=end,
        growth_bytes=growth,
        allowed_bytes=allowed,
        slope_mib_per_min=round(slope * 60 / MIB, 2),
        failures=failures,
        passed=not reasons,
        reason="; ".join(reasons) or "no failed request and memory flat after the warm-up",
        growth_by_process=growth_by_process(samples, warmup_s),
    )
