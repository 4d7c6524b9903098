"""A whole series through the client library next to the detector alone, in one run.

    python -m ctlesion_bench.series_bench [--model-repository work/model_repository/cpu] [--slices 300] \
        [--repeat 2] [--concurrency 4] [--out work/bench/series] [--results bench/RESULTS.md]

(1) the repository's own detector ONNX in-process (onnxruntime, all cores), on the tensors
    preprocess makes of the first two slabs, at batch sizes up to the served batch, with and
    without onnxruntime's thread spinning: its best slices/s, measured before and again after (2)
    so drift in machine load shows;
(2) ``LesionClient.detect_series`` on a ``--slices``-slice phantom series against the real
    tritonserver serving that repository (k and slab size from the served configs, ``--concurrency``
    slabs in flight): seconds per series, series per minute, slices/s, with the server's own view
    (detector average batch and requests per execution from Triton's metrics).
The ratio (2) / (1) is the serving efficiency a client sees; issue 16 asks >= 0.9 on CPU.

On a shared machine wall time swings with other processes' load, so CPU time is accounted too:
seconds of CPU per slice of the detector alone (this process, onnxruntime's threads included) and
of the whole serving path (tritonserver with its Python stubs, from /proc, plus this process, which
is the client). Their quotient is the share of the CPU that serving leaves to the detector: what the
wall-clock ratio approaches when the cores are not shared with anything else.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctlesion_bench.common import (
    REPO_ROOT,
    Machine,
    client_slabs,
    configure_logging,
    phantom_series_dir,
    repository_detector_onnx,
    update_section,
    write_json,
)
from ctlesion_bench.measure import DetectorRow, detector_sweep
from ctlesion_bench.metrics import ServerView, diff, scrape, scrape_settled, view_markdown

log = logging.getLogger(__name__)
DEFAULT_REPOSITORY = REPO_ROOT / "work" / "model_repository" / "cpu"
RESULTS_MD = REPO_ROOT / "bench" / "RESULTS.md"
SECTION = "## Series throughput through the client library"
TARGET = 0.9  # issue 16 item 3, CPU


@dataclass
class SeriesRun:
    seconds: float
    timings: dict[str, float]
    slabs: int
    lesions: int
    server_cpu_s: float = 0.0  # tritonserver and its stubs during this run
    client_cpu_s: float = 0.0  # this process (the client library) during this run
    server_cpu_by_process: dict[str, float] = field(default_factory=dict)  # server_cpu_s by process_label


def process_label(pid: int) -> str:
    """Which part of the server a process is: a Python-backend stub by the model it runs (its
    command line names ``<model>/<version>/model.py``; instances of one model add up), else its
    executable's name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    for a in argv:
        path = Path(a.decode(errors="replace"))
        if path.name == "model.py" and len(path.parts) >= 3:
            return f"{path.parent.parent.name} stub"
    return Path(argv[0].decode(errors="replace")).name or "?"


def tree_cpu_by_process(root: int) -> dict[str, float]:
    """utime + stime in seconds of ``root`` and its descendants (/proc), summed by ``process_label``."""
    import os

    from ctlesion_client.server import process_tree

    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
        except (OSError, ValueError, IndexError):
            continue
        label = process_label(pid)
        out[label] = out.get(label, 0.0) + ticks / tick
    return out


def tree_cpu_s(root: int) -> float:
    """utime + stime of ``root`` and its descendants (/proc), seconds."""
    return sum(tree_cpu_by_process(root).values())


def detector_cpu_s_per_slice(onnx: Path, images: np.ndarray, batch: int, repeat: int, spinning: bool) -> float:
    """CPU seconds per slice of the detector alone at ``batch`` (this process: onnxruntime's threads)."""
    from ctlesion_bench.measure import ort_session

    sess = ort_session(onnx, spinning=spinning)
    x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])), dtype=np.float32)
    sess.run(None, {"images": x})  # type: ignore[attr-defined]
    t0 = time.process_time()
    for _ in range(repeat):
        sess.run(None, {"images": x})  # type: ignore[attr-defined]
    return (time.process_time() - t0) / (repeat * batch)


