"""Truth geometry on slices: each nodule's cross-section box on every slice it crosses.

Training learns these boxes and the slice-level mAP scores against them; they are pure geometry of
the truth (no model, no evaluation), so training imports this module, not the evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctlesion_phantoms.truth import CaseTruth
from preprocess_backend.series import SeriesGeometry

SliceBoxes = dict[int, np.ndarray]


def truth_slice_boxes(truth: CaseTruth | SeriesTruth, min_fraction: float = 0.5, min_radius_mm: float = 1.0) -> dict[int, np.ndarray]:
    """Per slice index, the truth boxes [M, 4] (x1, y1, x2, y2 in pixels, x = column) of the nodules.

    A nodule is a sphere of radius R: on a slice dz mm from its centre the cross-section has radius
    r = sqrt(R^2 - dz^2). A slice gets a box only where r >= ``min_fraction`` * R and r >=
    ``min_radius_mm`` (the thin end caps are not something a detector should be asked to find).
    Pixel coordinates follow the serving pipeline: pixel (row i, column j) has its centre at x = j,
    y = i, so a box centre maps back to the nodule's LPS centre through ImagePositionPatient.
    ``truth`` is a phantom's ``CaseTruth`` or a ``SeriesTruth`` (any scan, on its series' geometry).
    """
    out: dict[int, list[list[float]]] = {}
    for k, _, box in _slice_boxes(truth, min_fraction, min_radius_mm):
        out.setdefault(k, []).append(box)
    return {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in sorted(out.items())}


def truth_slice_nodules(truth: CaseTruth | SeriesTruth, min_fraction: float = 0.5, min_radius_mm: float = 1.0) -> dict[int, list[int]]:
    """Per slice index, the index in ``truth.nodules`` of each box of ``truth_slice_boxes`` (same order)."""
    out: dict[int, list[int]] = {}
    for k, n, _ in _slice_boxes(truth, min_fraction, min_radius_mm):
        out.setdefault(k, []).append(n)
    return dict(sorted(out.items()))


@dataclass
class SeriesTruth:
    """Truth of a scan read through ``damoyolo.data``: nodules in patient mm on a DICOM series' geometry."""

    case_id: str
    nodules: list[Any]  # NoduleLike: nodule_id, centre_mm, diameter_mm
    geometry: SeriesGeometry
    irrelevant: list[Any] = field(default_factory=list)

    @property
    def slices(self) -> int:
        return len(self.geometry.positions)


def num_slices(truth: CaseTruth | SeriesTruth) -> int:
    return truth.slices if isinstance(truth, SeriesTruth) else truth.geometry.slices


def _centre_on_slices(truth: CaseTruth | SeriesTruth, n: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dz [Z] mm from the nodule's centre along the normal, row [Z] and column [Z] of the centre in pixels)."""
    g = truth.geometry
    if isinstance(g, SeriesGeometry):
        d = np.asarray(n.centre_mm, np.float64)[None, :] - g.positions  # [Z, 3]
        row_sp, col_sp = g.pixel_spacing
        return -(d @ g.normal), d @ g.orientation[3:] / row_sp, d @ g.orientation[:3] / col_sp
    z = np.asarray(g.origin[2], np.float64) + np.arange(g.slices) * g.slice_spacing
    _, ci, cj = n.centre_voxel
    return z - n.centre_mm[2], np.full(z.shape, float(ci)), np.full(z.shape, float(cj))


def _slice_boxes(truth: CaseTruth | SeriesTruth, min_fraction: float, min_radius_mm: float) -> Iterator[tuple[int, int, list[float]]]:
    row_sp, col_sp = truth.geometry.pixel_spacing
    for index, n in enumerate(truth.nodules):
        radius = n.diameter_mm / 2.0
        dz, ci, cj = _centre_on_slices(truth, n)
        r = np.sqrt(np.clip(radius**2 - dz**2, 0.0, None))
        for k in np.nonzero((r >= min_fraction * radius) & (r >= min_radius_mm) & (r > 0))[0]:
            rx, ry = r[k] / col_sp, r[k] / row_sp
            yield int(k), index, [cj[k] - rx, ci[k] - ry, cj[k] + rx, ci[k] + ry]
