"""3D linking: per-slice boxes that overlap on adjacent slices become one lesion with 3D findings.

Positions are patient mm in LPS (DICOM): +x is the patient's LEFT, +y posterior, +z superior.
Density classes from mean HU (FACTS: pure ground-glass <= about -600 HU, solid about -100..+100).
Side and lobe are guesses from position, labelled as such in reports: side splits at the patient's
midline where the caller knows it (``midline_x_mm``, e.g. ``midline_x_from_mask`` on a body mask),
else at the middle of the field of view, which is the patient's midline only when the patient lies
centred in the reconstruction circle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from preprocess_backend.errors import DicomInputError
from preprocess_backend.postprocess import box_iou
from preprocess_backend.series import SeriesGeometry
from preprocess_backend.types import Detection, Lesion

GGO_MAX_HU = -600.0  # mean HU at or below: ground-glass
SOLID_MIN_HU = -300.0  # mean HU at or above: solid; between the two: part-solid


def classify_density(mean_hu: float) -> str | None:
    if mean_hu is None or not math.isfinite(mean_hu):
        return None
    if mean_hu <= GGO_MAX_HU:
        return "ground-glass"
    if mean_hu >= SOLID_MIN_HU:
        return "solid"
    return "part-solid"


def _centre_inside(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Centre of a inside b or centre of b inside a: the small end caps of a nodule link to its middle."""
    for p, q in ((a, b), (b, a)):
        cx, cy = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
        if q[0] <= cx <= q[2] and q[1] <= cy <= q[3]:
            return True
    return False


@dataclass
class _Track:
    class_id: int
    dets: list[Detection] = field(default_factory=list)

    @property
    def last(self) -> Detection:
        return self.dets[-1]


