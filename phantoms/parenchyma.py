"""Profile "wide": lung parenchyma beyond the default's uniform lung: fissures, emphysema, fibrosis.

Fissures are smooth surfaces z = f(x, y) in the body frame (anatomy.py), one oblique (major) per
lung plus the right horizontal (minor) one, drawn as thin pleural sheets; perifissural nodules sit
on them. Emphysema is holes of air (centrilobular: small, upper zones; paraseptal: subpleural
bullae; panlobular: diffusely lower density at the bases). Fibrosis is subpleural basal
reticulation with ground glass and honeycomb cysts. All are drawn into the lung only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ctlesion_phantoms.anatomy import AnatomyParams
from ctlesion_phantoms.tubes import Grid

COARSE = (2, 4, 4)  # (z, y, x) subsampling of the lung mask for distances to the pleura


@dataclass
class Fissure:
    name: str  # right_major | right_minor | left_major
    z_f: np.ndarray  # [H, W] body-frame height of the surface at each pixel
    cos: np.ndarray  # [H, W] 1 / sqrt(1 + |grad z_f|^2): vertical gap -> distance to the surface
    valid: np.ndarray  # [H, W] where this fissure exists
    amp_hu: float
    sigma_mm: float


@dataclass
class Parenchyma:
    fissures: list[Fissure] = field(default_factory=list)
    emphysema: str = "none"  # none | centrilobular | paraseptal | panlobular
    fibrosis: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"fissures": [f.name for f in self.fissures], "emphysema": self.emphysema, "fibrosis": self.fibrosis}


def _gradient_cos(z_f: np.ndarray, pixel: float) -> np.ndarray:
    gy, gx = np.gradient(z_f, pixel)
    return (1.0 / np.sqrt(1.0 + gx**2 + gy**2)).astype(np.float32)


def sample_fissures(rng: np.random.Generator, p: AnatomyParams, x: np.ndarray, y: np.ndarray, pixel: float) -> list[Fissure]:
    """x, y: body-frame mm of the pixel grid (after the patient's roll), [H, W]."""
    H, B = p.lung_height, p.half_depth
    out: list[Fissure] = []
    majors = {}
    for name, side in (("right_major", -1.0), ("left_major", 1.0)):
        top = H * rng.uniform(0.64, 0.8) + (8.0 if side > 0 else 0.0)  # posterior end (higher on the left)
        bottom = H * rng.uniform(0.0, 0.12)  # anterior end, at the diaphragm
        y_top, y_bot = B * rng.uniform(0.45, 0.65), -B * rng.uniform(0.45, 0.65)
        slope = (top - bottom) / (y_top - y_bot)
        xs = side * 0.5 * p.half_width
        curv = rng.uniform(-0.0025, 0.0025)
        z_f = (bottom + slope * (y - y_bot) + curv * (x - xs) ** 2 + rng.uniform(-6, 6) * np.sin(x / rng.uniform(25, 45))).astype(np.float32)
        valid = (x < p.mediastinum_shift) if side < 0 else (x > p.mediastinum_shift)
        if rng.random() < 0.35:  # incomplete fissure: missing medially, as in about a third of lungs
            valid = valid & (np.abs(x - p.mediastinum_shift) > rng.uniform(20, 50))
        majors[name] = z_f
        out.append(Fissure(name, z_f, _gradient_cos(z_f, pixel), valid, float(rng.uniform(180, 420)), float(rng.uniform(0.3, 0.5))))
    if rng.random() < 0.85:  # the minor fissure: anterior to the right major one, nearly horizontal
        z_m = (H * rng.uniform(0.5, 0.62) + rng.uniform(-0.12, 0.12) * y + rng.uniform(-0.1, 0.1) * x).astype(np.float32)
        valid = (x < p.mediastinum_shift) & (majors["right_major"] < z_m)
        out.append(Fissure("right_minor", z_m, _gradient_cos(z_m, pixel), valid, float(rng.uniform(150, 350)), float(rng.uniform(0.3, 0.5))))
    return out


def draw_fissures(sl: np.ndarray, lung_k: np.ndarray, z: float, fissures: list[Fissure], dz_internal: float) -> None:
    """Add the fissure sheets crossing body height ``z`` to slice ``sl`` (lung pixels only)."""
    idx = np.flatnonzero(lung_k)
    if not len(idx):
        return
    flat = sl.reshape(-1)
    for f in fissures:
        # a sheet thinner than the z step would fall between samples: widen it to half a step
        sigma = max(f.sigma_mm, 0.5 * dz_internal)
        d = np.abs(z - f.z_f.reshape(-1)[idx]) * f.cos.reshape(-1)[idx]
        sel = (d < 3 * sigma) & f.valid.reshape(-1)[idx]
        flat[idx[sel]] += np.float32(f.amp_hu) * np.exp(-0.5 * (d[sel] / sigma) ** 2)


def fissure_point_sampler(
    fissures: list[Fissure], lung: np.ndarray, grid: Grid, z_offset: float
) -> object:
    """rng -> (grid-mm point on a fissure inside the lung, unit normal in grid mm) or None.

    ``z_offset``: grid z = body z + z_offset (the internal grid's origin relative to the lung base).
    """
    dz, dy, dx = grid.spacing

    def sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        if not fissures:
            return None
        f = fissures[int(rng.integers(len(fissures)))]
        cand = np.flatnonzero(f.valid.reshape(-1))
        if not len(cand):
            return None
        for _ in range(30):
            r, c = np.unravel_index(int(cand[rng.integers(len(cand))]), f.valid.shape)
            gz = float(f.z_f[r, c]) + z_offset
            k = int(round(gz / dz))
            if not (0 <= k < lung.shape[0]) or not lung[k, r, c]:
                continue
            gy_, gx_ = np.gradient(f.z_f[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2], dy, dx)
            n = np.array([1.0, -float(gy_.mean()), -float(gx_.mean())])  # (z, y, x) normal of z - f(x, y) = 0
            return np.array([gz, r * dy, c * dx]), n / np.linalg.norm(n)
        return None

    return sample


def sample_parenchyma(rng: np.random.Generator, fissures: list[Fissure]) -> Parenchyma:
    kinds = ["none", "centrilobular", "paraseptal", "panlobular"]
    emph = kinds[int(rng.choice(4, p=[0.62, 0.18, 0.1, 0.1]))]
    return Parenchyma(fissures=fissures, emphysema=emph, fibrosis=bool(rng.random() < 0.15))


def coarse_pleural_distance(lung: np.ndarray, grid: Grid) -> np.ndarray:
    """Distance (mm) of coarse lung voxels to the nearest non-lung voxel, on the COARSE grid."""
    sub = lung[:: COARSE[0], :: COARSE[1], :: COARSE[2]]
    sampling = tuple(s * c for s, c in zip(grid.spacing, COARSE, strict=True))
    return ndimage.distance_transform_edt(sub, sampling=sampling).astype(np.float32)


def _holes(vol: np.ndarray, lung: np.ndarray, grid: Grid, centres: np.ndarray, radii: np.ndarray, hu: float, wall_hu: float | None) -> None:
    for c, r in zip(centres, radii, strict=True):
        reach = r + 2.0
        box = grid.bbox(c - reach, c + reach)
        if box is None:
            continue
        gz, gy, gx = grid.coords(box)
        d = np.sqrt((gz - c[0]) ** 2 + (gy - c[1]) ** 2 + (gx - c[2]) ** 2)
        inl = lung[box]
        v = vol[box]
        if wall_hu is not None:  # bullae and honeycomb cysts have a thin wall
            wall = np.clip(0.5 - np.abs(d - r) / 0.6, 0.0, 1.0) * inl
            v += wall * (wall_hu - v)
        occ = np.clip(r - d + 0.5, 0.0, 1.0) * inl
        v += occ * (hu - v)


def _pick_coarse(rng: np.random.Generator, where: np.ndarray, n: int, grid: Grid, weights: np.ndarray | None = None) -> np.ndarray:
    idx = np.argwhere(where)
    if not len(idx) or n <= 0:
        return np.zeros((0, 3))
    p = None if weights is None else weights / weights.sum()
    sel = idx[rng.choice(len(idx), size=n, p=p)]
    jitter = rng.uniform(-0.5, 0.5, size=sel.shape) * np.asarray(COARSE)
    return (sel * np.asarray(COARSE) + jitter) * np.asarray(grid.spacing)


def draw_emphysema(rng: np.random.Generator, vol: np.ndarray, lung: np.ndarray, grid: Grid, dist: np.ndarray, kind: str) -> None:
    if kind == "none":
        return
    inlung = dist > 0
    zfrac = np.linspace(0, 1, dist.shape[0])[:, None, None] * np.ones_like(dist)
    if kind == "centrilobular":  # small holes, upper zones
        n = int(rng.integers(60, 500))
        c = _pick_coarse(rng, inlung & (dist > 3), n, grid, (zfrac[inlung & (dist > 3)] + 0.1) ** 2)
        _holes(vol, lung, grid, c, rng.uniform(1.0, 4.5, len(c)), float(rng.uniform(-995, -965)), None)
    elif kind == "paraseptal":  # subpleural bullae
        n = int(rng.integers(8, 40))
        c = _pick_coarse(rng, inlung & (dist < 6), n, grid)
        _holes(vol, lung, grid, c, rng.uniform(3.0, 12.0, len(c)), float(rng.uniform(-995, -970)), float(rng.uniform(-650, -400)))
    else:  # panlobular: diffusely lower density towards the bases, a few larger holes
        z = np.arange(vol.shape[0])
        drop = rng.uniform(40, 90) * np.clip(1.0 - z / (0.6 * vol.shape[0]), 0, 1)
        for k in np.flatnonzero(drop > 1):
            vol[k][lung[k]] -= np.float32(drop[k])
        c = _pick_coarse(rng, inlung & (dist > 4) & (zfrac < 0.5), int(rng.integers(10, 60)), grid)
        _holes(vol, lung, grid, c, rng.uniform(2.0, 6.0, len(c)), float(rng.uniform(-990, -960)), None)


def draw_fibrosis(rng: np.random.Generator, vol: np.ndarray, lung: np.ndarray, grid: Grid, dist: np.ndarray, posterior: np.ndarray) -> None:
    """Basal subpleural reticulation and ground glass, plus honeycomb cysts at the pleura.

    ``posterior``: [H, W] bool, the posterior half of the chest in the internal grid's pixels.
    """
    depth = rng.uniform(8.0, 18.0)
    nz = dist.shape[0]
    z_top = int(nz * rng.uniform(0.35, 0.6))
    band = (dist > 0) & (dist < depth)
    band[z_top:] = False
    band &= posterior[:: COARSE[1], :: COARSE[2]][None, : dist.shape[1], : dist.shape[2]]
    ggo, ret = float(rng.uniform(80, 220)), float(rng.uniform(200, 420))
    sigma_px = 1.3 / grid.spacing[1]
    h, w = vol.shape[1:]
    bank = [ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sigma_px) for _ in range(4)]
    bank = [b / (b.std() + 1e-6) for b in bank]
    for k in range(vol.shape[0]):
        kc = min(k // COARSE[0], nz - 1)
        if not band[kc].any():
            continue
        region = np.repeat(np.repeat(band[kc], COARSE[1], axis=0), COARSE[2], axis=1)[:h, :w]
        region = np.pad(region, ((0, h - region.shape[0]), (0, w - region.shape[1])))
        region &= lung[k]
        if not region.any():
            continue
        net = np.exp(-((bank[k % 4] / 0.18) ** 2))  # level lines of a smooth field: a reticular net
        vol[k][region] += (ggo + ret * net)[region]
    cysts = _pick_coarse(rng, band & (dist < 5), int(rng.integers(15, 120)), grid)
    _holes(vol, lung, grid, cysts, rng.uniform(1.5, 4.0, len(cysts)), float(rng.uniform(-990, -940)), float(rng.uniform(-200, 0)))
