"""Profile "wide": nodules beyond the default's three kinds.

Kinds solid / part-solid / ground-glass / calcified (diffuse, central, popcorn) / cavitary; margins
round / lobulated / spiculated (tapered spicules radiating into the lung); attachments isolated /
juxtavascular / juxtapleural / perifissural (lentiform, flattened along the fissure it sits on);
3-30 mm plus masses above 30 mm. Truth keeps ``type`` as the density class (calcified and
cavitary nodules are solid) and records subtype, margin and is_mass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ctlesion_phantoms.config import WIDE_ATTACHMENTS, WIDE_NODULE_KINDS, PhantomConfig
from ctlesion_phantoms.geometry import BodyPlacement
from ctlesion_phantoms.nodules import MIN_DIAMETER, SPHERE, NoduleSpec, Placer, make_spec
from ctlesion_phantoms.truth import NoduleTruth, ScanGeometry
from ctlesion_phantoms.tubes import Grid, capsule_occupancy

FissureSampler = Callable[[np.random.Generator], "tuple[np.ndarray, np.ndarray] | None"]
WIDE_MIN_DIAMETER = {**MIN_DIAMETER, "calcified": 3.0, "cavitary": 8.0}
AIR_HU = -990.0


@dataclass
class WideSpec:
    base: NoduleSpec  # kind "solid" for calcified / cavitary; level, edge, lobes, texture
    kind: str  # one of WIDE_NODULE_KINDS
    margin: str
    is_mass: bool
    normal: np.ndarray | None = None  # perifissural: the fissure's normal (grid mm)
    flatten: float = 1.0  # semi-axis along ``normal`` / radius
    spicules: np.ndarray = field(default_factory=lambda: np.zeros((0, 8)))
    calc_pattern: str = ""
    calc_hu: float = 0.0
    calc_blobs: list[tuple[np.ndarray, float]] = field(default_factory=list)  # (offset, radius)
    cavity: tuple[np.ndarray, float] | None = None  # (offset, radius)

    def mean_hu(self) -> float:
        """Intended mean HU of the nodule's volume before noise and blur."""
        b = self.base
        if self.kind == "calcified":
            if self.calc_pattern == "diffuse":
                return self.calc_hu
            r = b.diameter / 2
            f = sum((rb / r) ** 3 for _, rb in self.calc_blobs)
            return float(min(f, 1.0) * self.calc_hu + (1 - min(f, 1.0)) * b.level_hu)
        if self.kind == "cavitary" and self.cavity is not None:
            f = (self.cavity[1] / (b.diameter / 2)) ** 3
            return float(f * AIR_HU + (1 - f) * b.level_hu)
        return b.mean_hu()