def _centres(dets: Sequence[Detection], geometry: SeriesGeometry | None) -> np.ndarray:
    if geometry is not None:
        idx = np.array([d.slice_index for d in dets])
        if idx.size and (idx.min() < 0 or idx.max() >= len(geometry.positions)):
            raise DicomInputError("link_lesions", f"slice index out of range of the geometry ({len(geometry.positions)} slices)")
        box = np.array([d.box_px for d in dets], dtype=np.float64).reshape(-1, 4)
        return geometry.pixel_to_patient(idx, (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2)
    missing = [d for d in dets if d.centre_mm is None]
    if missing:
        raise DicomInputError(missing[0].sop_instance_uid or "link_lesions", "no geometry: detection has no centre_mm")
    return np.array([d.centre_mm for d in dets], dtype=np.float64).reshape(-1, 3)


def midline_x_from_mask(mask: np.ndarray, geometry: SeriesGeometry, slices: Sequence[int] | None = None) -> float:
    """Patient LPS x (mm) of the midline: the median over slices of the mask's centroid column.

    ``mask`` is bool [Z, rows, columns] (or [rows, columns] for one slice) on the series' own pixel
    grid, e.g. ``masks.body_mask`` of each slice; ``slices`` are their indices in ``geometry``
    (default 0, 1, ...). Slices where the mask is empty are left out.
    """
    m = np.asarray(mask, dtype=bool)
    m = m[None] if m.ndim == 2 else m
    index = list(range(m.shape[0])) if slices is None else [int(k) for k in slices]
    cols = np.arange(m.shape[-1], dtype=np.float64)
    rows = np.arange(m.shape[-2], dtype=np.float64)
    xs = []
    for k in range(m.shape[0]):
        n = m[k].sum()
        if n == 0:
            continue
        col = float((m[k].sum(axis=0) * cols).sum() / n)
        row = float((m[k].sum(axis=1) * rows).sum() / n)
        xs.append(float(geometry.pixel_to_patient(index[k], col, row)[0]))
    if not xs:
        raise DicomInputError("midline", "empty mask: no midline")
    return float(np.median(xs))


def _lobe(side: str, rel_height: float | None, anterior: bool) -> str | None:
    if rel_height is None:
        return None
    if side == "right":  # right lung: upper, middle (anterior, mid height), lower
        if rel_height >= 2 / 3:
            return "upper"
        return "middle" if rel_height >= 1 / 3 and anterior else "lower"
    return "upper" if rel_height >= 0.5 else "lower"  # left lung: upper (with lingula), lower


def link_lesions(
    detections: Sequence[Detection],
    geometry: SeriesGeometry | None = None,
    link_iou: float = 0.1,
    max_gap: int = 1,
    lung_z_range: tuple[float, float] | None = None,
    midline_x_mm: float | None = None,
) -> list[Lesion]:
    """Join detections of the same class whose boxes overlap (IoU >= ``link_iou`` or one centre
    inside the other) on nearby slices into lesions, highest score first.

    ``max_gap`` is the largest step in slice index between two consecutive detections of one lesion:
    1 links adjacent slices only (no slice skipped), 2 lets a lesion skip one slice where the
    detector missed it; ``max_gap - 1`` slices may be skipped.

    ``geometry`` (the whole series, indexed by ``Detection.slice_index``) gives LPS centres and the
    height for the lobe guess; without it each detection's ``centre_mm`` is used and the lobe is not
    guessed unless ``lung_z_range`` (LPS z, mm) is given. Side splits at ``midline_x_mm`` (LPS x) when
    given, else at the middle of the field of view (with geometry) or x = 0 (without).
    """
    if max_gap < 1:
        raise ValueError(f"max_gap must be >= 1 (1: adjacent slices only), got {max_gap}")
    dets = sorted(detections, key=lambda d: (d.slice_index, -d.score))
    if not dets:
        return []
    centres = _centres(dets, geometry)
    centre_of = {id(d): c for d, c in zip(dets, centres, strict=True)}

    tracks: list[_Track] = []
    open_tracks: list[_Track] = []
    for d in dets:
        open_tracks = [t for t in open_tracks if d.slice_index - t.last.slice_index <= max_gap]
        best, best_iou = None, -1.0
        for t in open_tracks:
            prev = t.last
            if t.class_id != d.class_id or prev.slice_index == d.slice_index:
                continue
            iou = float(box_iou(np.asarray(prev.box_px, np.float64), np.asarray([d.box_px], np.float64))[0])
            if (iou >= link_iou or _centre_inside(prev.box_px, d.box_px)) and iou > best_iou:
                best, best_iou = t, iou
        if best is None:
            best = _Track(d.class_id)
            tracks.append(best)
            open_tracks.append(best)
        best.dets.append(d)

    if geometry is not None:
        # pixel centres on integers (docs/contracts.md): the middle of the image is at (n - 1) / 2
        fov_centre = geometry.pixel_to_patient(0, (geometry.columns - 1) / 2, (geometry.rows - 1) / 2)
        mid_x, mid_y = float(fov_centre[0]), float(fov_centre[1])
        z_all = geometry.positions[:, 2]
        z_lo, z_hi = (lung_z_range if lung_z_range else (float(z_all.min()), float(z_all.max())))
        spacing = geometry.slice_spacing
    else:
        mid_x = mid_y = 0.0
        z_lo, z_hi = lung_z_range if lung_z_range else (math.nan, math.nan)
        spacing = float("nan")

    if midline_x_mm is not None:
        mid_x = float(midline_x_mm)
    lesions = []
    for t in tracks:
        c = np.array([centre_of[id(d)] for d in t.dets])
        area = np.array([max(d.width_mm * d.height_mm, 1e-6) for d in t.dets])
        centre = (c * area[:, None]).sum(axis=0) / area.sum()  # bigger cross-sections weigh more
        scores = np.array([d.score for d in t.dets])
        hu = np.array([d.mean_hu for d in t.dets], dtype=np.float64)
        ok = np.isfinite(hu)
        mean_hu = float((hu[ok] * area[ok]).sum() / area[ok].sum()) if ok.any() else math.nan
        diam = max((d.diameter_mm for d in t.dets if math.isfinite(d.diameter_mm)), default=math.nan)
        z = c[:, 2] if geometry is None else geometry.z[[d.slice_index for d in t.dets]]
        step = spacing if math.isfinite(spacing) else (float(np.median(np.diff(np.unique(z)))) if np.unique(z).size > 1 else 0.0)
        side = "left" if centre[0] > mid_x else "right"
        rel = (centre[2] - z_lo) / (z_hi - z_lo) if math.isfinite(z_lo) and z_hi - z_lo > 1e-6 else None
        slices = sorted({d.slice_index for d in t.dets})
        uid_by_slice = {}
        for d in t.dets:
            uid_by_slice.setdefault(d.slice_index, d.sop_instance_uid)
        lesions.append(
            Lesion(
                lesion_id=0,
                class_id=t.class_id,
                centre_mm=tuple(float(v) for v in centre),  # type: ignore[arg-type]
                diameter_mm=float(diam),
                z_extent_mm=float(np.ptp(z) + step) if z.size else 0.0,
                slices=slices,
                sop_instance_uids=[uid_by_slice[s] for s in slices],
                max_score=float(scores.max()),
                mean_score=float(scores.mean()),
                mean_hu=mean_hu,
                characteristic=classify_density(mean_hu),
                side=side,
                lobe=_lobe(side, None if rel is None else float(np.clip(rel, 0.0, 1.0)), bool(centre[1] < mid_y)),
                num_detections=len(t.dets),
            )
        )
    lesions.sort(key=lambda les: -les.max_score)
    for i, les in enumerate(lesions, start=1):
        les.lesion_id = i
    return lesions
