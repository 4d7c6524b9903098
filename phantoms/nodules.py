"""Nodules: sample their kind and size, place them (isolated / on a vessel / on the pleura), draw them.

All positions are grid mm (see tubes.py). Drawing uses max(): a nodule raises the lung's HU but
never erases a vessel or the chest wall it touches, which is how attached nodules look.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ctlesion_phantoms.config import PhantomConfig
from ctlesion_phantoms.tubes import Grid, segment_distance, segment_radius_at

# intended HU (before noise / blur) of what the centre voxel shows, per type
CENTRE_HU_RANGE = {"solid": (-100.0, 100.0), "part_solid": (-100.0, 100.0), "ground_glass": (-750.0, -450.0)}
MIN_DIAMETER = {"solid": 3.0, "part_solid": 8.0, "ground_glass": 5.0}  # smaller ones would be invisible


@dataclass
class NoduleSpec:
    type: str
    attachment: str
    diameter: float
    centre: np.ndarray  # grid mm (z, y, x)
    level_hu: float  # solid level, or ground-glass level of the halo
    core_level_hu: float | None = None
    core_diameter: float | None = None
    core_offset: np.ndarray | None = None
    edge_mm: float = 0.6
    lobes: np.ndarray | None = None  # [J, 5]: unit axis (3), amplitude, order
    texture_hu: float = 0.0

    def mean_hu(self) -> float:
        if self.type == "part_solid" and self.core_diameter and self.core_level_hu is not None:
            f = (self.core_diameter / self.diameter) ** 3
            return float(f * self.core_level_hu + (1 - f) * self.level_hu)
        return float(self.level_hu)


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(phi), np.sin(phi) * np.sin(theta), np.sin(phi) * np.cos(theta)], axis=1)


SPHERE = _fibonacci_sphere(96)


class Placer:
    """Finds centres that satisfy an attachment kind, by rejection sampling against the lung mask."""

    def __init__(self, rng: np.random.Generator, lung: np.ndarray, grid: Grid, vessels: np.ndarray, airways: np.ndarray) -> None:
        self.rng, self.lung, self.grid = rng, lung, grid
        self.sp = np.asarray(grid.spacing)
        self.vessels, self.airways = vessels, airways
        sub = (2, 4, 4)  # candidate centres from a coarse view of the mask: cheap and uniform enough
        coarse = np.argwhere(lung[:: sub[0], :: sub[1], :: sub[2]])
        self.candidates = coarse * np.asarray(sub) * self.sp
        self.placed: list[tuple[np.ndarray, float]] = []

    def inside(self, pts: np.ndarray) -> np.ndarray:
        idx = np.rint(np.atleast_2d(pts) / self.sp).astype(int)
        ok = np.all((idx >= 0) & (idx < np.asarray(self.lung.shape)), axis=1)
        out = np.zeros(len(idx), dtype=bool)
        out[ok] = self.lung[tuple(idx[ok].T)]
        return out

    def _clear_of_others(self, c: np.ndarray, radius: float) -> bool:
        return all(np.linalg.norm(c - c2) > radius + r2 + 4.0 for c2, r2 in self.placed)

    def _clear_of_airways(self, c: np.ndarray, radius: float) -> bool:
        if not len(self.airways):
            return True
        gap = segment_distance(c[None], self.airways) - segment_radius_at(c[None], self.airways)
        return bool(np.all(gap > radius + 1.5))

    def _vessel_gap(self, c: np.ndarray, min_vessel_r: float) -> float:
        big = self.vessels[np.maximum(self.vessels[:, 6], self.vessels[:, 7]) >= min_vessel_r]
        if not len(big):
            return np.inf
        return float(np.min(segment_distance(c[None], big) - segment_radius_at(c[None], big)))

    def _in_z_range(self, c: np.ndarray, radius: float) -> bool:
        zmax = (self.lung.shape[0] - 1) * self.sp[0]
        m = min(radius, 2.0)
        return m <= c[0] <= zmax - m

    def place(self, attachment: str, radius: float, tries: int = 300) -> np.ndarray | None:
        if not len(self.candidates):
            return None
        for _ in range(tries):
            c = self._try(attachment, radius)
            if c is not None and self._in_z_range(c, radius) and self._clear_of_others(c, radius) and self._clear_of_airways(c, radius):
                self.placed.append((c, radius))
                return c
        return None

    def _try(self, attachment: str, radius: float) -> np.ndarray | None:
        rng = self.rng
        if attachment == "juxtavascular":
            rv = np.maximum(self.vessels[:, 6], self.vessels[:, 7]) if len(self.vessels) else np.zeros(0)
            pool = np.flatnonzero((rv >= 0.9) & (rv <= 4.5))
            if not len(pool):
                return None
            seg = self.vessels[rng.choice(pool)]
            t = rng.uniform(0.2, 0.8)
            q = seg[0:3] + t * (seg[3:6] - seg[0:3])
            axis = seg[3:6] - seg[0:3]
            axis /= np.linalg.norm(axis) + 1e-9
            v = np.cross(axis, rng.normal(size=3))
            v /= np.linalg.norm(v) + 1e-9
            r_v = seg[6] + t * (seg[7] - seg[6])
            c = q + v * (r_v + radius * rng.uniform(0.55, 0.9))  # overlapping a little: touching
            return c if np.all(self.inside(c + SPHERE * (radius + 1.0))) else None
        if attachment == "juxtapleural":
            p = self.candidates[rng.integers(len(self.candidates))]
            u = rng.normal(size=3) * np.array([0.35, 1.0, 1.0])  # mostly in-plane: the costal pleura
            u /= np.linalg.norm(u)
            steps = np.arange(1.0, 200.0, 1.0)
            ray = p[None] + steps[:, None] * u[None]
            inside = self.inside(ray)
            out = np.flatnonzero(~inside)
            if not len(out):
                return None
            wall = ray[out[0]]
            c = wall - u * radius * rng.uniform(0.5, 0.85)
            if not self.inside(c)[0]:
                return None
            frac_out = 1.0 - self.inside(c + SPHERE * radius).mean()
            return c if 0.03 <= frac_out <= 0.5 else None
        # isolated: the whole nodule plus a margin in lung, away from vessels thicker than 1 mm
        c = self.candidates[rng.integers(len(self.candidates))] + rng.uniform(-2, 2, size=3)
        if not np.all(self.inside(c + SPHERE * (radius + 2.0))):
            return None
        return c if self._vessel_gap(c, 1.0) > radius + 1.0 else None


def sample_spec(rng: np.random.Generator, config: PhantomConfig, kind: str, attachment: str) -> tuple[str, float]:
    lo, hi = config.diameter_mm
    lo = max(lo, MIN_DIAMETER[kind])
    hi = max(hi, lo)
    return kind, float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def make_spec(rng: np.random.Generator, kind: str, attachment: str, diameter: float, centre: np.ndarray) -> NoduleSpec:
    lobes = np.concatenate(
        [
            _fibonacci_sphere(3)[rng.permutation(3)] @ _random_rotation(rng),
            rng.uniform(0.0, 0.12 if kind == "solid" else 0.08, size=(3, 1)),
            rng.integers(2, 5, size=(3, 1)),
        ],
        axis=1,
    )
    if kind == "solid":
        return NoduleSpec(kind, attachment, diameter, centre, float(rng.uniform(-60, 80)), edge_mm=float(rng.uniform(0.4, 1.0)), lobes=lobes, texture_hu=float(rng.uniform(0, 15)))
    ggo_level = float(rng.uniform(-740, -620))
    spec = NoduleSpec(kind, attachment, diameter, centre, ggo_level, edge_mm=float(rng.uniform(1.0, 2.5)), lobes=lobes, texture_hu=float(rng.uniform(30, 70)))
    if kind == "part_solid":
        spec.core_diameter = float(diameter * rng.uniform(0.3, 0.55))
        spec.core_level_hu = float(rng.uniform(-40, 60))
        spec.core_offset = rng.normal(scale=0.12 * spec.core_diameter / 2, size=3)
    return spec


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q


def _profile(grid: Grid, box: tuple[slice, slice, slice], centre: np.ndarray, radius: float, edge: float, lobes: np.ndarray | None) -> np.ndarray:
    gz, gy, gx = grid.coords(box)
    pz, py, px = gz - centre[0], gy - centre[1], gx - centre[2]
    d = np.sqrt(pz * pz + py * py + px * px) + 1e-6
    r_eff = np.full_like(d, radius)
    if lobes is not None:
        for axis_z, axis_y, axis_x, amp, order in lobes:
            cosang = (pz * axis_z + py * axis_y + px * axis_x) / d
            r_eff = r_eff * (1.0 + amp * np.cos(order * np.arccos(np.clip(cosang, -1, 1))))
    return np.clip((r_eff - d) / edge + 0.5, 0.0, 1.0)


def draw_nodule(rng: np.random.Generator, vol: np.ndarray, grid: Grid, spec: NoduleSpec) -> None:
    radius = spec.diameter / 2
    reach = radius * 1.3 + 2 * spec.edge_mm
    box = grid.bbox(spec.centre - reach, spec.centre + reach)
    if box is None:
        return
    occ = _profile(grid, box, spec.centre, radius, spec.edge_mm, spec.lobes)
    value = np.full(occ.shape, spec.level_hu, dtype=np.float32)
    if spec.texture_hu > 0:
        # smooth random texture (ground glass is patchy, solid nodules nearly uniform)
        tex = ndimage.gaussian_filter(rng.normal(size=occ.shape).astype(np.float32), sigma=1.2)
        tex /= tex.std() + 1e-6
        value += spec.texture_hu * tex
    if spec.core_diameter is not None and spec.core_level_hu is not None:
        core_c = spec.centre + (spec.core_offset if spec.core_offset is not None else 0.0)
        core = _profile(grid, box, core_c, spec.core_diameter / 2, 0.6, None)
        value += core * (spec.core_level_hu - value)
    v = vol[box]
    np.maximum(v, v + occ * (value - v), out=v)
