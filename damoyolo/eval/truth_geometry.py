"""Truth geometry on slices: each nodule's cross-section box on every slice it crosses.

Training learns these boxes and the slice-level mAP scores against them; they are pure geometry of
the truth (no model, no evaluation), so training imports this module, not the evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ctlesion_phantoms.truth import CaseTruth

SliceBoxes = dict[int, np.ndarray]


def truth_slice_boxes(truth: CaseTruth, min_fraction: float = 0.5, min_radius_mm: float = 1.0) -> dict[int, np.ndarray]:
    """Per slice index, the truth boxes [M, 4] (x1, y1, x2, y2 in pixels, x = column) of the nodules.

    A nodule is a sphere of radius R: on a slice dz mm from its centre the cross-section has radius
    r = sqrt(R^2 - dz^2). A slice gets a box only where r >= ``min_fraction`` * R and r >=
    ``min_radius_mm`` (the thin end caps are not something a detector should be asked to find).
    Pixel coordinates follow the serving pipeline: pixel (row i, column j) has its centre at x = j,
    y = i, so a box centre maps back to the nodule's LPS centre through ImagePositionPatient.
    """
    out: dict[int, list[list[float]]] = {}
    for k, _, box in _slice_boxes(truth, min_fraction, min_radius_mm):
        out.setdefault(k, []).append(box)
    return {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in sorted(out.items())}


def truth_slice_nodules(truth: CaseTruth, min_fraction: float = 0.5, min_radius_mm: float = 1.0) -> dict[int, list[int]]:
    """Per slice index, the index in ``truth.nodules`` of each box of ``truth_slice_boxes`` (same order)."""
    out: dict[int, list[int]] = {}
    for k, n, _ in _slice_boxes(truth, min_fraction, min_radius_mm):
        out.setdefault(k, []).append(n)
    return dict(sorted(out.items()))


def _slice_boxes(truth: CaseTruth, min_fraction: float, min_radius_mm: float) -> Iterator[tuple[int, int, list[float]]]:
    g = truth.geometry
    row_sp, col_sp = g.pixel_spacing
    z = np.asarray(g.origin[2], np.float64) + np.arange(g.slices) * g.slice_spacing
    for index, n in enumerate(truth.nodules):
        radius = n.diameter_mm / 2.0
        _, ci, cj = n.centre_voxel
        dz = z - n.centre_mm[2]
        r = np.sqrt(np.clip(radius**2 - dz**2, 0.0, None))
        for k in np.nonzero((r >= min_fraction * radius) & (r >= min_radius_mm) & (r > 0))[0]:
            rx, ry = r[k] / col_sp, r[k] / row_sp
            yield int(k), index, [cj - rx, ci - ry, cj + rx, ci + ry]

