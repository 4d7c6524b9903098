"""FP32 vs INT8 (QDQ) detector on onnxruntime CPU, side by side in one run.

    python -m ctlesion_bench.bench_int8 --fp32 detector.onnx --int8 detector_int8.onnx [--batch 1 4] [--repeat 20]
    python -m ctlesion_bench.bench_int8 --demo [--size 256]   # seeded Ns model, exported + quantized here

Repetitions are interleaved (fp32, int8, fp32, int8, ...) so drift in machine load hits both
equally; after warm-up the median latency per batch is reported with the int8 / fp32 speed ratio.
Inputs are preprocessed phantom slices when --dicom-dir is given, else seeded random 0..255 images
(latency does not depend on content for this model). Threads: --threads (default 1: per-instance
cost as served with one Triton instance per core).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class BenchRow:
    batch: int
    fp32_ms: float
    int8_ms: float
    speedup: float  # fp32 / int8
    fp32_ms_per_slice: float
    int8_ms_per_slice: float


def _session(path: Path, threads: int) -> object:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bench(
    fp32: Path, int8: Path, images: np.ndarray, batches: list[int], repeat: int, warmup: int, threads: int
) -> list[BenchRow]:
    sessions = {"fp32": _session(fp32, threads), "int8": _session(int8, threads)}
    rows = []
    for b in batches:
        x = np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])), dtype=np.float32)
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        for i in range(warmup + repeat):
            for name, sess in sessions.items():  # interleaved
                t = time.perf_counter()
                sess.run(None, {"images": x})  # type: ignore[attr-defined]
                if i >= warmup:
                    times[name].append((time.perf_counter() - t) * 1000)
        f, q = statistics.median(times["fp32"]), statistics.median(times["int8"])
        rows.append(BenchRow(b, round(f, 2), round(q, 2), round(f / q, 2), round(f / b, 2), round(q / b, 2)))
    return rows


def _demo_models(size: int, out: Path) -> tuple[Path, Path, np.ndarray]:
    from ctlesion_export.calibration import find_series_dirs, load_images
    from ctlesion_export.demo_model import seeded_detector
    from ctlesion_export.onnx_export import export_onnx
    from ctlesion_export.quantize import QuantizeConfig, quantize_int8
    from ctlesion_phantoms import PhantomConfig, generate_dataset
    from preprocess_backend.types import Options

    generate_dataset(
        out / "phantoms", 2, 0, PhantomConfig(matrix=size, slices_max=12, max_vessel_segments=300)
    )
    dirs = find_series_dirs(out / "phantoms")
    images = load_images(dirs, Options(model_size=size), 4)
    fp32 = export_onnx(seeded_detector(sample=images[:4], size=size), out / "fp32.onnx", size=size)

    class Reader:  # the calibration images are already in memory here
        def __init__(self) -> None:
            self.it = iter([{"images": images[i : i + 4]} for i in range(0, len(images), 4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    int8 = quantize_int8(fp32, out / "int8.onnx", Reader(), QuantizeConfig(method="minmax")).path
    return fp32, int8, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ctlesion_bench.bench_int8", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--fp32", type=Path)
    p.add_argument("--int8", type=Path)
    p.add_argument("--demo", action="store_true", help="export + quantize a seeded Ns model first")
    p.add_argument("--size", type=int, default=256, help="--demo input size")
    p.add_argument("--dicom-dir", type=Path, help="DICOM series for the inputs (else seeded random images)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)

    from ctlesion_export.onnx_export import inspect_onnx

    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        if args.demo:
            fp32, int8, images = _demo_models(args.size, Path(tmp))
        elif args.fp32 and args.int8:
            fp32, int8 = args.fp32, args.int8
            info = inspect_onnx(fp32)
            if args.dicom_dir:
                from ctlesion_export.calibration import find_series_dirs, load_images
                from preprocess_backend.types import Options

                images = load_images(
                    find_series_dirs(args.dicom_dir), Options(model_size=info.height, k=info.channels), 4
                )
            else:
                images = (
                    np.random.default_rng(0)
                    .integers(0, 256, (4, info.channels, info.height, info.width))
                    .astype(np.float32)
                )
        else:
            p.error("give --fp32 and --int8, or --demo")
        rows = bench(fp32, int8, images, args.batch, args.repeat, args.warmup, args.threads)
    import onnxruntime as ort

    print(
        f"onnxruntime {ort.__version__} CPU, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"input {list(images.shape[1:])}, median of {args.repeat} interleaved runs"
    )
    print(
        f"{'batch':>5} {'fp32 ms':>9} {'int8 ms':>9} {'fp32/int8':>9} {'fp32 ms/sl':>10} {'int8 ms/sl':>10}"
    )
    for r in rows:
        print(
            f"{r.batch:>5} {r.fp32_ms:>9.2f} {r.int8_ms:>9.2f} {r.speedup:>9.2f} {r.fp32_ms_per_slice:>10.2f} {r.int8_ms_per_slice:>10.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
