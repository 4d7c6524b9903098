"""The gpu-torch target on a GPU node, measured in one run: ``bench/gpu_node_check.sh`` calls this.

    python -m ctlesion_bench.gpu_node_check --out $OUT [--budget-s 420] [--series-slices 300]

Steps, each recorded (or its error) in ``gpu_node.json`` so a partial run still says what it saw:
1. the detector alone, in-process (``TorchDetector``: fp16, CUDA graphs, uint8 copied in, float32
   out, as the served model runs it): slices/s per batch bucket;
2. ``build-repo --target gpu-torch`` (pre / post instances from this node's cores, the FPR models
   as the CLI adds them) and the real tritonserver of the pytriton wheel on it;
3. a 300-slice phantom series through the client library, FPR second pass included: seconds per
   series (median of 3);
4. series throughput: concurrent clients, each sending the series again and again, slices/s;
   the detector's average batch from Triton's metrics;
5. a short locust run (``ctlesion loadtest --url``) with the server's own view;
6. the detector's executions per CUDA-graph bucket (its log line at shutdown).
Nothing here needs the network. Run on an H200 node on 2026-12-04 (bench/RESULTS.md § GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu_node_check")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Report:
    started_utc: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    command: str = ""
    environment: dict[str, Any] = field(default_factory=dict)
    detector_alone: list[dict[str, float]] = field(default_factory=list)
    detector_alone_best: dict[str, float] = field(default_factory=dict)
    repository: dict[str, Any] = field(default_factory=dict)
    series_latency: dict[str, Any] = field(default_factory=dict)
    ensemble: dict[str, Any] = field(default_factory=dict)
    locust: dict[str, Any] = field(default_factory=dict)
    batch_buckets: dict[str, int] = field(default_factory=dict)
    ratio_ensemble_to_detector: float | None = None
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class Step:
    """Times a step and records its exception instead of ending the run."""

    def __init__(self, report: Report, name: str) -> None:
        self.report, self.name = report, name

    def __enter__(self) -> Step:
        self.t0 = time.perf_counter()
        log.info("step %s", self.name)
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        self.report.seconds[self.name] = round(time.perf_counter() - self.t0, 2)
        if exc is not None:
            self.report.errors[self.name] = "".join(traceback.format_exception(exc))[-3000:]
            log.error("step %s failed: %s", self.name, exc)
        return exc is None or isinstance(exc, Exception)


def series_of(work: Path, slices: int) -> Path:
    """A phantom series of exactly ``slices`` files where the generator allows (thin slices, cropped chest)."""
    from ctlesion_bench.common import PHANTOM_SEED
    from ctlesion_phantoms import PhantomConfig, generate_case

    case_id = f"gpu_node_{slices}"
    series = work / case_id / "series"
    if not (series.is_dir() and any(series.iterdir())):
        config = PhantomConfig(slices_max=slices, slice_spacing_mm=(0.6, 0.7), max_vessel_segments=300, p_no_nodules=0.0)
        generate_case(PHANTOM_SEED, work, config, case_id=case_id)
    return series


def environment() -> dict[str, Any]:
    import numpy as np
    import torch

    env: dict[str, Any] = {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cpus": os.cpu_count()}  # fmt: skip
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def detector_alone(checkpoint: Path, buckets: tuple[int, ...], seconds_each: float, device: str = "cuda") -> list[dict[str, float]]:
    """slices/s of the served code path (copy in, graph replay, copy out) per bucket, warm."""
    import numpy as np

    from ctlesion_export.torch_serving import TorchDetector, TorchServingConfig

    det = TorchDetector(checkpoint, TorchServingConfig(device=device, buckets=buckets))
    det.warmup()
    rng = np.random.default_rng(0)
    rows = []
    for b in buckets:
        images = rng.integers(0, 256, (b, det.channels, det.size, det.size), dtype=np.uint8)
        for _ in range(5):
            det(images)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds_each:
            det(images)
            n += 1
        dt = time.perf_counter() - t0
        rows.append({"batch": b, "ms_per_batch": round(dt / n * 1000, 3), "slices_per_s": round(n * b / dt, 1)})
        log.info("detector alone: batch %d: %.0f slices/s", b, n * b / dt)
    del det
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def series_latency(url: str, series: Path, repeat: int, concurrency: int) -> dict[str, Any]:
    from ctlesion_client import LesionClient
    from ctlesion_client.options import ClientOptions

    times, result = [], None
    with LesionClient(url, ClientOptions(concurrency=concurrency)) as client:
        client.wait_ready(120)
        client.detect_series(series)  # warm-up: first requests allocate shared memory
        for _ in range(repeat):
            t0 = time.perf_counter()
            result = client.detect_series(series)
            times.append(time.perf_counter() - t0)
    assert result is not None
    return {"slices": result.num_slices, "slabs": result.num_slabs, "seconds": [round(t, 3) for t in times],
            "median_s": round(statistics.median(times), 3), "series_per_min": round(60 / statistics.median(times), 1),
            "detections": len(result.detections), "lesions": len(result.lesions), "concurrency": concurrency}  # fmt: skip


def _series_worker(url: str, series: str, stop_at: float) -> tuple[int, int]:
    """One client process sending the series again and again until ``stop_at`` (time.time())."""
    from ctlesion_client import LesionClient

    done_slices = done_series = 0
    with LesionClient(url) as client:
        while time.time() < stop_at:
            done_slices += client.detect_series(Path(series)).num_slices
            done_series += 1
    return done_slices, done_series


def ensemble_throughput(url: str, metrics_url: str, series: Path, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` client processes (as real callers are: one Python process's threads share its GIL,
    which bounded a first run at 131 slices/s), each sending the series again and again."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from ctlesion_bench.metrics import diff, scrape, scrape_settled

    before = scrape(metrics_url)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(clients, mp_context=mp.get_context("spawn")) as pool:
        stop_at = time.time() + seconds + 5.0  # the processes' start (imports) inside the window
        results = list(pool.map(_series_worker, [url] * clients, [str(series)] * clients, [stop_at] * clients))
    wall = time.perf_counter() - t0
    view = diff(before, scrape_settled(metrics_url))
    slices = sum(r[0] for r in results)
    models = {m.model: asdict(m) for m in view.models}
    det = models.get("detector", {})
    return {"clients": clients, "client_kind": "processes", "wall_s": round(wall, 2), "series": sum(r[1] for r in results),
            "slices": slices, "slices_per_s": round(slices / wall, 1), "detector_avg_batch": det.get("avg_batch"),
            "detector_requests_per_exec": det.get("requests_per_exec"), "server": models}  # fmt: skip


def run_locust(url: str, metrics_url: str, series: Path, users: int, run_time: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "ctlesion_client.cli", "loadtest", "--url", url, "--metrics-url", metrics_url,
           "--users", str(users), "--spawn-rate", str(users), "--run-time", run_time, "--series-dir", str(series),
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    summary: dict[str, Any] = {"command": " ".join(cmd[2:]), "rc": proc.returncode, "tail": proc.stdout[-1500:] + proc.stderr[-1500:]}
    if (out / "loadtest.json").is_file():
        summary["loadtest"] = json.loads((out / "loadtest.json").read_text())
    return summary


def bucket_counts(log_path: Path) -> dict[str, int]:
    """The torch detector's ``executions per batch bucket {...}`` line, written at shutdown."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    found = re.findall(r"executions per batch bucket (\{[^}]*\})", text)
    return {k: int(v) for k, v in re.findall(r"(\d+):\s*(\d+)", found[-1])} if found else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctlesion_bench.gpu_node_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/ctlesion-gpu-work"))
    p.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "models" / "ctlesion_damoyolo.pt")
    p.add_argument("--series-slices", type=int, default=300)
    p.add_argument("--detector-seconds", type=float, default=2.0, help="timed seconds per bucket, detector alone")
    p.add_argument("--clients", type=int, default=8, help="concurrent series for the throughput step")
    p.add_argument("--throughput-seconds", type=float, default=40.0)
    p.add_argument("--locust-users", type=int, default=32)
    p.add_argument("--locust-run-time", default="40s")
    p.add_argument("--fpr-onnx", type=Path, default=None,
                   help="the FPR classifier served as lesion_fpr (default: the committed one's ONNX, exported if missing)")
    p.add_argument("--no-fpr", action="store_true", help="serve the detector ensemble alone, as before the FPR")
    p.add_argument("--device", default="cuda", help="the detector-alone step's device (cpu: a dry run of this script)")
    p.add_argument("--torch-instance-kind", default="auto", choices=("auto", "gpu", "cpu"))
    p.add_argument("--detector-instances", type=int, default=None, help="torch detector instances (default: build-repo's for gpu-torch)")
    p.add_argument("--fpr-threads", type=int, default=None, help="the FPR classifier's onnxruntime threads (default: build-repo's for gpu-torch)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="slabs in flight for the series latency (default: the node's preprocess instances)")
    p.add_argument("--skip-locust", action="store_true")
    p.add_argument("--detector-max-batch", type=int, default=None, help="largest bucket timed alone (a CPU dry run: 4)")
    p.add_argument("--start-timeout", type=float, default=150.0, help="seconds for tritonserver to become ready")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report = Report(command="python -m ctlesion_bench.gpu_node_check " + " ".join(argv if argv is not None else sys.argv[1:]))
    out_json = args.out / "gpu_node.json"

    def save() -> None:
        out_json.write_text(json.dumps(asdict(report), indent=2, default=str))

    from ctlesion_export.build_repo import RepoConfig, build_repository, gpu_torch_defaults
    from ctlesion_export.torch_serving import buckets_up_to

    cores = os.cpu_count() or 1
    cfg = RepoConfig(target="gpu-torch", cores=cores, torch_instance_kind=args.torch_instance_kind,
                     **gpu_torch_defaults(cores))  # fmt: skip
    if args.detector_instances is not None:
        cfg = replace(cfg, detector_instances=args.detector_instances)
    if args.fpr_threads is not None:
        cfg = replace(cfg, fpr_intra_op_threads=args.fpr_threads)
    with Step(report, "environment"):
        report.environment = environment()
    with Step(report, "phantom_series"):
        series = series_of(args.work / "phantoms", args.series_slices)
        report.environment["series_files"] = len(list(series.glob("*.dcm")))
    with Step(report, "detector_alone"):
        report.detector_alone = detector_alone(args.checkpoint, buckets_up_to(args.detector_max_batch or cfg.max_batch_size), args.detector_seconds,
                                               args.device)
        report.detector_alone_best = max(report.detector_alone, key=lambda r: r["slices_per_s"])
    save()
    repo = args.work / "repo-gpu-torch"
    with Step(report, "build_repo"):
        from ctlesion_export.fpr_repo import default_fpr_onnx

        fpr_onnx = None if args.no_fpr else (args.fpr_onnx or default_fpr_onnx())
        build_repository(None, repo, cfg, checkpoint=args.checkpoint, fpr_onnx=fpr_onnx)
        report.repository = json.loads((repo / "BUILD.json").read_text())
    from ctlesion_client.server import TritonServer

    log_path = args.work / "tritonserver.log"
    server = TritonServer(repo, log_path=log_path)
    try:
        with Step(report, "server_start"):
            server.start(timeout_s=args.start_timeout)
        save()
        if server.process is not None and server.process.poll() is None:
            served_pre = int(report.repository.get("config", {}).get("preprocess_instances", 4))
            with Step(report, "series_latency"):
                report.series_latency = series_latency(server.grpc_url, series, repeat=3,
                                                       concurrency=args.concurrency or served_pre)
            save()
            with Step(report, "ensemble_throughput"):
                report.ensemble = ensemble_throughput(server.grpc_url, server.metrics_url, series, args.clients,
                                                      args.throughput_seconds)  # fmt: skip
                best = report.detector_alone_best.get("slices_per_s")
                if best:
                    report.ratio_ensemble_to_detector = round(report.ensemble["slices_per_s"] / best, 3)
            save()
            if not args.skip_locust:
                with Step(report, "locust"):
                    report.locust = run_locust(server.grpc_url, server.metrics_url, series, args.locust_users,
                                               args.locust_run_time, args.work / "locust")  # fmt: skip
    finally:
        server.stop()
        report.batch_buckets = bucket_counts(log_path)
        if log_path.is_file():
            shutil.copy2(log_path, args.out / "tritonserver.log")
        save()
    print(json.dumps({k: getattr(report, k) for k in ("detector_alone_best", "series_latency", "ratio_ensemble_to_detector",
                                                       "batch_buckets", "errors")}, indent=1, default=str)[:4000])  # fmt: skip
    return 0 if not report.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