class WidePlacer(Placer):
    """Placer with perifissural centres: on a fissure sheet, both sides in lung."""

    def __init__(self, *args: object, fissure_point: FissureSampler | None = None, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.fissure_point = fissure_point
        self.last_normal: np.ndarray | None = None

    def _try(self, attachment: str, radius: float) -> np.ndarray | None:
        if attachment != "perifissural":
            return super()._try(attachment, radius)
        if self.fissure_point is None:
            return None
        hit = self.fissure_point(self.rng)
        if hit is None:
            return None
        point, normal = hit
        c = point + normal * radius * 0.6 * self.rng.uniform(-0.2, 0.2)
        if not np.all(self.inside(c + SPHERE * (radius + 1.0))):
            return None
        self.last_normal = normal
        return c


def sample_kind_and_size(rng: np.random.Generator, config: PhantomConfig, kind: str) -> tuple[str, float, bool]:
    if config.p_mass > 0 and rng.random() < config.p_mass:
        kind = kind if kind in ("solid", "part_solid", "cavitary") else "solid"
        return kind, float(rng.uniform(30.5, config.mass_max_mm)), True
    lo, hi = config.diameter_mm
    lo = max(lo, WIDE_MIN_DIAMETER[kind])
    hi = max(hi, lo)
    return kind, float(np.exp(rng.uniform(np.log(lo), np.log(hi)))), False


def _margin(rng: np.random.Generator, kind: str, is_mass: bool) -> str:
    if kind in ("ground_glass", "calcified"):
        return "round" if rng.random() < 0.5 else "lobulated"
    p = [0.2, 0.4, 0.4] if is_mass else [0.35, 0.4, 0.25]
    return ("round", "lobulated", "spiculated")[int(rng.choice(3, p=p))]


def make_wide_spec(rng: np.random.Generator, kind: str, attachment: str, diameter: float, centre: np.ndarray, is_mass: bool, normal: np.ndarray | None) -> WideSpec:
    base = make_spec(rng, "solid" if kind in ("calcified", "cavitary") else kind, attachment, diameter, centre)
    margin = _margin(rng, kind, is_mass)
    r = diameter / 2
    if margin == "round":
        base.lobes = None
    elif margin == "lobulated" and base.lobes is not None:
        base.lobes[:, 3] = rng.uniform(0.08, 0.2, size=len(base.lobes))
    spec = WideSpec(base=base, kind=kind, margin=margin, is_mass=is_mass)
    if attachment == "perifissural" and normal is not None:
        spec.normal, spec.flatten = normal, float(rng.uniform(0.45, 0.7))
    if margin == "spiculated":
        n = int(rng.integers(5, 16))
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        length = np.minimum(rng.uniform(0.4, 1.1, n) * r, 15.0) + 1.5
        a = centre + dirs * 0.75 * r
        b = centre + dirs * (r + length)[:, None]
        r0 = rng.uniform(0.5, 1.1, n) * min(1.0, 0.25 * r)
        spec.spicules = np.column_stack([a, b, np.maximum(r0, 0.35), np.full(n, 0.15)])
    if kind == "calcified":
        spec.calc_pattern = ("diffuse", "central", "popcorn")[int(rng.choice(3, p=[0.45, 0.3, 0.25]))]
        spec.calc_hu = float(rng.uniform(250, 1000))
        if spec.calc_pattern == "central":
            spec.calc_blobs = [(rng.normal(scale=0.1 * r, size=3), r * float(rng.uniform(0.35, 0.6)))]
        elif spec.calc_pattern == "popcorn":
            m = int(rng.integers(3, 8))
            offs = rng.normal(size=(m, 3))
            offs *= (rng.uniform(0.1, 0.6, m) * r / np.linalg.norm(offs, axis=1))[:, None]
            spec.calc_blobs = [(o, max(0.6, r * float(rng.uniform(0.12, 0.25)))) for o in offs]
    if kind == "cavitary":
        wall = float(rng.uniform(1.5, max(2.0, 0.4 * r)))
        cav_r = max(1.0, r - wall)
        spec.cavity = (rng.normal(scale=0.15 * wall, size=3), cav_r)
    return spec


def _ball(grid: Grid, box: tuple[slice, slice, slice], c: np.ndarray, r: float, edge: float) -> np.ndarray:
    gz, gy, gx = grid.coords(box)
    d = np.sqrt((gz - c[0]) ** 2 + (gy - c[1]) ** 2 + (gx - c[2]) ** 2)
    return np.clip((r - d) / edge + 0.5, 0.0, 1.0)


def _shape(grid: Grid, box: tuple[slice, slice, slice], spec: WideSpec) -> np.ndarray:
    b = spec.base
    gz, gy, gx = grid.coords(box)
    pz, py, px = gz - b.centre[0], gy - b.centre[1], gx - b.centre[2]
    if spec.normal is not None and spec.flatten < 1.0:  # lentiform: stretch the normal component
        n = spec.normal
        t = (pz * n[0] + py * n[1] + px * n[2]) * (1.0 / spec.flatten - 1.0)
        pz, py, px = pz + t * n[0], py + t * n[1], px + t * n[2]
    d = np.sqrt(pz * pz + py * py + px * px) + 1e-6
    r_eff = np.full_like(d, b.diameter / 2)
    if b.lobes is not None:
        for az, ay, ax, amp, order in b.lobes:
            cosang = (pz * az + py * ay + px * ax) / d
            r_eff = r_eff * (1.0 + amp * np.cos(order * np.arccos(np.clip(cosang, -1, 1))))
    return np.clip((r_eff - d) / b.edge_mm + 0.5, 0.0, 1.0)


def draw_wide_nodule(rng: np.random.Generator, vol: np.ndarray, grid: Grid, spec: WideSpec) -> None:
    b = spec.base
    radius = b.diameter / 2
    reach = radius * 1.3 + 2 * b.edge_mm
    box = grid.bbox(b.centre - reach, b.centre + reach)
    if box is None:
        return
    occ = _shape(grid, box, spec)
    value = np.full(occ.shape, b.level_hu, dtype=np.float32)
    if b.texture_hu > 0:
        tex = ndimage.gaussian_filter(rng.normal(size=occ.shape).astype(np.float32), sigma=1.2)
        value += b.texture_hu * tex / (tex.std() + 1e-6)
    if b.core_diameter is not None and b.core_level_hu is not None:
        core_c = b.centre + (b.core_offset if b.core_offset is not None else 0.0)
        core = _ball(grid, box, core_c, b.core_diameter / 2, 0.6)
        value += core * (b.core_level_hu - value)
    if spec.calc_pattern == "diffuse":
        value[:] = spec.calc_hu
    for off, rb in spec.calc_blobs:
        blob = _ball(grid, box, b.centre + off, rb, 0.4)
        value += blob * (spec.calc_hu - value)
    v = vol[box]
    np.maximum(v, v + occ * (value - v), out=v)
    for seg in spec.spicules:
        res = capsule_occupancy(grid, seg)
        if res is not None:
            sbox, socc = res
            sv = vol[sbox]
            np.maximum(sv, sv + socc * (b.level_hu - sv), out=sv)
    if spec.cavity is not None:
        off, rc = spec.cavity
        cav = _ball(grid, box, b.centre + off, rc, 0.5) * (occ > 0.5)
        v = vol[box]
        v += cav * (AIR_HU - v)


def _choice(rng: np.random.Generator, weights: dict[str, float], order: tuple[str, ...]) -> str:
    w = np.array([weights.get(k, 0.0) for k in order], dtype=float)
    return order[int(rng.choice(len(order), p=w / w.sum()))]


def place_wide_nodules(
    rng: np.random.Generator, r_draw: np.random.Generator, config: PhantomConfig, vol: np.ndarray, lung: np.ndarray,
    grid: Grid, vessels: np.ndarray, airways: np.ndarray, internal: ScanGeometry, output: ScanGeometry,
    placement: BodyPlacement, fissure_point: FissureSampler | None,
) -> list[NoduleTruth]:
    """Place and draw the case's nodules on the internal grid; truth in the output geometry."""
    if config.nodules_max == 0 or rng.random() < config.p_no_nodules:
        return []
    count = int(rng.integers(max(config.nodules_min, 1), config.nodules_max + 1))
    placer = WidePlacer(rng, lung, grid, vessels, airways, fissure_point=fissure_point)
    out: list[NoduleTruth] = []
    for _ in range(count):
        kind = _choice(rng, config.type_weights, WIDE_NODULE_KINDS)
        attachment = _choice(rng, config.attachment_weights, WIDE_ATTACHMENTS)
        kind, diameter, is_mass = sample_kind_and_size(rng, config, kind)
        if is_mass and attachment in ("juxtavascular", "perifissural"):
            attachment = "isolated"
        if attachment == "perifissural" and diameter > 15:
            diameter = float(rng.uniform(4.0, 12.0))  # perifissural nodules are small and benign-looking
        placer.last_normal = None
        centre = placer.place(attachment, diameter / 2)
        for fallback in ("juxtapleural", "isolated"):
            if centre is None and attachment != fallback:
                attachment = fallback
                centre = placer.place(attachment, diameter / 2)
        if centre is None:
            continue  # no room: fewer nodules, never a wrong truth
        normal = placer.last_normal if attachment == "perifissural" else None
        spec = make_wide_spec(rng, kind, attachment, diameter, centre, is_mass, normal)
        draw_wide_nodule(r_draw, vol, grid, spec)
        mm = internal.voxel_to_mm(centre / np.asarray(grid.spacing))
        kij = output.mm_to_voxel(mm)
        side_x = placement.to_body(mm)[0]
        b = spec.base
        out.append(
            NoduleTruth(
                nodule_id=len(out) + 1,
                centre_mm=tuple(float(round(v, 3)) for v in mm),
                centre_voxel=tuple(float(round(v, 3)) for v in kij),
                diameter_mm=round(diameter, 2),
                type=b.type,
                attachment=attachment,
                mean_hu=round(spec.mean_hu(), 1),
                core_diameter_mm=None if b.core_diameter is None else round(b.core_diameter, 2),
                side="left" if side_x > 0 else "right",
                subtype=kind if kind in ("calcified", "cavitary") else "",
                margin=spec.margin,
                is_mass=is_mass,
            )
        )
    return out
