"""In-memory phantom: HU volume + lung mask + truth, no files (what training wants for speed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctlesion_phantoms import anatomy as an
from ctlesion_phantoms.config import ATTACHMENTS, NODULE_TYPES, PhantomConfig
from ctlesion_phantoms.geometry import BodyPlacement, sample_geometry, sample_pixel_spacing
from ctlesion_phantoms.nodules import Placer, draw_nodule, make_spec, sample_spec
from ctlesion_phantoms.scanner import apply_scanner
from ctlesion_phantoms.truth import CaseTruth, NoduleTruth, ScanGeometry
from ctlesion_phantoms.tubes import Grid, capsule_occupancy
from ctlesion_phantoms.uids import CaseIdentity
from ctlesion_phantoms.vessels import grow_tree, lung_lookup

GENERATOR_VERSION = "ctlesion-phantoms 1"


@dataclass
class PhantomVolume:
    hu: np.ndarray  # float32 [Z, H, W], slices in ascending z (position order), after blur and noise
    lung_mask: np.ndarray  # bool [Z, H, W], the lungs before vessels and nodules were drawn
    truth: CaseTruth
    vessels: np.ndarray  # [S, 8] vessel segments, grid mm (z, y, x, z, y, x, r0, r1)
    outside: np.ndarray | None = None  # [H, W] outside the reconstruction circle (written as PixelPaddingValue)


def default_case_id(seed: int) -> str:
    return f"ph{seed:08d}"


class _Frame:
    """body-frame mm (x, y, z) <-> grid mm (z, y, x) for one case."""

    def __init__(self, geometry: ScanGeometry, placement: BodyPlacement) -> None:
        self.shift = np.asarray(placement.offset) - np.asarray(geometry.origin)

    def grid(self, xyz_body: np.ndarray) -> np.ndarray:
        p = np.asarray(xyz_body, dtype=np.float64) + self.shift
        return p[..., ::-1].copy()

    def dir(self, xyz: np.ndarray) -> np.ndarray:
        return np.asarray(xyz, dtype=np.float64)[..., ::-1].copy()


def _render_anatomy(
    params: an.AnatomyParams, geometry: ScanGeometry, placement: BodyPlacement, decorate: Callable[[an.AnatomyRenderer], Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """HU and lung mask slice by slice; ``decorate(renderer)`` may return f(slice, lung_k, z) drawing more."""
    ps_r, ps_c = geometry.pixel_spacing
    xs = geometry.origin[0] + np.arange(geometry.columns) * ps_c - placement.offset[0]
    ys = geometry.origin[1] + np.arange(geometry.rows) * ps_r - placement.offset[1]
    x, y = np.meshgrid(xs, ys)
    renderer = an.AnatomyRenderer(params, x, y)
    extra = decorate(renderer) if decorate is not None else None
    lung_offset = renderer.lung_hu_offset()
    vol = np.empty((geometry.slices, geometry.rows, geometry.columns), dtype=np.float32)
    lung = np.empty(vol.shape, dtype=bool)
    z0 = geometry.origin[2] - placement.offset[2]
    for k in range(geometry.slices):
        lab, lung_k = renderer.render(z0 + k * geometry.slice_spacing)
        vol[k] = params.hu[lab]
        np.add(vol[k], lung_offset, out=vol[k], where=lung_k)
        lung[k] = lung_k
        if extra is not None:
            extra(vol[k], lung_k, z0 + k * geometry.slice_spacing)
    return vol, lung


def _mediastinal_tubes(p: an.AnatomyParams, hilum: dict[str, np.ndarray]) -> np.ndarray:
    """Great vessels (body mm): aortic arch + ascending aorta, SVC, pulmonary trunk to both hila."""
    H, B, vr = p.lung_height, p.half_depth, p.vertebra_radius
    r_ao = 12.0
    desc = np.array([0.75 * vr + 12, p.vertebra_y - 0.8 * vr, 0.78 * H])
    top = np.array([0.3 * desc[0], desc[1] - 0.35 * B, 0.86 * H])
    asc = np.array([-6.0, -0.22 * B, 0.8 * H])
    root = np.array([-2.0, -0.22 * B, p.heart_centre[2] + 0.55 * p.heart_axes[2]])
    svc_top = np.array([-p.mediastinum_half_width - 4, -0.12 * B, 0.95 * H])
    svc_bot = np.array([-p.mediastinum_half_width - 2, -0.12 * B, 0.5 * H])
    trunk = np.array([10.0, -0.3 * B, 0.5 * H])
    segs = [
        (desc, top, r_ao, r_ao), (top, asc, r_ao, r_ao * 1.1), (asc, root, r_ao * 1.1, r_ao * 1.2),
        (svc_top, svc_bot, 9.0, 10.0), (root, trunk, 12.0, 13.0),
        (trunk, hilum["right"], 11.0, 8.0), (trunk, hilum["left"], 11.0, 8.0),
    ]
    return np.array([np.r_[a, b, r0, r1] for a, b, r0, r1 in segs])


def _to_grid_segments(frame: _Frame, segs_body: np.ndarray) -> np.ndarray:
    out = segs_body.copy()
    out[:, 0:3] = frame.grid(segs_body[:, 0:3])
    out[:, 3:6] = frame.grid(segs_body[:, 3:6])
    return out


def _roots(rng: np.random.Generator, frame: _Frame, start_body: np.ndarray, side: float, dirs: list[tuple[float, float, float]], r: tuple[float, float]) -> list[tuple[np.ndarray, np.ndarray, float]]:
    out = []
    for dx, dy, dz in dirs:
        d = np.array([side * dx, dy, dz]) + rng.normal(scale=0.15, size=3)
        out.append((frame.grid(start_body), frame.dir(d), float(rng.uniform(*r))))
    return out


def draw_tubes(
    r_tree: np.random.Generator, r_air: np.random.Generator, config: PhantomConfig, params: an.AnatomyParams,
    frame: _Frame, vol: np.ndarray, lung: np.ndarray, grid: Grid, z_shrink: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Great vessels, airways and the pulmonary vessel trees, drawn in place; returns (vessels, airways)."""
    H, B = params.lung_height, params.half_depth
    mw = params.mediastinum_half_width
    hilum = {
        "right": np.array([params.mediastinum_shift - mw - 14, 0.02 * B, params.hilum_z]),
        "left": np.array([params.mediastinum_shift + mw + 22, 0.0, params.hilum_z + 8]),
    }
    # great vessels: solid soft tissue that pushes the lung back
    for seg in _to_grid_segments(frame, _mediastinal_tubes(params, hilum)):
        res = capsule_occupancy(grid, seg)
        if res is not None:
            box, occ = res
            v = vol[box]
            v += occ * (params.hu[an.BLOOD] - v)
            lung[box] &= occ < 0.5

    inside = lung_lookup(lung, grid.spacing)
    # airways: trachea -> carina -> main bronchi -> a few generations of bronchi
    r_tr = float(r_air.uniform(7.5, 10.5))
    carina = np.array([params.mediastinum_shift - 2, params.vertebra_y - params.vertebra_radius - r_tr - 8, params.carina_z])
    trachea_top = carina + np.array([r_air.uniform(-3, 3), r_air.uniform(-8, 0), 0.45 * H + 80])
    bronchus_end = {
        "right": hilum["right"] + np.array([-2.0, 14.0, 4.0]),
        "left": hilum["left"] + np.array([-4.0, 16.0, -6.0]),
    }
    airway_body = [np.r_[trachea_top, carina, r_tr, r_tr]]
    airway_body += [np.r_[carina, bronchus_end[s], r_tr * 0.72, r_tr * 0.62] for s in ("right", "left")]
    airway_roots = []
    for s, side in (("right", -1.0), ("left", 1.0)):
        airway_roots += _roots(r_air, frame, bronchus_end[s], side, [(0.4, 0.1, 1.0), (0.5, 0.2, -1.0), (0.7, -0.5, -0.6)], (3.8, 5.0))
    airways = np.vstack([_to_grid_segments(frame, np.array(airway_body)),
                         grow_tree(r_air, airway_roots, inside, 1.4, 160, (4.0, 7.0), free_generations=1)])

    # pulmonary arteries from the hila, veins from the left atrium; each lung gets its own trees
    artery_dirs = [(0.3, 0.1, 1.0), (0.5, -0.5, 0.8), (1.0, 0.0, 0.2), (0.6, 0.6, -1.0), (0.6, -0.7, -0.8), (0.8, 0.1, -0.6), (0.3, 0.8, -0.3)]
    vein_dirs = [(1.0, 0.2, -0.5), (1.0, -0.3, 0.3), (0.6, 0.5, -1.0), (0.5, -0.6, 0.2)]
    atrium = {s: np.array([params.heart_centre[0] + (-45 if s == "right" else 15), params.heart_centre[1] + 35, params.heart_centre[2] + 0.6 * params.heart_axes[2]]) for s in ("right", "left")}
    per_tree = max(1, config.max_vessel_segments // 4)
    trees = []
    for s, side in (("right", -1.0), ("left", 1.0)):
        trees.append(grow_tree(r_tree, _roots(r_tree, frame, hilum[s], side, artery_dirs, (4.0, 6.0)), inside, config.vessel_min_radius_mm, per_tree))
        trees.append(grow_tree(r_tree, _roots(r_tree, frame, atrium[s], side, vein_dirs, (4.0, 5.5)), inside, config.vessel_min_radius_mm, per_tree))
    vessels = np.vstack(trees)
    vgrid = Grid(shape=vol.shape, spacing=grid.spacing, soft=grid.soft, z_shrink=z_shrink)
    for seg in vessels:
        res = capsule_occupancy(vgrid, seg)
        if res is None:
            continue
        box, occ = res
        # vessels belong to the lung; near the hilum (thick trunks) they also cross the mediastinum
        if max(seg[6], seg[7]) < 3.5:
            occ = occ * lung[box]
        v = vol[box]
        np.maximum(v, v + occ * (params.hu[an.BLOOD] - v), out=v)
    wall_hu = float(r_air.uniform(-50, 40))
    for seg in airways:
        wall = 0.15 * max(seg[6], seg[7]) + 0.6
        res = capsule_occupancy(vgrid, seg)
        if res is not None:
            box, occ = res
            v = vol[box]
            v += occ * (wall_hu - v)
        lumen = seg.copy()
        lumen[6:8] -= wall
        res = capsule_occupancy(vgrid, lumen)
        if res is not None:
            box, occ = res
            v = vol[box]
            v += occ * (-1000.0 - v)

    return vessels, airways


def generate_volume(seed: int, config: PhantomConfig | None = None, case_id: str | None = None) -> PhantomVolume:
    config = config or PhantomConfig()
    case_id = case_id or default_case_id(seed)
    if config.profile == "wide":
        from ctlesion_phantoms.wide_volume import generate_wide_volume  # imports this module

        return generate_wide_volume(seed, config, case_id)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    r_geo, r_tree, r_nod, r_draw, r_scan, r_air = streams

    pixel_spacing = sample_pixel_spacing(r_geo, config)
    params = an.sample_anatomy(r_geo, config.matrix * pixel_spacing)
    geometry, placement = sample_geometry(r_geo, config, params, pixel_spacing)
    noise_hu = float(r_geo.uniform(*config.noise_hu))
    psf_mm = float(r_geo.uniform(*config.psf_sigma_mm))
    frame = _Frame(geometry, placement)

    vol, lung = _render_anatomy(params, geometry, placement)
    spacing = (geometry.slice_spacing, geometry.pixel_spacing[0], geometry.pixel_spacing[1])
    grid = Grid(shape=vol.shape, spacing=spacing, soft=0.5 * pixel_spacing)
    z_shrink = max(0.0, (geometry.slice_thickness - 1.0) / 4.0)
    vessels, airways = draw_tubes(r_tree, r_air, config, params, frame, vol, lung, grid, z_shrink)

    # nodules
    nodules = _place_nodules(r_nod, r_draw, config, vol, lung, grid, vessels, airways, geometry, placement, frame)
    identity = CaseIdentity.for_seed(seed, case_id)
    apply_scanner(vol, r_scan, noise_hu, psf_mm / pixel_spacing, 0.35 * geometry.slice_thickness / geometry.slice_spacing)
    np.clip(vol, -1024.0, 3071.0, out=vol)
    truth = CaseTruth(
        case_id=case_id,
        seed=seed,
        geometry=geometry,
        nodules=nodules,
        study_instance_uid=identity.study_uid,
        series_instance_uid=identity.series_uid,
        frame_of_reference_uid=identity.frame_of_reference_uid,
        noise_hu=round(noise_hu, 2),
        psf_sigma_mm=round(psf_mm, 3),
        generator_version=GENERATOR_VERSION,
        profile="default",
    )
    return PhantomVolume(hu=vol, lung_mask=lung, truth=truth, vessels=vessels)


def _choice(rng: np.random.Generator, weights: dict[str, float], order: tuple[str, ...]) -> str:
    w = np.array([weights.get(k, 0.0) for k in order], dtype=float)
    return order[int(rng.choice(len(order), p=w / w.sum()))]


def _place_nodules(
    rng: np.random.Generator, r_draw: np.random.Generator, config: PhantomConfig, vol: np.ndarray, lung: np.ndarray,
    grid: Grid, vessels: np.ndarray, airways: np.ndarray, geometry: ScanGeometry, placement: BodyPlacement, frame: _Frame,
) -> list[NoduleTruth]:
    if config.nodules_max == 0 or rng.random() < config.p_no_nodules:
        return []
    count = int(rng.integers(max(config.nodules_min, 1) if config.nodules_max else 0, config.nodules_max + 1))
    placer = Placer(rng, lung, grid, vessels, airways)
    out: list[NoduleTruth] = []
    for _ in range(count):
        kind = _choice(rng, config.type_weights, NODULE_TYPES)
        attachment = _choice(rng, config.attachment_weights, ATTACHMENTS)
        kind, diameter = sample_spec(rng, config, kind, attachment)
        centre = placer.place(attachment, diameter / 2)
        if centre is None and attachment != "isolated":
            attachment = "isolated"
            centre = placer.place(attachment, diameter / 2)
        if centre is None:
            continue  # no room (e.g. a small partial scan): fewer nodules, never a wrong truth
        spec = make_spec(rng, kind, attachment, diameter, centre)
        draw_nodule(r_draw, vol, grid, spec)
        kij = centre / np.asarray(grid.spacing)
        mm = geometry.voxel_to_mm(kij)
        side_x = placement.to_body(mm)[0]
        out.append(
            NoduleTruth(
                nodule_id=len(out) + 1,
                centre_mm=tuple(float(round(v, 3)) for v in mm),
                centre_voxel=tuple(float(round(v, 3)) for v in kij),
                diameter_mm=round(diameter, 2),
                type=kind,
                attachment=attachment,
                mean_hu=round(spec.mean_hu(), 1),
                core_diameter_mm=None if spec.core_diameter is None else round(spec.core_diameter, 2),
                side="left" if side_x > 0 else "right",
            )
        )
    return out
