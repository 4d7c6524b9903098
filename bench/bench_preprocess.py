"""Per-slice cost of the preprocess and postprocess chains on one core, stage by stage, as ratios to pydicom's parse.

    python -m ctlesion_bench.bench_preprocess [--slices 32] [--repeat 5] [--json out.json]

A synthetic 512 x 512 chest CT series (uint16 + RescaleIntercept -1024, explicit VR little endian,
what most CT scanners send) is built in memory; each stage is timed on the whole slab and divided by
the slice count (least thread CPU time of ``--repeat``). BLAS / OpenMP threads are pinned to 1
before numpy loads. The totals are printed against issue 16's targets, as ratios to pydicom's parse
of the same bytes measured in the same run (the machine's pace for touching those bytes).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from preprocess_backend.cubes import cubes_from_dicom, decode_codes, extract_cubes, hu_to_code  # noqa: E402
from preprocess_backend.letterbox import block_mean, letterbox, resample_uint8  # noqa: E402
from preprocess_backend.masks import anatomy_mask  # noqa: E402
from preprocess_backend.pipeline import (  # noqa: E402
    _lowres_hu_stored,
    decode_items,
    postprocess_findings,
    postprocess_slab,
    preprocess_slab,
)
from preprocess_backend.postprocess import batched_threshold_nms  # noqa: E402
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
    """Least CPU time of this thread over ``repeat`` runs (seconds): the cost on one core, not
    inflated by other processes sharing the cores (wall time on a shared machine is)."""
    fn()  # warm caches / lazy imports / plan caches
    times = []
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return min(times)


@dataclass
class PrePostResult:
    """ms per slice of each stage, and the two totals as ratios to pydicom's parse of the same bytes."""

    ms_per_slice: dict[str, float]
    preprocess_ms: float
    postprocess_ms: float
    parse_ms: float

    @property
    def preprocess_ratio(self) -> float:
        return self.preprocess_ms / self.parse_ms

    @property
    def postprocess_ratio(self) -> float:
        return self.postprocess_ms / self.parse_ms


def _reference_preprocess(items: list[bytes], size: int) -> np.ndarray:
    """The float path the fast one replaced (tests/test_throughput_fastpath.py checks both agree):
    float32 HU per slice, float window, 2.5D gather, block means of the HU stack, masks."""
    opts = Options(model_size=size)
    ordered = assemble_series(decode_items(items, opts)).slices
    windowed = np.stack([(window_slice(s, "lung") + np.float32(0.5)).astype(np.uint8) for s in ordered])
    images = windowed[stack_indices(len(ordered), 3)]
    anatomy_mask(block_mean(np.stack([s.hu for s in ordered]), 4))
    return images


