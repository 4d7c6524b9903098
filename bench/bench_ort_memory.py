"""onnxruntime CPU memory settings of the detector, side by side: time ratio and resident memory.

    python -m ctlesion_bench.bench_ort_memory                       # exports the committed checkpoint
    python -m ctlesion_bench.bench_ort_memory --onnx detector.onnx --batches 32 8 --rounds 4

For each combination of ``enable_cpu_mem_arena`` and ``enable_mem_pattern``, and for the arena
with batches cut into runs of at most 8 slices (the detector model's ``max_run_batch``):
- memory: a fresh process runs the batch sequence 32, 16, 32, 8, 32 (what the dynamic batcher
  forms) and reports RSS after each run: does the session keep what it allocated, per shape?
- time: one process holds the four sessions and runs them interleaved (round-robin over configs,
  batches and --rounds), so machine drift hits all alike; totals are reported as ratios to the
  onnxruntime default (both on).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctlesion_bench.common import DEFAULT_CHECKPOINT, Machine, write_json

# name -> (arena, memory pattern, slices per onnxruntime run; 0 = the whole batch in one run)
CONFIGS = {
    "arena+pattern": (True, True, 0),
    "arena": (True, False, 0),
    "pattern": (False, True, 0),
    "neither": (False, False, 0),
    "arena, runs<=8": (True, False, 8),
}
MEMORY_SEQUENCE = (32, 16, 32, 8, 32)


@dataclass
class OrtMemoryRow:
    config: str
    arena: bool
    mem_pattern: bool
    max_run_batch: int
    time_ratio: float  # total time over all rounds, relative to arena+pattern
    rss_mib_after_each: list[int]  # after each batch of MEMORY_SEQUENCE, in a fresh process


def _session(onnx: Path, arena: bool, pattern: bool, threads: int) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = pattern
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])


def _images(session: object, batch: int) -> np.ndarray:
    _, c, h, w = session.get_inputs()[0].shape  # type: ignore[attr-defined]
    return np.random.default_rng(0).uniform(0, 255, (batch, c, h, w)).astype(np.float32)


def _run(session: object, images: np.ndarray, max_run_batch: int) -> None:
    """As the detector model runs a batch: in one call, or in runs of at most ``max_run_batch``."""
    name = session.get_inputs()[0].name  # type: ignore[attr-defined]
    step = max_run_batch or len(images)
    for i in range(0, len(images), step):
        session.run(None, {name: images[i : i + step]})  # type: ignore[attr-defined]


def _rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def memory_child(onnx: Path, arena: bool, pattern: bool, max_run_batch: int, threads: int) -> list[int]:
    """Run in a fresh process: RSS after each batch of MEMORY_SEQUENCE."""
    session = _session(onnx, arena, pattern, threads)
    images = _images(session, max(MEMORY_SEQUENCE))
    out = []
    for batch in MEMORY_SEQUENCE:
        _run(session, images[:batch], max_run_batch)
        out.append(_rss_mib())
    return out


def time_ratios(onnx: Path, batches: list[int], rounds: int, threads: int) -> dict[str, float]:
    sessions = {k: _session(onnx, a, p, threads) for k, (a, p, _) in CONFIGS.items()}
    images = _images(next(iter(sessions.values())), max(batches))
    for key, session in sessions.items():  # warm-up: every shape once
        for batch in batches:
            _run(session, images[:batch], CONFIGS[key][2])
    totals = dict.fromkeys(sessions, 0.0)
    try:
        from tqdm import tqdm

        progress = tqdm(total=rounds * len(batches) * len(sessions), desc="interleaved runs", unit="run")
    except ImportError:
        progress = None
    for _ in range(rounds):
        for batch in batches:
            for key, session in sessions.items():
                t0 = time.perf_counter()
                _run(session, images[:batch], CONFIGS[key][2])
                totals[key] += time.perf_counter() - t0
                if progress is not None:
                    progress.update()
    if progress is not None:
        progress.close()
    base = totals["arena+pattern"]
    return {k: round(v / base, 3) for k, v in totals.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctlesion_bench.bench_ort_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", type=Path, help="detector ONNX (default: exported from the committed checkpoint)")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 8])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = all cores, as served)")
    p.add_argument("--out", type=Path, default=Path("work/bench_ort_memory"))
    p.add_argument("--memory-child", help=argparse.SUPPRESS)  # a CONFIGS name: the fresh process of one setting
    args = p.parse_args(argv)
    if args.memory_child:  # the fresh process of one memory measurement
        print(json.dumps(memory_child(args.onnx, *CONFIGS[args.memory_child], args.threads)))
        return 0
    onnx = args.onnx
    if onnx is None:
        from ctlesion_export.cli import export_checkpoint

        onnx = export_checkpoint(DEFAULT_CHECKPOINT, Path(tempfile.mkdtemp(prefix="ort-memory-")) / "detector.onnx")
    memory = {}
    for key in CONFIGS:
        cmd = [sys.executable, "-m", "ctlesion_bench.bench_ort_memory", "--onnx", str(onnx),
               "--threads", str(args.threads), "--memory-child", key]  # fmt: skip
        memory[key] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    ratios = time_ratios(onnx, args.batches, args.rounds, args.threads)
    rows = [OrtMemoryRow(k, a, pt, run, ratios[k], memory[k]) for k, (a, pt, run) in CONFIGS.items()]
    machine = Machine.here()
    print(f"{machine.cpu_model}, {machine.cores} cores, load average {machine.loadavg_1m}; batches {args.batches} "
          f"x {args.rounds} rounds, interleaved; RSS after batches {list(MEMORY_SEQUENCE)} in a fresh process")  # fmt: skip
    print(f"{'config':<15} {'arena':<6} {'pattern':<8} {'run<=':>5} {'time ratio':>10}  RSS MiB after each batch")
    for r in rows:
        print(f"{r.config:<15} {r.arena!s:<6} {r.mem_pattern!s:<8} {r.max_run_batch or 'all':>5} "
              f"{r.time_ratio:>10.3f}  {r.rss_mib_after_each}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "ort_memory.json", {"machine": machine, "rows": rows, "onnx": str(onnx)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
