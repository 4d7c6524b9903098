"""Scan geometry of a case: pixel / slice spacing, slice count, where the patient lies in LPS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ctlesion_phantoms.anatomy import AnatomyParams
from ctlesion_phantoms.config import COMMON_SLICE_SPACINGS, PhantomConfig
from ctlesion_phantoms.truth import ScanGeometry


@dataclass
class BodyPlacement:
    """Patient LPS mm = body-frame mm + offset (the body frame is anatomy.py's)."""

    offset: tuple[float, float, float]

    def to_body(self, xyz: np.ndarray) -> np.ndarray:
        return np.asarray(xyz, dtype=np.float64) - np.asarray(self.offset)

    def to_patient(self, xyz: np.ndarray) -> np.ndarray:
        return np.asarray(xyz, dtype=np.float64) + np.asarray(self.offset)


def sample_pixel_spacing(rng: np.random.Generator, config: PhantomConfig) -> float:
    return float(np.round(rng.uniform(*config.pixel_spacing_mm), 4))


def _pick_slice_spacing(
    rng: np.random.Generator, config: PhantomConfig, extent: float, slices_max: int, spacings: tuple[float, ...]
) -> tuple[float, bool]:
    """A common spacing that covers ``extent`` within slices_max; else the coarsest allowed (cropped)."""
    lo, hi = config.slice_spacing_mm
    need = extent / slices_max
    ok = [s for s in spacings if lo <= s <= hi and s >= need]
    if ok:
        return float(rng.choice(ok)), False
    allowed = [s for s in spacings if lo <= s <= hi] or [lo]
    return float(rng.choice(allowed)), True


def _default_thickness(rng: np.random.Generator, dz: float) -> float:
    return float(np.round(min(5.0, dz * rng.choice([1.0, 1.0, 1.2, 1.5])), 3))


def sample_geometry(
    rng: np.random.Generator,
    config: PhantomConfig,
    anatomy: AnatomyParams,
    pixel_spacing: float,
    matrix: int | None = None,
    slices_max: int | None = None,
    spacings: tuple[float, ...] = COMMON_SLICE_SPACINGS,
    thickness_of: Callable[[np.random.Generator, float], float] = _default_thickness,
) -> tuple[ScanGeometry, BodyPlacement]:
    """Geometry of one case; ``matrix``, ``slices_max``, ``spacings``, ``thickness_of``: the wide profile's."""
    n = config.matrix if matrix is None else matrix
    slices_max = config.slices_max if slices_max is None else slices_max
    z_lo = -rng.uniform(15, 45)  # the scan starts in the upper abdomen ...
    z_hi = anatomy.lung_height + rng.uniform(8, 30)  # ... and ends above the apices
    dz, cropped = _pick_slice_spacing(rng, config, z_hi - z_lo, slices_max, spacings)
    slices = int(np.floor((z_hi - z_lo) / dz)) + 1
    if cropped or slices > slices_max:
        # partial coverage: a window of slices_max slices somewhere over the lungs
        slices = slices_max
        span = (slices - 1) * dz
        lo_min, lo_max = z_lo, max(z_lo, z_hi - span)
        z_lo = float(rng.uniform(lo_min, lo_max))
    thickness = thickness_of(rng, dz)
    fov = n * pixel_spacing
    image_centre = np.array([rng.uniform(-20, 20), rng.uniform(-20, 20)])
    body_centre = image_centre + np.array([rng.uniform(-12, 12), -rng.uniform(0.0, 0.07) * fov])
    lung_base_z = rng.uniform(-450, -150)  # table position: arbitrary, as on real scanners
    origin_xy = image_centre - (n - 1) / 2 * pixel_spacing
    origin = (float(origin_xy[0]), float(origin_xy[1]), float(np.round(lung_base_z + z_lo, 3)))
    geometry = ScanGeometry(
        rows=n,
        columns=n,
        slices=slices,
        pixel_spacing=(pixel_spacing, pixel_spacing),
        slice_spacing=dz,
        slice_thickness=thickness,
        origin=origin,
    )
    placement = BodyPlacement(offset=(float(body_centre[0]), float(body_centre[1]), float(lung_base_z)))
    return geometry, placement
