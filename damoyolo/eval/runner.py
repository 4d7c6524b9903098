"""Run the SERVING pipeline on one case, exactly as the client and the Triton ensemble do it.

``run_detector_on_case`` orders the series from headers with ``preprocess_backend.series``
(``assemble_headers``: the client's ordering), cuts slabs with ``preprocess_backend.slabs.plan_slabs``
(the client's planner), and sends each slab through ``preprocess_slab`` -> detector ->
``postprocess_slab``; detections on halo slices are dropped and the kept ones are linked into
lesions with ``link_lesions``. Predictors wrap a checkpoint (torch) or an ONNX file (onnxruntime).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from preprocess_backend.contract import ModelContract
from preprocess_backend.dicom_io import read_header
from preprocess_backend.errors import DicomInputError
from preprocess_backend.lesions import link_lesions
from preprocess_backend.pipeline import postprocess_slab, preprocess_slab
from preprocess_backend.series import SeriesGeometry, assemble_headers
from preprocess_backend.slabs import context_halo, plan_slabs
from preprocess_backend.types import Detection, Lesion, Options

DEFAULT_CONTRACT = ModelContract()
EVAL_SCORE_THRESHOLD = 0.05  # low, so the FROC curve reaches far enough to the right

PredictFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def eval_options(**overrides: Any) -> Options:
    """Serving options with a low score threshold (FROC needs the low-confidence tail) and float32 images."""
    return replace(Options(score_threshold=EVAL_SCORE_THRESHOLD, image_dtype="float32"), **overrides)


def add_scale_arguments(parser: Any) -> None:
    """``--pixel-mm`` / ``--context-mm`` (``Options.pixel_mm`` / ``context_mm``): a length in mm,
    "none", or by default "model": the scale the detector was trained at (``ModelInfo``)."""
    from ctlesion_export.build_repo import MODEL_SCALE, scale_arg

    parser.add_argument("--pixel-mm", type=scale_arg, default=MODEL_SCALE,
                        help="model pixel size in mm, 'none' to letterbox the matrix (default: the detector's training scale)")
    parser.add_argument("--context-mm", type=scale_arg, default=MODEL_SCALE,
                        help="2.5D channel offset in mm, 'none' for neighbouring slices (default: the detector's training scale)")


def scale_overrides(args: Any, info: ModelInfo) -> dict[str, float | None]:
    """The scale to preprocess at: the command line's, else the model's own."""
    model = {"pixel_mm": info.pixel_mm, "context_mm": info.context_mm}
    return {k: model[k] if getattr(args, k) == "model" else getattr(args, k) for k in model}


def _is_part10(path: Path) -> bool:
    """DICOM Part-10 by its preamble ("DICM" at byte 128): real archives name files anything (CT.1.2.3...)."""
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def series_files(case_dir: Path) -> list[Path]:
    d = Path(case_dir)
    d = d / "series" if (d / "series").is_dir() else d
    files = sorted(p for p in d.iterdir() if p.is_file() and (p.suffix.lower() in (".dcm", "") or _is_part10(p)))
    if not files:
        raise FileNotFoundError(f"no DICOM files in {d}")
    return files


def order_series(files: Sequence[Path], options: Options) -> tuple[list[Path], SeriesGeometry]:
    """Order by position along the normal from headers only, as the client does, and build the geometry."""
    headers = [read_header(p, p.name, options.limits) for p in files]
    series = {h.series_instance_uid for h in headers}
    if len(series) != 1:
        raise DicomInputError(str(files[0].parent), f"{len(series)} series in one case folder")
    assembled = assemble_headers(headers)
    if not assembled.has_geometry:
        raise DicomInputError(headers[0].source, "no geometry: cannot order the series or place lesions in mm")
    return [files[s.extra["item"]] for s in assembled.slices], assembled.geometry


def run_detector_on_case(
    predict_fn: PredictFn,
    case_dir: Path,
    options: Options | None = None,
    slab_size: int = 16,
    halo: int | None = None,
    batch_size: int = 8,
    contract: ModelContract | None = DEFAULT_CONTRACT,
) -> tuple[list[Detection], list[Lesion]]:
    """Run the serving pipeline on one case's DICOM series; detections carry series slice indices.

    The series is cut into slabs of ``slab_size`` owned slices plus ``halo`` context slices at each end
    (so every owned slice's 2.5D stack sees its real neighbours; None: ``context_halo`` of the options); each slab goes through
    ``preprocess_slab`` -> ``predict_fn`` -> ``postprocess_slab`` and detections on halo slices are
    dropped (the slab owning the slice reports them). The kept detections are linked into lesions
    with the whole series' geometry. ``contract`` is the served model's input contract (the default
    deployment's): a series the server would refuse is refused here with the same reason.
    """
    options = options or eval_options()
    files, geometry = order_series(series_files(case_dir), options)
    if halo is None:  # what the client sends: k // 2 slices, or enough to reach the mm offsets
        halo = context_halo(options.k, options.context_mm, geometry.slice_spacing if len(files) > 1 else None)
    if slab_size < 1 or halo < 0:
        raise ValueError("slab_size must be >= 1 and halo >= 0")
    detections: list[Detection] = []
    for plan in plan_slabs(len(files), slab_size, halo):
        lo, hi = plan.send_start, plan.send_stop
        slab = preprocess_slab([files[i].read_bytes() for i in range(lo, hi)], options, contract=contract)
        got = [slab.meta.uid(i) for i in range(len(slab.meta))]
        if got != geometry.sop_instance_uids[lo:hi]:  # the server orders the same way; anything else is a bug
            raise DicomInputError(str(case_dir), f"slab {lo}:{hi} came back in another slice order")
        parts = [predict_fn(np.ascontiguousarray(slab.images[i : i + batch_size])) for i in range(0, len(slab.images), batch_size)]
        scores = np.concatenate([np.asarray(p[0], np.float32) for p in parts])
        boxes = np.concatenate([np.asarray(p[1], np.float32) for p in parts])
        for d in postprocess_slab(scores, boxes, slab.meta, options):
            k = lo + d.slice_index
            if plan.owns(k):  # halo slices belong to the neighbouring slab
                detections.append(replace(d, slice_index=k))
    lesions = link_lesions(detections, geometry, link_iou=options.link_iou, max_gap=options.link_max_gap)
    return detections, lesions


@dataclass
class ModelInfo:
    """What the evaluation needs to know about the model it runs."""

    source: str
    backend: str  # "torch" | "onnxruntime"
    model_size: int
    in_channels: int
    window: str = "lung"
    meta: dict[str, Any] = field(default_factory=dict)
    pixel_mm: float | None = None  # the training scale (checkpoint meta / ONNX metadata); None: native
    context_mm: float | None = None

    def options(self, **overrides: Any) -> Options:
        """``eval_options`` for this model: its size, k, window and training scale."""
        base = {"window": self.window, "model_size": self.model_size, "k": self.in_channels,
                "pixel_mm": self.pixel_mm, "context_mm": self.context_mm}  # fmt: skip
        return eval_options(**{**base, **overrides})


def torch_predictor(checkpoint: Path, device: str = "cpu", variant: str | None = None) -> tuple[PredictFn, ModelInfo]:
    """Checkpoint -> fused eval-mode model; ``predict_fn(images) -> (scores, boxes)`` numpy."""
    import torch

    from ctlesion_export.cli import load_detector

    model, meta = load_detector(Path(checkpoint), variant)
    model.fuse()  # serve what is deployed: RepConv branches folded
    model.eval().to(device)

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            scores, boxes = model(torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device))
        return scores.float().cpu().numpy(), boxes.float().cpu().numpy()

    info = ModelInfo(
        source=str(checkpoint),
        backend="torch",
        model_size=int(meta.get("model_size", 512)),
        in_channels=int(meta.get("in_channels", 3)),
        window=str(meta.get("window") or "lung"),
        meta={k: v for k, v in meta.items() if isinstance(v, str | int | float | bool | list | dict)},
        pixel_mm=meta.get("pixel_mm"),
        context_mm=meta.get("context_mm"),
    )
    return predict, info


def onnx_predictor(path: Path, threads: int = 0, window: str = "lung") -> tuple[PredictFn, ModelInfo]:
    """ONNX detector (fp32 or INT8 QDQ) in onnxruntime on the CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = inp.shape
    size = int(shape[2]) if isinstance(shape[2], int) else 512
    channels = int(shape[1]) if isinstance(shape[1], int) else 3

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, boxes = sess.run(["scores", "boxes"], {inp.name: np.ascontiguousarray(images, np.float32)})
        return scores, boxes

    from ctlesion_export.onnx_export import read_scale_metadata

    scale = read_scale_metadata(dict(sess.get_modelmeta().custom_metadata_map))
    return predict, ModelInfo(source=str(path), backend="onnxruntime", model_size=size, in_channels=channels, window=window, **scale)