@dataclass
class SeriesBenchResult:
    command: str
    machine: Machine
    repository: str
    detector_onnx: str
    slices: int
    slab_size: int
    k: int
    max_batch_size: int | None
    concurrency: int
    detector_before: list[DetectorRow] = field(default_factory=list)
    detector_after: list[DetectorRow] = field(default_factory=list)
    runs: list[SeriesRun] = field(default_factory=list)
    server: ServerView | None = None
    detector_cpu_s_per_slice: float = 0.0  # at the best batch of the sweep before, spinning off as served
    detector_spinning: bool = True  # the faster onnxruntime setting for the detector alone
    fpr: bool = True  # the client's second pass (3D false-positive reduction) ran; --no-fpr: first pass only

    @property
    def serving_cpu_s_per_slice(self) -> float:
        return statistics.median((r.server_cpu_s + r.client_cpu_s) / self.slices for r in self.runs)

    @property
    def cpu_ratio(self) -> float:
        return self.detector_cpu_s_per_slice / self.serving_cpu_s_per_slice

    @property
    def detector_slices_per_s(self) -> float:
        best = [max(r.slices_per_s for r in rows) for rows in (self.detector_before, self.detector_after) if rows]
        return statistics.mean(best)

    @property
    def series_seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def series_slices_per_s(self) -> float:
        return self.slices / self.series_seconds

    @property
    def ratio(self) -> float:
        return self.series_slices_per_s / self.detector_slices_per_s


def ensure_repository(path: Path) -> Path:
    """The default CPU repository (what `make demo` serves), built here if missing or stale."""
    from ctlesion_export.build_repo import main as build_repo

    if build_repo(["--target", "cpu", "--out", str(path), "--if-stale"]) != 0:
        raise RuntimeError(f"ctlesion build-repo --target cpu --out {path} failed")
    return path


def run(args: argparse.Namespace, argv: list[str]) -> SeriesBenchResult:
    from ctlesion_client import ClientOptions, DetectOptions, LesionClient
    from ctlesion_client.server import TritonServer
    from ctlesion_client.slabs import RequestShape
    from ctlesion_export.onnx_export import inspect_onnx
    from preprocess_backend.pipeline import preprocess_slab
    from preprocess_backend.types import Options

    repo = args.model_repository or ensure_repository(DEFAULT_REPOSITORY)
    onnx = repository_detector_onnx(repo)
    series = args.series_dir or phantom_series_dir(args.out / "data", args.slices)
    shape = RequestShape.from_repository(repo)
    slabs = client_slabs(series, repo)
    info = inspect_onnx(onnx)
    images = np.concatenate([preprocess_slab(s, Options(model_size=info.height, k=info.channels)).images for s in slabs[:2]])
    batches = sorted({b for b in (8, 16, shape.max_batch_size or 32) if b <= (shape.max_batch_size or 32)})
    n_slices = len(list(p for p in series.iterdir() if p.is_file()))
    result = SeriesBenchResult(
        command="python -m ctlesion_bench.series_bench " + shlex.join(argv), machine=Machine.here(), repository=str(repo),
        detector_onnx=str(onnx), slices=n_slices, slab_size=shape.slab_size(), k=shape.k or 3,
        max_batch_size=shape.max_batch_size, concurrency=args.concurrency, fpr=not args.no_fpr,
    )  # fmt: skip
    x = images.astype(np.float32)
    sweeps = {spin: detector_sweep(onnx, x, batches, args.detector_repeat, spinning=spin) for spin in (True, False)}
    result.detector_spinning = max(sweeps, key=lambda spin: max(r.slices_per_s for r in sweeps[spin]))
    result.detector_before = sweeps[result.detector_spinning]
    best_batch = max(result.detector_before, key=lambda r: r.slices_per_s).batch
    # CPU time as served (spinning off): spinning threads burn CPU that is no detector work
    result.detector_cpu_s_per_slice = detector_cpu_s_per_slice(onnx, x, best_batch, args.detector_repeat, spinning=False)
    with TritonServer(Path(repo), log_path=args.out / "tritonserver.log") as server:
        options = ClientOptions(concurrency=args.concurrency, client_timeout_s=600)
        with LesionClient(server.grpc_url, options, DetectOptions(fpr=not args.no_fpr)) as client:
            client.detect_series(series)  # warm-up: first requests load lazily imported code and arenas
            before = scrape(server.metrics_url)
            for _ in range(args.repeat):
                s0, c0, t0 = tree_cpu_by_process(server.process.pid), time.process_time(), time.perf_counter()  # type: ignore[arg-type]
                res = client.detect_series(series)
                seconds, client_cpu = time.perf_counter() - t0, time.process_time() - c0
                s1 = tree_cpu_by_process(server.process.pid)  # type: ignore[arg-type]
                by = {k: round(v - s0.get(k, 0.0), 2) for k, v in s1.items()}
                result.runs.append(SeriesRun(round(seconds, 3), res.timings, res.num_slabs, len(res.lesions),
                                             round(sum(by.values()), 2), round(client_cpu, 2), by))  # fmt: skip
                log.info("series of %d slices: %.2f s", n_slices, result.runs[-1].seconds)
            result.server = diff(before, scrape_settled(server.metrics_url))
    result.detector_after = detector_sweep(onnx, x, batches, args.detector_repeat, spinning=result.detector_spinning)
    return result


