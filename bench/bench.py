"""``ctlesion bench``: one run, side by side, on this machine.

    ctlesion bench --checkpoint models/ctlesion_damoyolo.pt --out work/bench

(1) the detector alone in-process (onnxruntime, batch sweep, best batch) on preprocessed tensors,
(2) the full Triton ensemble through gRPC at a concurrency sweep (in-flight slabs), with the FP32
    detector and again with the INT8 (QDQ) detector served from a second CPU repository,
(3) the naive baseline as the article does it (per image: pydicom, window, PyTorch, NMS, one at a time),
plus FP32 vs INT8 of the detector (``bench_int8``) and the server's RSS at the end. Every figure is
the median of ``--repeat`` runs. Writes bench.json (after each step, so a crash keeps what was
measured), bench.md, latency.png, throughput.png to --out, and updates bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctlesion_bench.common import (
    DEFAULT_CHECKPOINT,
    REPO_ROOT,
    Artifacts,
    Machine,
    build_cpu_repository,
    client_slabs,
    configure_logging,
    phantom_series_dir,
    read_series,
    repository_detector_onnx,
    write_json,
)
from ctlesion_bench.measure import (
    DetectorRow,
    EnsembleRow,
    NaiveResult,
    detector_sweep,
    ensemble_sweep,
    naive_run,
)
from ctlesion_bench.metrics import ServerView, diff, scrape

log = logging.getLogger(__name__)
RESULTS_MD = REPO_ROOT / "bench" / "RESULTS.md"
SERVING_TARGET = 0.85  # (2) / (1) in slices/s
SPEEDUP_TARGET = 5.0  # (2) / (3)


@dataclass
class Ratios:
    serving_over_detector: float | None = None  # (2) best / (1) best
    serving_over_naive: float | None = None  # (2) best / (3)
    int8_serving_over_naive: float | None = None  # (2) with the INT8 detector, best / (3)
    serving_target: float = SERVING_TARGET
    speedup_target: float = SPEEDUP_TARGET


@dataclass
class BenchResult:
    command: str
    machine: Machine
    settings: dict[str, object]
    detector: list[DetectorRow] = field(default_factory=list)
    int8: list[dict[str, float]] = field(default_factory=list)
    naive: NaiveResult | None = None
    ensemble: list[EnsembleRow] = field(default_factory=list)
    ensemble_int8: list[EnsembleRow] = field(default_factory=list)  # same sweep, INT8 detector repository
    server_view: ServerView | None = None
    server_rss_end_bytes: int | None = None
    ratios: Ratios = field(default_factory=Ratios)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def best_detector(self) -> DetectorRow | None:
        return max(self.detector, key=lambda r: r.slices_per_s, default=None)

    def best_ensemble(self) -> EnsembleRow | None:
        return max(self.ensemble, key=lambda r: r.slices_per_s, default=None)

    def best_ensemble_int8(self) -> EnsembleRow | None:
        return max(self.ensemble_int8, key=lambda r: r.slices_per_s, default=None)


def compute_ratios(res: BenchResult) -> Ratios:
    det, ens = res.best_detector(), res.best_ensemble()
    r = Ratios()
    if det and ens and det.slices_per_s:
        r.serving_over_detector = round(ens.slices_per_s / det.slices_per_s, 3)
    if ens and res.naive and res.naive.slices_per_s:
        r.serving_over_naive = round(ens.slices_per_s / res.naive.slices_per_s, 2)
    ens8 = res.best_ensemble_int8()
    if ens8 and res.naive and res.naive.slices_per_s:
        r.int8_serving_over_naive = round(ens8.slices_per_s / res.naive.slices_per_s, 2)
    return r


def int8_compare(
    fp32: Path, images: np.ndarray, out: Path, batches: list[int], repeat: int
) -> tuple[Path, list[dict[str, float]]]:
    """Quantize (min-max, on these preprocessed phantom slices) and reuse bench_int8's interleaved timing.

    Returns the INT8 model (served in the second ensemble sweep) and the timing rows."""
    from dataclasses import asdict

    from ctlesion_bench.bench_int8 import bench as bench_int8
    from ctlesion_export.quantize import QuantizeConfig, quantize_int8

    class Reader:
        def __init__(self) -> None:
            self.it = iter([{"images": images[i : i + 4]} for i in range(0, len(images), 4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    int8 = quantize_int8(fp32, out / "detector_int8.onnx", Reader(), QuantizeConfig(method="minmax")).path
    rows = bench_int8(fp32, int8, images, batches, repeat, warmup=1, threads=0)
    return int8, [asdict(r) for r in rows]


def int8_ensemble(args: argparse.Namespace, int8_onnx: Path, slabs: list[list[bytes]], out: Path) -> list[EnsembleRow]:
    """The same concurrency sweep against a CPU repository whose detector serves the INT8 model."""
    from ctlesion_client.server import TritonServer
    from ctlesion_export.build_repo import RepoConfig, build_repository

    repo = build_repository(int8_onnx, out / "artifacts" / "repository" / "cpu-int8",
                            RepoConfig(target="cpu", max_batch_size=args.max_batch_size))  # fmt: skip
    with TritonServer(repo, log_path=out / "tritonserver-int8.log") as server:
        return ensemble_sweep(server.grpc_url, slabs, args.concurrency, args.requests_per_worker,
                              args.repeat, server.metrics_url)  # fmt: skip


def run(args: argparse.Namespace, result: BenchResult) -> BenchResult:
    from ctlesion_client.server import TritonServer
    from ctlesion_export.onnx_export import inspect_onnx
    from preprocess_backend.pipeline import preprocess_slab
    from preprocess_backend.types import Options

    out: Path = args.out
    save = lambda: write_json(out / "bench.json", result)  # noqa: E731
    save()
    if args.model_repository:  # serve this repository; (1) runs the very ONNX its detector serves
        repo = args.model_repository
        art = Artifacts(args.onnx or repository_detector_onnx(repo), repo, args.checkpoint)
    else:
        art = build_cpu_repository(
            args.checkpoint, out / "artifacts", max_batch_size=args.max_batch_size, onnx=args.onnx
        )
    series_dir = args.series_dir or phantom_series_dir(out / "data", args.slices)
    items = read_series(series_dir)
    slabs = client_slabs(series_dir, art.repository, args.slab_size)  # the requests the client library sends
    info = inspect_onnx(art.onnx)
    opts = Options(model_size=info.height, k=info.channels)
    images = np.concatenate([preprocess_slab(s, opts).images for s in slabs[:2]]).astype(np.float32)
    result.settings.update(onnx=str(art.onnx), repository=str(art.repository), series_slices=len(items),
                           slabs=len(slabs), input=list(images.shape[1:]))  # fmt: skip

    result.detector = detector_sweep(art.onnx, images, args.batches, args.repeat)
    save()
    int8_onnx: Path | None = None
    if not args.skip_int8:
        int8_onnx, result.int8 = int8_compare(
            art.onnx, images, out / "artifacts", args.int8_batches, max(args.repeat, 3)
        )
        save()
    if not args.skip_naive:
        naive_items = items[: args.naive_slices] if args.naive_slices else items
        result.naive = naive_run(args.checkpoint, naive_items, args.repeat)
        save()
    server = TritonServer(art.repository, log_path=out / "tritonserver.log")
    with server:
        before = scrape(server.metrics_url)
        result.ensemble = ensemble_sweep(
            server.grpc_url,
            slabs,
            args.concurrency,
            args.requests_per_worker,
            args.repeat,
            server.metrics_url,
        )
        result.server_view = diff(before, scrape(server.metrics_url))
        result.server_rss_end_bytes = server.rss_bytes()
    save()
    if int8_onnx is not None and not args.skip_int8_ensemble:
        result.ensemble_int8 = int8_ensemble(args, int8_onnx, slabs, out)
    result.ratios = compute_ratios(result)
    save()
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctlesion bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--onnx", type=Path, help="use this exported detector instead of exporting --checkpoint")
    p.add_argument(
        "--model-repository",
        type=Path,
        help="serve this built repository for (2) (default: build a CPU one from --checkpoint / --onnx); "
        "--checkpoint is still read by the naive baseline (3)",
    )
    p.add_argument("--out", type=Path, default=REPO_ROOT / "work" / "bench")
    p.add_argument("--series-dir", type=Path, help="DICOM series to use (default: a generated phantom)")
    p.add_argument("--slices", type=int, default=64, help="phantom series length")
    p.add_argument("--slab-size", type=int, default=None,
                   help="owned slices per request (default: the client library's, from the repository's k and batch)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--int8-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument(
        "--requests-per-worker", type=int, default=4, help="slab requests per in-flight slot per repeat"
    )
    p.add_argument("--repeat", type=int, default=3, help="repeats; every figure is their median")
    p.add_argument(
        "--naive-slices", type=int, default=0, help="slices for the naive baseline (0: the whole series)"
    )
    p.add_argument("--max-batch-size", type=int, default=64, help="detector max_batch_size in the repository (build-repo's default)")
    p.add_argument("--skip-int8", action="store_true")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--skip-int8-ensemble", action="store_true",
                   help="do not serve the INT8 detector for a second ensemble sweep")  # fmt: skip
    p.add_argument("--results-md", default=str(RESULTS_MD), help="results file to update ('' to skip)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: run the GPU section instead (ctlesion_bench.gpu_sweep)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.device == "cuda":
        from ctlesion_bench.gpu_sweep import main as gpu_main

        return gpu_main(["--checkpoint", str(args.checkpoint), "--out", str(args.out)])
    from ctlesion_bench.report import markdown, print_summary, render_plots, update_results_md

    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = BenchResult(
        command="ctlesion bench " + shlex.join(argv), machine=Machine.here(), settings=settings
    )
    t0 = time.perf_counter()
    from ctlesion_client.server import sigterm_as_interrupt

    sigterm_as_interrupt()  # a killed bench stops the servers it started (their `with` blocks)
    try:
        run(args, result)
    except KeyboardInterrupt:
        print(f"bench interrupted; what was measured is in {args.out / 'bench.json'}", file=sys.stderr)
        return 130
    finally:
        result.seconds = round(time.perf_counter() - t0, 1)
        write_json(args.out / "bench.json", result)
    result.plots = render_plots(result, args.out)
    write_json(args.out / "bench.json", result)
    (args.out / "bench.md").write_text(markdown(result))
    if args.results_md:
        update_results_md(Path(args.results_md), result)
    print_summary(result)
    failures = sum(r.failures for r in result.ensemble)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
