"""The three measurements of ``ctlesion bench``: detector alone, ensemble over gRPC, naive baseline."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ctlesion_bench.common import ENSEMBLE, median, percentiles
from ctlesion_bench.metrics import diff, scrape


@dataclass
class DetectorRow:
    batch: int
    ms_per_batch: float  # median of repeats
    slices_per_s: float


@dataclass
class EnsembleRow:
    concurrency: int
    slices_per_s: float  # median over repeats
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    failures: int
    requests: int
    # the server's view of this level (Triton metrics scraped before / after it), detector step
    detector_avg_batch: float | None = None  # slices per execution reached by the dynamic batcher
    detector_requests_per_exec: float | None = None  # slab requests merged into one execution
    detector_queue_ms: float | None = None
    detector_infer_ms: float | None = None


@dataclass
class NaiveResult:
    slices: int
    slices_per_s: float  # median over repeats
    ms_per_slice_p50: float
    ms_per_slice_p95: float
    torch_threads: int  # the faster of 1 and torch's default, chosen in the warm-up


# ----------------------------------------------------------------------------- (1) detector alone


def ort_session(onnx: Path, threads: int = 0, spinning: bool = True) -> object:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # 0: onnxruntime's default (all cores), as the served detector
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])


def detector_sweep(
    onnx: Path, images: np.ndarray, batches: list[int], repeat: int, warmup: int = 1, threads: int = 0, spinning: bool = True
) -> list[DetectorRow]:
    """onnxruntime in-process on preprocessed tensors; median ms per batch for each batch size."""
    sess = ort_session(onnx, threads, spinning)
    rows = []
    for b in tqdm(batches, desc="detector alone", unit="batch size"):
        x = np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])), dtype=np.float32)
        times = []
        for i in range(warmup + repeat):
            t0 = time.perf_counter()
            sess.run(None, {"images": x})  # type: ignore[attr-defined]
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        ms = median(times) * 1000.0
        rows.append(DetectorRow(b, round(ms, 2), round(b / (ms / 1000.0), 2)))
    return rows


# ----------------------------------------------------------------------------- (2) ensemble over gRPC


def _infer(client: object, slab: list[bytes]) -> None:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("dicom", [len(slab)], "BYTES")
    tensor.set_data_from_numpy(np.array(slab, dtype=object))
    client.infer(ENSEMBLE, [tensor], client_timeout=300)  # type: ignore[attr-defined]


def _one_level(
    url: str, slabs: list[list[bytes]], concurrency: int, requests: int
) -> tuple[float, list[float], int]:
    """``requests`` slabs with ``concurrency`` in flight (one thread + client each); wall s, latencies, failures."""
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(url) for _ in range(concurrency)]
    for c in clients:  # warm-up: one request per client (connections, server caches)
        _infer(c, slabs[0])
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    failures = [0]

    def worker(client: object) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                _infer(client, slabs[i % len(slabs)])
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000.0)
            except Exception:  # noqa: BLE001 - counted, reported
                with lock:
                    failures[0] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, clients))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return wall, latencies, failures[0]


def ensemble_sweep(
    url: str,
    slabs: list[list[bytes]],
    levels: list[int],
    requests_per_worker: int,
    repeat: int,
    metrics_url: str | None = None,
    detector_model: str = "detector",
) -> list[EnsembleRow]:
    rows = []
    slab_size = len(slabs[0])
    for conc in tqdm(levels, desc="ensemble gRPC", unit="level"):
        before = scrape(metrics_url) if metrics_url else {}
        rates, lat_all, fails, total = [], [], 0, 0
        for _ in range(repeat):
            n = max(conc * requests_per_worker, conc)
            wall, lat, f = _one_level(url, slabs, conc, n)
            rates.append(len(lat) / wall)
            lat_all += lat
            fails += f
            total += n
        rps = median(rates)
        p = percentiles(lat_all)
        row = EnsembleRow(
            conc,
            round(rps * slab_size, 2),
            round(rps, 3),
            p["p50"],
            p["p95"],
            p["p99"],
            p["mean"],
            fails,
            total,
        )
        det = diff(before, scrape(metrics_url)).model(detector_model) if metrics_url else None
        if det is not None and det.executions:
            row.detector_avg_batch, row.detector_requests_per_exec = det.avg_batch, det.requests_per_exec
            row.detector_queue_ms, row.detector_infer_ms = det.queue_ms, det.compute_infer_ms
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- (3) naive baseline


def pick_torch_threads(model: object, x: object) -> int:
    """Warm up and keep the faster of 1 thread and torch's default.

    On a loaded 2-core machine torch's default intra-op threads can oversubscribe the cores and run
    30x slower than one thread (seen here while a training run used both cores); a baseline slowed
    by that would inflate (2)/(3), so the naive run gets its best thread count.
    """
    import torch

    default = torch.get_num_threads()
    best, best_s = default, float("inf")
    for n in sorted({1, default}):
        torch.set_num_threads(n)
        with torch.no_grad():
            model(x)  # type: ignore[operator]
            t0 = time.perf_counter()
            model(x)  # type: ignore[operator]
            dt = time.perf_counter() - t0
        if dt < best_s:
            best, best_s = n, dt
    torch.set_num_threads(best)
    return best


def naive_run(
    checkpoint: Path, items: list[bytes], repeat: int, window: tuple[float, float] = (-600.0, 1500.0)
) -> NaiveResult:
    """The article's way: per image, pydicom read, window, PyTorch model (batch 1), NMS, one at a time.

    The 2.5D input of slice i is [i-1, i, i+1] from a rolling window of the images already read (each
    file is read once); the model is the unfused training-form checkpoint in eval mode.
    """
    import io

    import pydicom
    import torch

    from ctlesion_export.cli import load_detector
    from preprocess_backend.postprocess import threshold_nms
    from preprocess_backend.windowing import apply_window

    model, _meta = load_detector(checkpoint)
    model.eval()
    center, width = window

    def read(raw: bytes) -> np.ndarray:
        ds = pydicom.dcmread(io.BytesIO(raw))
        hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
            getattr(ds, "RescaleIntercept", 0)
        )
        return apply_window(hu, center, width)

    threads = pick_torch_threads(model, torch.zeros(1, 3, *read(items[0]).shape))
    rates, per_slice = [], []
    for _ in tqdm(range(repeat), desc="naive baseline", unit="run"):
        t_start = time.perf_counter()
        prev: np.ndarray | None = None
        cur = read(items[0])
        for i in range(len(items)):
            t0 = time.perf_counter()
            nxt = read(items[i + 1]) if i + 1 < len(items) else cur
            stack = np.stack([prev if prev is not None else cur, cur, nxt])[None]
            with torch.no_grad():
                scores, boxes = model(torch.from_numpy(np.ascontiguousarray(stack)))
            threshold_nms(scores[0].numpy(), boxes[0].numpy(), 0.3, 0.2)
            prev, cur = cur, nxt
            per_slice.append((time.perf_counter() - t0) * 1000.0)
        rates.append(len(items) / (time.perf_counter() - t_start))
    p = percentiles(per_slice)
    return NaiveResult(len(items), round(median(rates), 2), p["p50"], p["p95"], threads)