def markdown(res: SeriesBenchResult) -> list[str]:
    det = res.server.model("detector") if res.server is not None else None
    sent = res.slab_size + 2 * (res.k // 2)
    best = lambda rows: max(rows, key=lambda r: r.slices_per_s)  # noqa: E731
    b0, b1 = best(res.detector_before), best(res.detector_after)
    verdict = "meets" if res.ratio >= TARGET else f"misses it by {TARGET - res.ratio:.3f}"
    lines = [
        SECTION,
        "",
        f"`{res.command}` ({res.machine.cpu_model}, {res.machine.cores} cores, {res.machine.date_utc}, load average "
        f"{res.machine.loadavg_1m:.2f} at the start; repository `{res.repository}`, detector `{Path(res.detector_onnx).name}`).",
        "",
        f"A {res.slices}-slice phantom series through `LesionClient.detect_series` (served k = {res.k}, slabs of "
        f"{res.slab_size} + {2 * (res.k // 2)} halo = {sent} slices, detector max batch {res.max_batch_size}, "
        f"{res.concurrency} slabs in flight, {'with' if res.fpr else 'without'} the FPR second pass), next to the served detector ONNX alone in-process:",
        "",
        "| | seconds per series | series per minute | slices/s |",
        "|---|---:|---:|---:|",
        f"| series through the client library (median of {len(res.runs)}) | {res.series_seconds:.1f} | "
        f"{60 / res.series_seconds:.2f} | {res.series_slices_per_s:.2f} |",
        f"| detector alone, best batch ({b0.batch} before, {b1.batch} after; onnxruntime spinning "
        f"{'on' if res.detector_spinning else 'off'}, its faster setting here) | {res.slices / res.detector_slices_per_s:.1f} | "
        f"{60 * res.detector_slices_per_s / res.slices:.2f} | {res.detector_slices_per_s:.2f} "
        f"({b0.slices_per_s:.2f} before, {b1.slices_per_s:.2f} after) |",
        "",
        f"Ratio **{res.ratio:.3f}** (goal >= {TARGET}: {verdict}).",
        "",
        f"CPU time per slice (load-independent): detector alone {1e3 * res.detector_cpu_s_per_slice:.1f} ms (spinning off, "
        f"as served), the whole "
        f"serving path {1e3 * res.serving_cpu_s_per_slice:.1f} ms (server and stubs "
        f"{1e3 * statistics.median(r.server_cpu_s for r in res.runs) / res.slices:.1f} ms + client "
        f"{1e3 * statistics.median(r.client_cpu_s for r in res.runs) / res.slices:.1f} ms): the detector gets "
        f"**{res.cpu_ratio:.3f}** of the CPU serving uses, the wall-clock ratio an otherwise idle machine approaches.",
    ]
    labels = sorted({k for r in res.runs for k in r.server_cpu_by_process})
    if labels:
        per = {k: statistics.median(r.server_cpu_by_process.get(k, 0.0) for r in res.runs) / res.slices for k in labels}
        lines += ["", "Server CPU per slice by process (median of the timed runs; a stub's CPU is its model's Python and "
                  "native work, tritonserver's is gRPC, the ensemble and the copies between steps):", "",
                  "| process | CPU ms per slice |", "|---|---:|",
                  *(f"| {k} | {1e3 * v:.1f} |" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v > 0)]  # fmt: skip
    if det is not None:
        lines += [
            "",
            f"Server view over the timed runs: detector average batch **{det.avg_batch:.1f} slices** "
            f"({det.requests_per_exec:.2f} requests per execution; one request is {sent} slices).",
            "",
            *view_markdown(res.server),  # type: ignore[arg-type]
        ]
    timings = res.runs[-1].timings if res.runs else {}
    if timings:
        lines += ["", "Client timings of the last run (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items() if isinstance(v, float))]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ctlesion_bench.series_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, default=None, help=f"default: {DEFAULT_REPOSITORY} (built if missing)")
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--series-dir", type=Path, default=None, help="this DICOM series instead of a generated phantom")
    p.add_argument("--repeat", type=int, default=2, help="timed series runs (after one warm-up run)")
    p.add_argument("--detector-repeat", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--no-fpr", action="store_true", help="first pass only (DetectOptions(fpr=False)): what the 3D false-positive reduction costs")
    p.add_argument("--out", type=Path, default=Path("work/bench/series"))
    p.add_argument("--results", type=str, default=str(RESULTS_MD), help="markdown file whose section is updated ('' = none)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    configure_logging()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args, argv)
    write_json(args.out / "series_bench.json", result)
    lines = markdown(result)
    (args.out / "series_bench.md").write_text("\n".join(lines) + "\n")
    if args.results:
        update_section(Path(args.results), SECTION, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
