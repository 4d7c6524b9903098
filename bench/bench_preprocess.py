"""Per-slice cost of the preprocess chain on one core, stage by stage, next to a bare numpy copy.

    python -m ctlesion_bench.bench_preprocess [--slices 32] [--repeat 5] [--json out.json]

A synthetic 512 x 512 chest CT series (uint16 + RescaleIntercept -1024, explicit VR little endian,
what most CT scanners send) is built in memory; each stage is timed on the whole slab and divided by
the slice count (best of ``--repeat``). BLAS / OpenMP threads are pinned to 1 before numpy loads.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from preprocess_backend.dicom_io import decode_frames  # noqa: E402
from preprocess_backend.letterbox import block_mean, letterbox  # noqa: E402
from preprocess_backend.masks import anatomy_mask  # noqa: E402
from preprocess_backend.pipeline import postprocess_slab, preprocess_slab  # noqa: E402
from preprocess_backend.series import assemble_series  # noqa: E402
from preprocess_backend.stacking import stack_indices  # noqa: E402
from preprocess_backend.types import Options  # noqa: E402
from preprocess_backend.windowing import window_slice  # noqa: E402


def synthetic_series(n: int, size: int = 512, seed: int = 0) -> list[bytes]:
    """Chest-like 512 x 512 slices: body, two lungs, noise; Part-10 bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c = size / 2
    base = np.full((size, size), -1000.0, np.float32)
    base[((yy - c) / (0.38 * size)) ** 2 + ((xx - c) / (0.45 * size)) ** 2 <= 1] = 40.0
    for side in (-1, 1):
        base[
            ((yy - c) / (0.25 * size)) ** 2 + ((xx - c - side * 0.2 * size) / (0.14 * size)) ** 2 <= 1
        ] = -850.0
    series_uid = generate_uid()
    items = []
    for i in range(n):
        hu = base + rng.normal(0, 20, base.shape).astype(np.float32)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            generate_uid(),
            series_uid,
            generate_uid(),
        )
        ds.Modality, ds.InstanceNumber = "CT", i + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.ImagePositionPatient = [-179.2, -179.2, -100 + 1.25 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.25
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16).tobytes()
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        items.append(buf.getvalue())
    return items


def best(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm caches / lazy imports
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(n: int, repeat: int, size: int) -> dict[str, float]:
    items = synthetic_series(n, size)
    opts = Options(model_size=size)
    slices = [f for item in items for f in decode_frames(item)]
    ordered = assemble_series(slices).slices
    hu = np.stack([s.hu for s in ordered])
    windowed = np.stack([window_slice(s, "lung", dtype=np.uint8) for s in ordered])
    idx = stack_indices(n, 3)
    lo = block_mean(hu, 4)
    raws = [np.frombuffer(ds_bytes, np.uint8) for ds_bytes in items]

    def stack(dtype: type) -> np.ndarray:
        out = np.empty((n, 3, size, size), dtype)
        for ch in range(3):
            out[:, ch] = windowed[idx[:, ch]]
        return out

    anchors = (size // 8) ** 2 + (size // 16) ** 2 + (size // 32) ** 2
    rng = np.random.default_rng(0)
    scores = (rng.random((n, anchors, 1)) * 0.25).astype(np.float32)  # background below threshold
    hot = rng.integers(0, anchors, (n, 50))  # 50 candidates per slice above the 0.3 threshold
    scores[np.arange(n)[:, None], hot, 0] = rng.uniform(0.3, 1.0, (n, 50))
    xy = rng.uniform(0, size - 40, (n, anchors, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(4, 40, (n, anchors, 2)).astype(np.float32)], axis=2)
    meta = preprocess_slab(items, opts).meta

    stages: dict[str, Callable[[], object]] = {
        "floor: numpy copy of the bytes": lambda: [r.copy() for r in raws],
        "parse (pydicom dcmread)": lambda: [pydicom.dcmread(io.BytesIO(b)) for b in items],
        "decode total (parse + pixels + HU)": lambda: [decode_frames(b) for b in items],
        "  of which HU (float32 mul/add)": lambda: [
            s.hu * np.float32(1.0) + np.float32(-1024.0) for s in ordered
        ],
        "order (assemble_series)": lambda: assemble_series(slices),
        "window (lung, uint8)": lambda: [window_slice(s, "lung", dtype=np.uint8) for s in ordered],
        "stack 2.5D k=3 -> uint8": lambda: stack(np.uint8),
        "stack 2.5D k=3 -> float32": lambda: stack(np.float32),
        f"resize / letterbox {size}->{size} (identity)": lambda: None,
        f"  letterbox {size}->384 (not used at 512)": lambda: letterbox(hu, 384),
        "low-res HU 1/4 (block mean)": lambda: block_mean(hu, 4),
        "masks body + lung (1/8 grid)": lambda: anatomy_mask(lo),
        "preprocess_slab total, float32": lambda: preprocess_slab(items, opts),
        "preprocess_slab total, uint8": lambda: preprocess_slab(
            items, Options(model_size=size, image_dtype="uint8")
        ),
        "postprocess_slab (NMS, filters)": lambda: postprocess_slab(scores, boxes, meta, opts),
    }
    return {name: best(fn, repeat) / n * 1e3 for name, fn in stages.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", type=str, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    results = run(args.slices, args.repeat, args.size)
    print(
        f"per {args.size}x{args.size} CT slice, one core, best of {args.repeat}, slab of {args.slices} ({platform.processor() or platform.machine()})"
    )
    for name, ms in results.items():
        print(f"  {name:<46s} {ms:8.3f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "args": vars(args),
                    "ms_per_slice": results,
                    "numpy": np.__version__,
                    "pydicom": pydicom.__version__,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
