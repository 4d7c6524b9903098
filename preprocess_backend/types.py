"""Dataclasses shared by every part: request options, limits, detections, lesions.

All of them round-trip through JSON with ``to_dict()`` / ``from_dict()`` (NaN becomes ``None``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


def _clean(value: Any) -> Any:
    """JSON-friendly: tuples -> lists, numpy scalars -> Python, NaN -> None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def mm_or_none(text: str) -> float | None:
    """A length in mm from a command line or a Triton parameter; "none" / "off" / "" turn it off."""
    return None if str(text).strip().lower() in ("none", "off", "") else float(text)


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Limits:
    """Refusal thresholds, checked on headers before any pixel data is decoded."""

    max_request_bytes: int = 512 * 1024 * 1024
    max_slices: int = 2048
    max_pixels_per_slice: int = 8192 * 8192
    max_frames: int = 2048
    max_decoded_bytes: int = 1024 * 1024 * 1024  # rows * cols * frames * samples * bits / 8, per item

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limits:
        return _from_dict(cls, data)


@dataclass
class Options:
    """Request options; defaults are the article's (score 0.3, NMS IoU 0.2, 2.5D k = 3)."""

    window: str = "lung"  # a WINDOW_PRESETS name, "file" (the file's own window) or "center,width"
    window_function: str | None = None  # None: the file's VOILUTFunction for "file", else LINEAR
    score_threshold: float = 0.3
    nms_iou: float = 0.2
    class_aware_nms: bool = True
    max_detections: int = 100  # per slice
    # Per-slice box bounds: only absurd boxes go here. The 3-30 mm nodule rule (and > 30 mm masses)
    # applies to linked 3D lesions (preprocess_backend.lesion_filters): a per-slice 30 mm cut would
    # drop the middle slices of a 31 mm nodule and split it in two.
    min_size_mm: float = 1.5
    max_size_mm: float = 100.0
    model_size: int = 512
    k: int = 3  # 2.5D context slices (1, 3 or 5)
    # Physical scale (issue 15 item 4). pixel_mm: resample every slice to this pixel size, centred
    # (None: letterbox the matrix to model_size). context_mm: the 2.5D channels are planes this far
    # apart along the slice normal, interpolated between slices (None: the neighbouring slices).
    pixel_mm: float | None = None
    context_mm: float | None = None
    image_dtype: str = "float32"  # "float32" or "uint8" (rounded; 1/4 of the bytes across Triton shm)
    lowres_factor: int = 4  # HU / mask grid = model_size / lowres_factor, in letterboxed model space
    anatomy: str = "lung"  # default anatomical filter: "lung" | "body" | "none" (CT only)
    class_anatomy: dict[int, str] = field(default_factory=dict)  # per-class override of ``anatomy``
    anatomy_min_overlap: float = 0.1  # a box also passes when the mask covers this fraction of it (0: centre only)
    group_series: bool = False  # True: a request may mix series (the first series is used)
    link_iou: float = 0.1  # 3D linking: min IoU of boxes on adjacent slices
    link_max_gap: int = 1  # 3D linking: largest slice-index step within a lesion (1 = adjacent only, 2 = may skip one)
    limits: Limits = field(default_factory=Limits)

    def anatomy_for(self, class_id: int) -> str:
        return self.class_anatomy.get(int(class_id), self.anatomy)

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Options:
        opts = _from_dict(cls, data)
        if isinstance(opts.limits, dict):
            opts.limits = Limits.from_dict(opts.limits)
        opts.class_anatomy = {int(k): str(v) for k, v in (opts.class_anatomy or {}).items()}
        return opts


@dataclass
class Detection:
    """One box on one slice, in original pixels and in millimetres."""

    slice_index: int  # index in the slab (or series) after ordering by position
    sop_instance_uid: str
    box_px: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels
    box_mm: tuple[float, float, float, float]  # same box in in-plane mm (x = column * col spacing)
    score: float
    class_id: int = 0
    mean_hu: float = math.nan  # over the box's central half (NaN if unknown)
    diameter_mm: float = math.nan  # max(width, height) in mm
    centre_mm: tuple[float, float, float] | None = None  # patient LPS, when geometry is known
    frame_index: int = 0  # for multi-frame (Enhanced CT) items

    @property
    def width_mm(self) -> float:
        return float(self.box_mm[2] - self.box_mm[0])

    @property
    def height_mm(self) -> float:
        return float(self.box_mm[3] - self.box_mm[1])

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Detection:
        det = _from_dict(cls, data)
        det.box_px = tuple(float(v) for v in det.box_px)  # type: ignore[assignment]
        det.box_mm = tuple(float(v) for v in det.box_mm)  # type: ignore[assignment]
        det.centre_mm = None if det.centre_mm is None else tuple(float(v) for v in det.centre_mm)  # type: ignore[assignment]
        det.mean_hu = math.nan if det.mean_hu is None else float(det.mean_hu)
        det.diameter_mm = math.nan if det.diameter_mm is None else float(det.diameter_mm)
        return det


@dataclass
class Lesion:
    """Per-slice detections joined across adjacent slices into one 3D finding."""

    lesion_id: int
    class_id: int
    centre_mm: tuple[float, float, float]  # patient LPS
    diameter_mm: float  # largest in-plane extent over its slices
    z_extent_mm: float  # along the slice normal, including one slice thickness
    slices: list[int]  # slice indices, ascending
    sop_instance_uids: list[str]
    max_score: float
    mean_score: float
    mean_hu: float  # NaN if unknown
    characteristic: str | None  # "solid" | "part-solid" | "ground-glass" | None (unknown HU)
    side: str | None  # "left" | "right" (patient side: LPS +x is patient left)
    lobe: str | None  # "upper" | "middle" | "lower": a guess from the position in the series
    num_detections: int = 1
    # With 3D false-positive reduction, ``max_score`` is the final confidence (``preprocess_backend.
    # rescoring``) and the detector's own best score moves here; None when no FPR ran.
    detector_score: float | None = None
    fpr_probability: float | None = None
    kind: str = "nodule"  # "nodule" (3-30 mm) | "mass" (> 30 mm): the size rule on the 3D lesion

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lesion:
        les = _from_dict(cls, data)
        les.centre_mm = tuple(float(v) for v in les.centre_mm)  # type: ignore[assignment]
        les.mean_hu = math.nan if les.mean_hu is None else float(les.mean_hu)
        return les
