"""Draw tapered capsules (vessels, airways, great vessels) into a volume, each within its bounding box.

Coordinates are "grid mm": (gz, gy, gx) = (k * slice_spacing, i * row_spacing, j * col_spacing), so a
voxel index times its spacing; segments come as rows (z0, y0, x0, z1, y1, x1, r0, r1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Grid:
    shape: tuple[int, int, int]  # (Z, H, W)
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    z_shrink: float = 0.0  # mm taken off |dz| (slab partial volume: thick slices still show thin tubes)
    soft: float = 0.5  # mm: width of the soft edge

    def bbox(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, slice, slice] | None:
        sp = np.asarray(self.spacing)
        lo = np.maximum(np.floor(lo_mm / sp).astype(int), 0)
        hi = np.minimum(np.ceil(hi_mm / sp).astype(int) + 1, self.shape)
        if np.any(hi <= lo):
            return None
        return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dz, dy, dx = self.spacing
        gz = (np.arange(box[0].start, box[0].stop, dtype=np.float32) * dz)[:, None, None]
        gy = (np.arange(box[1].start, box[1].stop, dtype=np.float32) * dy)[None, :, None]
        gx = (np.arange(box[2].start, box[2].stop, dtype=np.float32) * dx)[None, None, :]
        return gz, gy, gx


def capsule_occupancy(grid: Grid, seg: np.ndarray, pad: float = 0.0) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Soft occupancy in [0, 1] of one tapered capsule (radius + pad) within its bounding box."""
    a, b = seg[0:3].astype(np.float32), seg[3:6].astype(np.float32)
    r0, r1 = float(seg[6]) + pad, float(seg[7]) + pad
    rmax = max(r0, r1) + grid.soft + grid.z_shrink
    box = grid.bbox(np.minimum(a, b) - rmax, np.maximum(a, b) + rmax)
    if box is None:
        return None
    gz, gy, gx = grid.coords(box)
    ab = b - a
    L2 = float(ab @ ab) + 1e-9
    pz, py, px = gz - a[0], gy - a[1], gx - a[2]
    t = np.clip((pz * ab[0] + py * ab[1] + px * ab[2]) / L2, 0.0, 1.0)
    dz = pz - t * ab[0]
    if grid.z_shrink > 0:
        dz = np.maximum(np.abs(dz) - grid.z_shrink, 0.0)
    d = np.sqrt(dz * dz + (py - t * ab[1]) ** 2 + (px - t * ab[2]) ** 2)
    r = r0 + t * (r1 - r0)
    occ = np.clip((r - d) / grid.soft + 0.5, 0.0, 1.0)
    return box, occ


def blend_segments(
    vol: np.ndarray, grid: Grid, segments: np.ndarray, hu: float, mask: np.ndarray | None = None, pad: float = 0.0
) -> None:
    """vol <- vol + occupancy * (hu - vol), where ``mask`` (if given) is true."""
    for seg in segments:
        res = capsule_occupancy(grid, seg, pad)
        if res is None:
            continue
        box, occ = res
        if mask is not None:
            occ = occ * mask[box]
        v = vol[box]
        v += occ * (hu - v)


def segment_distance(points: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Distance [P, S] from points [P, 3] to the surface-free axis of segments [S, 8] (grid mm)."""
    a, b = segments[None, :, 0:3], segments[None, :, 3:6]
    p = points[:, None, :]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / ((ab * ab).sum(-1) + 1e-9), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def segment_radius_at(points: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Tube radius [P, S] at the closest axis point of each segment."""
    a, b = segments[None, :, 0:3], segments[None, :, 3:6]
    ab = b - a
    t = np.clip(((points[:, None, :] - a) * ab).sum(-1) / ((ab * ab).sum(-1) + 1e-9), 0, 1)
    return segments[None, :, 6] + t * (segments[None, :, 7] - segments[None, :, 6])
