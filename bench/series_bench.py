"""A whole series through the client library next to the detector alone, in one run.

    python -m ctlesion_bench.series_bench [--model-repository work/model_repository/cpu] [--slices 300] \
        [--repeat 2] [--concurrency 4] [--out work/bench/series] [--results bench/RESULTS.md]

(1) the repository's own detector ONNX in-process (onnxruntime, all cores, as served), on the
    tensors preprocess makes of the first two slabs, at batch sizes up to the served batch: best
    slices/s, measured before and again after (2) so drift in machine load shows;
(2) ``LesionClient.detect_series`` on a ``--slices``-slice phantom series against the real
    tritonserver serving that repository (k and slab size from the served configs, ``--concurrency``
    slabs in flight): seconds per series, series per minute, slices/s, with the server's own view
    (detector average batch and requests per execution from Triton's metrics).
The ratio (2) / (1) is the serving efficiency a client sees; issue 16 asks >= 0.9 on CPU.
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
    from ctlesion_client import ClientOptions, LesionClient
    from ctlesion_client.server import TritonServer
    from ctlesion_client.slabs import RequestShape
    from ctlesion_export.onnx_export import inspect_onnx
    from preprocess_backend.pipeline import preprocess_slab
    from preprocess_backend.types import Options

    repo = args.model_repository or ensure_repository(DEFAULT_REPOSITORY)
    onnx = repository_detector_onnx(repo)
    series = phantom_series_dir(args.out / "data", args.slices)
    shape = RequestShape.from_repository(repo)
    slabs = client_slabs(series, repo)
    info = inspect_onnx(onnx)
    images = np.concatenate([preprocess_slab(s, Options(model_size=info.height, k=info.channels)).images for s in slabs[:2]])
    batches = sorted({b for b in (1, 8, 16, 32, shape.max_batch_size or 32) if b <= (shape.max_batch_size or 32)})
    n_slices = len(list(p for p in series.iterdir() if p.is_file()))
    result = SeriesBenchResult(
        command="python -m ctlesion_bench.series_bench " + shlex.join(argv), machine=Machine.here(), repository=str(repo),
        detector_onnx=str(onnx), slices=n_slices, slab_size=shape.slab_size(), k=shape.k or 3,
        max_batch_size=shape.max_batch_size, concurrency=args.concurrency,
    )  # fmt: skip
    result.detector_before = detector_sweep(onnx, images.astype(np.float32), batches, args.detector_repeat)
    with TritonServer(Path(repo), log_path=args.out / "tritonserver.log") as server:
        options = ClientOptions(concurrency=args.concurrency, client_timeout_s=600)
        with LesionClient(server.grpc_url, options) as client:
            client.detect_series(series)  # warm-up: first requests load lazily imported code and arenas
            before = scrape(server.metrics_url)
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                res = client.detect_series(series)
                result.runs.append(SeriesRun(round(time.perf_counter() - t0, 3), res.timings, res.num_slabs, len(res.lesions)))
                log.info("series of %d slices: %.2f s", n_slices, result.runs[-1].seconds)
            result.server = diff(before, scrape_settled(server.metrics_url))
    result.detector_after = detector_sweep(onnx, images.astype(np.float32), batches, args.detector_repeat)
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
        f"{res.concurrency} slabs in flight), next to the served detector ONNX alone in-process:",
        "",
        "| | seconds per series | series per minute | slices/s |",
        "|---|---:|---:|---:|",
        f"| series through the client library (median of {len(res.runs)}) | {res.series_seconds:.1f} | "
        f"{60 / res.series_seconds:.2f} | {res.series_slices_per_s:.2f} |",
        f"| detector alone, best batch ({b0.batch} before, {b1.batch} after) | {res.slices / res.detector_slices_per_s:.1f} | "
        f"{60 * res.detector_slices_per_s / res.slices:.2f} | {res.detector_slices_per_s:.2f} "
        f"({b0.slices_per_s:.2f} before, {b1.slices_per_s:.2f} after) |",
        "",
        f"Ratio **{res.ratio:.3f}** (goal >= {TARGET}: {verdict}).",
    ]
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


def update_results(path: Path, lines: list[str]) -> None:
    """Replace (or append) this benchmark's section of bench/RESULTS.md."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(SECTION)
    block = "\n".join(lines) + "\n"
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + block + (text[end + 1 :] if end >= 0 else "")
    path.write_text(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ctlesion_bench.series_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, default=None, help=f"default: {DEFAULT_REPOSITORY} (built if missing)")
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--repeat", type=int, default=2, help="timed series runs (after one warm-up run)")
    p.add_argument("--detector-repeat", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("work/bench/series"))
    p.add_argument("--results", type=Path, default=RESULTS_MD, help="markdown file whose section is updated ('' = none)")
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
    if str(args.results):
        update_results(args.results, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