def detector_outputs(n: int, size: int, hot: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random detector outputs: background below the 0.3 threshold, ``hot`` candidates per slice above it."""
    anchors = (size // 8) ** 2 + (size // 16) ** 2 + (size // 32) ** 2
    rng = np.random.default_rng(seed)
    scores = (rng.random((n, anchors, 1)) * 0.25).astype(np.float32)
    idx = rng.integers(0, anchors, (n, hot))
    scores[np.arange(n)[:, None], idx, 0] = rng.uniform(0.3, 1.0, (n, hot))
    xy = rng.uniform(0, size - 40, (n, anchors, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(4, 40, (n, anchors, 2)).astype(np.float32)], axis=2)
    return scores, boxes


def series_items(series_dir: Path, n: int) -> list[bytes]:
    """``n`` consecutive slices from the middle of a DICOM series, in the order the client sends them
    (by position along the normal, from headers: ``damoyolo.eval.runner.order_series``)."""
    from damoyolo.eval.runner import order_series, series_files

    files, _ = order_series(series_files(series_dir), Options())
    start = max(0, (len(files) - n) // 2)
    return [f.read_bytes() for f in files[start : start + n]]


def run(n: int, repeat: int, size: int, series_dir: Path | None = None) -> PrePostResult:
    """Every stage on ``n`` slices: the synthetic 0.7 mm chest, or with ``series_dir`` a real
    series' own matrix, pixel size and spacing (what a client really sends)."""
    items = synthetic_series(n, size) if series_dir is None else series_items(series_dir, n)
    opts = Options(model_size=size, image_dtype="uint8")  # what the preprocess model serves
    raws = [np.frombuffer(b, np.uint8) for b in items]
    deferred = decode_items(items, opts, with_hu=False)
    ordered = assemble_series(deferred).slices
    images = preprocess_slab(items, opts).images
    work = np.empty((size, size), np.float32)
    lo = _lowres_hu_stored(ordered, 4)
    assert lo is not None, "integer CT (slope 1): the stored-value low-res path applies"
    idx = stack_indices(n, 3)
    scores, boxes = detector_outputs(n, size)
    meta = preprocess_slab(items, opts).meta

    # the committed detector's scale (its checkpoint meta): what build-repo serves, so the headline
    # total; the native-grid total is what a detector trained without a scale is served
    physical = replace(opts, **served_scale())
    t_phys = preprocess_slab(items[:1], physical).meta.transform(0)
    out = np.empty((size, size), np.uint8)

    # the FPR's cube request (fpr_preprocess): one lesion every 8 slices, at the image centre
    _, geometry = decode_codes(items)
    centres = np.stack([np.asarray(geometry.pixel_to_patient(i, (geometry.columns - 1) / 2, (geometry.rows - 1) / 2)).reshape(3)
                        for i in range(0, n, 8)])  # fmt: skip

    def whole_slice_cubes() -> np.ndarray:  # what cubes_from_dicom did before it converted crops only
        series = assemble_series(decode_items(items, opts, with_hu=True))
        return extract_cubes([hu_to_code(s.hu) for s in series.slices], series.geometry, centres)

    def channels() -> None:
        for c in (0, 2):
            for i in range(n):
                images[i, c] = images[idx[i, c], 1]

    stages: dict[str, Callable[[], object]] = {
        "floor: numpy copy of the bytes": lambda: [r.copy() for r in raws],
        "parse (pydicom dcmread)": lambda: [pydicom.dcmread(io.BytesIO(b)) for b in items],
        "decode (dicom_io: parse, checks, pixels)": lambda: decode_items(items, opts, with_hu=False),
        "  float HU it no longer computes": lambda: [s.stored.astype(np.float32) - np.float32(1024) for s in ordered],
        "order (assemble_series)": lambda: assemble_series(deferred),
        "window lung -> uint8 (stored-value plan)": lambda: [
            window_slice(s, "lung", dtype=np.uint8, out=images[i, 1], work=work) for i, s in enumerate(ordered)
        ],
        "2.5D k=3 neighbour channels": channels,
        "low-res HU 1/4 (stored block sums)": lambda: _lowres_hu_stored(ordered, 4),
        "masks body + lung (1/8 grid)": lambda: anatomy_mask(lo),
        "preprocess_slab total, uint8, native grid": lambda: preprocess_slab(items, opts),
        "preprocess_slab total, float32 (training)": lambda: preprocess_slab(items, Options(model_size=size)),
        "preprocess_slab total, uint8, physical (served)": lambda: preprocess_slab(items, physical),
        f"  resample {ordered[0].pixel_spacing[0]:.3g} -> {physical.pixel_mm} mm pixels (sparse)": lambda: [resample_uint8(images[i, 1], t_phys, out) for i in range(n)],
        "  reference: the float path it replaced": lambda: _reference_preprocess(items, size),
        f"  letterbox {size}->384 (not used at {size})": lambda: letterbox(np.stack([s.modality_values() for s in ordered]), 384),
        "NMS (batched, 50 candidates / slice)": lambda: batched_threshold_nms(scores, boxes, 0.3, 0.2, 100),
        "postprocess_findings -> tensors (served)": lambda: postprocess_findings(scores, boxes, meta, opts).to_arrays(),
        "postprocess_slab -> Detection objects": lambda: postprocess_slab(scores, boxes, meta, opts),
        f"FPR cube request ({len(centres)} cubes, crops converted)": lambda: cubes_from_dicom(items, centres),
        "  reference: whole-slice HU and codes": whole_slice_cubes,
    }
    ms = {name: best(fn, repeat) / n * 1e3 for name, fn in stages.items()}
    return PrePostResult(
        ms,
        ms["preprocess_slab total, uint8, physical (served)"],
        ms["postprocess_findings -> tensors (served)"],
        ms["parse (pydicom dcmread)"],
    )


SECTION = "## Preprocess and postprocess per slice"
CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "ctlesion_damoyolo.pt"


def served_scale(checkpoint: Path = CHECKPOINT) -> dict[str, float | None]:
    """``pixel_mm`` / ``context_mm`` the committed detector records, as build-repo serves them."""
    import torch

    from ctlesion_export.cli import checkpoint_scale

    return checkpoint_scale(torch.load(str(checkpoint), map_location="cpu", weights_only=True).get("meta") or {})

PRE_TARGET_MS, PRE_TARGET_RATIO = 1.5, 4.0  # issue 16 item 1
POST_TARGET_MS, POST_TARGET_RATIO = 0.5, 1.3


def verdict(value: float, target: float) -> str:
    return "meets" if value <= target else f"MISSES by {value / target - 1:.0%}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--series-dir", type=Path, default=None,
                        help="a DICOM series (e.g. the series bench's phantom) instead of the synthetic 0.7 mm slices")
    parser.add_argument("--json", type=str, default=None, help="also write the numbers here")
    parser.add_argument("--results", type=str, default="", help="markdown file whose section this run rewrites (bench/RESULTS.md)")
    args = parser.parse_args(argv)
    result = run(args.slices, args.repeat, args.size, args.series_dir)
    lines = [
        f"per CT slice ({'synthetic 0.7 mm ' + str(args.size) + ' x ' + str(args.size) if args.series_dir is None else args.series_dir}), "
        f"CPU time of one core, best of {args.repeat}, slab of {args.slices} "
        f"({platform.processor() or platform.machine()})",
        *(f"  {name:<48s} {value:8.3f} ms" for name, value in result.ms_per_slice.items()),
        f"preprocess  {result.preprocess_ms:.3f} ms = {result.preprocess_ratio:.2f} x parse "
        f"(targets <= {PRE_TARGET_MS} ms: {verdict(result.preprocess_ms, PRE_TARGET_MS)}; "
        f"<= {PRE_TARGET_RATIO} x: {verdict(result.preprocess_ratio, PRE_TARGET_RATIO)})",
        f"postprocess {result.postprocess_ms:.3f} ms = {result.postprocess_ratio:.2f} x parse "
        f"(targets <= {POST_TARGET_MS} ms: {verdict(result.postprocess_ms, POST_TARGET_MS)}; "
        f"<= {POST_TARGET_RATIO} x: {verdict(result.postprocess_ratio, POST_TARGET_RATIO)})",
    ]
    print("\n".join(lines))
    if args.results:
        from ctlesion_bench.common import Machine, update_section

        m = Machine.here()
        cmd = "python -m ctlesion_bench.bench_preprocess " + " ".join(argv if argv is not None else sys.argv[1:])
        section = SECTION if args.series_dir is None else SECTION + ", on a served series"
        update_section(Path(args.results), section, [
            section, "", f"`{cmd}` ({m.cpu_model}, {m.date_utc}, load average {m.loadavg_1m:.2f} at the start; CPU time, "
            "so other processes' load inflates it little):", "", "```text", *lines, "```",
        ])  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "ms_per_slice": result.ms_per_slice,
                    "preprocess_ratio_to_parse": result.preprocess_ratio,
                    "postprocess_ratio_to_parse": result.postprocess_ratio,
                    "clock": "thread CPU time",
                    "numpy": np.__version__,
                    "pydicom": pydicom.__version__,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
