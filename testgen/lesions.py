"""The test generator's nodules: metaballs (sums of Gaussian blobs) thresholded at half height.

One main blob gives a round nodule; satellite blobs around it make lobulated or knobbly outlines
without any angular harmonics. Size and centre in the truth are measured from what was drawn
(equivalent-sphere diameter and occupancy-weighted centroid), not from the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

KINDS = ("solid", "part_solid", "ground_glass", "calcified")
THRESHOLD = 0.5
SIGMA_PER_RADIUS = 1.0 / np.sqrt(-2.0 * np.log(THRESHOLD))  # blob sigma whose half-height surface has radius 1


@dataclass
class Drawn:
    centre: np.ndarray  # volume mm (z, y, x), occupancy-weighted
    diameter: float  # equivalent-sphere diameter of the occupancy, mm
    mean_hu: float  # intended HU averaged over the occupancy
    kind: str
    margin: str


def _field(z: np.ndarray, y: np.ndarray, x: np.ndarray, blobs: list[tuple[np.ndarray, float, float]]) -> np.ndarray:
    f = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
    for c, s, w in blobs:
        f += w * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * s * s)).astype(np.float32)
    return f


def draw_nodule(rng: np.random.Generator, vol: np.ndarray, spacing: tuple[float, float, float], centre: np.ndarray,
                diameter: float, kind: str) -> Drawn | None:
    r = diameter / 2
    s0 = r * SIGMA_PER_RADIUS
    blobs = [(centre, s0, 1.0)]
    margin = "round"
    if rng.random() < 0.6:
        margin = "lobulated"
        for _ in range(int(rng.integers(2, 6))):
            u = rng.normal(size=3)
            u /= np.linalg.norm(u)
            blobs.append((centre + u * r * rng.uniform(0.45, 0.8), s0 * rng.uniform(0.35, 0.6), rng.uniform(0.5, 0.9)))
    sp = np.asarray(spacing)
    reach = 1.8 * r + 2.0
    lo = np.maximum(np.floor((centre - reach) / sp).astype(int), 0)
    hi = np.minimum(np.ceil((centre + reach) / sp).astype(int) + 1, vol.shape)
    if np.any(hi <= lo):
        return None
    z = (np.arange(lo[0], hi[0]) * sp[0])[:, None, None]
    y = (np.arange(lo[1], hi[1]) * sp[1])[None, :, None]
    x = (np.arange(lo[2], hi[2]) * sp[2])[None, None, :]
    f = _field(z, y, x, blobs)
    # soft edge about 0.7 mm wide: the field's slope at the surface is ~ THRESHOLD * r / s0^2 per mm
    slope = THRESHOLD * r / (s0 * s0)
    edge = 0.7 if kind != "ground_glass" else 1.6
    occ = np.clip((f - THRESHOLD) / (slope * edge) + 0.5, 0, 1)
    if kind == "solid":
        level = np.full(occ.shape, rng.uniform(-40, 70), np.float32)
    elif kind == "calcified":
        level = np.full(occ.shape, rng.uniform(300, 900), np.float32)
    else:
        patch = ndimage.gaussian_filter(rng.standard_normal(occ.shape).astype(np.float32), 1.5)
        level = rng.uniform(-720, -600) + 40.0 * patch / (patch.std() + 1e-6)
        if kind == "part_solid":  # a solid core: the top of the same field
            core = np.clip((f - rng.uniform(0.8, 0.9)) / 0.05 + 0.5, 0, 1)
            level = level + core * (rng.uniform(-30, 60) - level)
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    v = vol[box]
    np.maximum(v, v + occ * (level - v), out=v)
    total = float(occ.sum())
    if total <= 0:
        return None
    voxel = float(np.prod(sp))
    zz, yy, xx = np.broadcast_arrays(z, y, x)
    cen = np.array([(occ * zz).sum(), (occ * yy).sum(), (occ * xx).sum()]) / total
    return Drawn(cen, float((6 * total * voxel / np.pi) ** (1 / 3)), float((occ * level).sum() / total), kind, margin)
