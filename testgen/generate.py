"""One test case: thorax (body.py), trees (trees.py), nodules (lesions.py), FBP noise (noise.py), DICOM.

Layout written (what ``ctlesion evaluate --cases-dir`` reads): DIR/<case_id>/series/*.dcm,
DIR/<case_id>/truth.json (the project's truth schema, written here by its own code) and
DIR/manifest.json with the seed of the first case and one entry per case.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ctlesion_testgen import body, lesions, noise, trees
from ctlesion_testgen.dicom import SeriesLayout, write_series

VERSION = "ctlesion-testgen 1"
TESTGEN_SEED = 7_000_000  # its own seed range: case i of a set is TESTGEN_SEED + i (never a phantom seed)
KERNELS = {"soft": ("hann", 0.55), "standard": ("shepp-logan", 0.75), "sharp": ("ram-lak", 1.0)}  # window, MTF cut


@dataclass
class TestgenConfig:
    matrix: int = 512
    pixel_mm: tuple[float, float] = (0.6, 0.9)
    spacings_mm: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 2.5)
    slices_max: int = 400
    nodules: tuple[int, int] = (1, 6)
    p_no_nodules: float = 0.1
    diameter_mm: tuple[float, float] = (4.0, 28.0)
    kind_weights: dict[str, float] = field(default_factory=lambda: {"solid": 0.45, "part_solid": 0.15, "ground_glass": 0.25, "calcified": 0.15})
    noise_hu: tuple[float, float] = (12.0, 55.0)
    noise_zones: int = 2
    realisations: int = 3
    attractors_per_tree: int = 2600
    profile_step_mm: float = 1.25  # thick slices: mean of samples this far apart across the thickness

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TestgenConfig:
        d = dict(d)
        for k in ("pixel_mm", "spacings_mm", "nodules", "diameter_mm", "noise_hu"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def case_id_of(seed: int) -> str:
    return f"tg{seed:08d}"


@dataclass
class _Scan:
    rows: int
    pixel: float
    spacing: float
    thickness: float
    slices: int
    z0_body: float  # body z of slice 0
    origin: tuple[float, float, float]  # patient mm of voxel (0, 0, 0)
    body_offset: np.ndarray  # patient = body + offset
    kernel: str
    noise_hu: float


def _protocol(rng: np.random.Generator, cfg: TestgenConfig, t: body.Thorax) -> _Scan:
    pixel = float(np.round(rng.uniform(*cfg.pixel_mm), 4))
    n = cfg.matrix
    spacing = float(rng.choice(cfg.spacings_mm))
    thickness = spacing if rng.random() < 0.6 else float(min(5.0, spacing * rng.choice([1.5, 2.0])))
    z_lo, z_hi = -rng.uniform(10, 35), t.lung_height + rng.uniform(5, 25)
    slices = min(cfg.slices_max, int((z_hi - z_lo) / spacing) + 1)
    if slices == cfg.slices_max:  # a partial scan: somewhere over the lungs
        z_lo = float(rng.uniform(z_lo, max(z_lo, z_hi - (slices - 1) * spacing)))
    offset = np.array([rng.uniform(-25, 25), rng.uniform(-40, 0), rng.uniform(-500, -100)])
    centre = np.array([rng.uniform(-15, 15), rng.uniform(-15, 15)])  # image centre, body frame
    x0, y0 = centre - (n - 1) / 2 * pixel
    origin = (float(x0 + offset[0]), float(y0 + offset[1]), float(round(z_lo + offset[2], 3)))
    kernel = str(rng.choice(list(KERNELS), p=[0.3, 0.45, 0.25]))
    return _Scan(n, pixel, spacing, float(round(thickness, 3)), slices, z_lo, origin, offset, kernel, float(rng.uniform(*cfg.noise_hu)))


def _mtf_blur(sl: np.ndarray, pixel: float, cut: float) -> np.ndarray:
    """Butterworth-like MTF in the Fourier domain (cut = fraction of Nyquist at 50 %)."""
    h, w = sl.shape
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2) / 0.5
    mtf = 1.0 / (1.0 + (f / (cut * 0.6)) ** 4)
    return np.fft.irfft2(np.fft.rfft2(sl) * mtf, s=(h, w)).astype(np.float32)


def _choose(rng: np.random.Generator, weights: dict[str, float]) -> str:
    k = list(weights)
    p = np.array([weights[x] for x in k], float)
    return k[int(rng.choice(len(k), p=p / p.sum()))]


@dataclass
class TestCase:
    vol: np.ndarray  # HU [Z, H, W], ascending z (before the writer's padding)
    lung: np.ndarray  # bool [Z, H, W], the lungs before trees and nodules
    truth: dict[str, Any]  # the project's truth.json schema
    layout: SeriesLayout  # how the series is encoded


def build_case(seed: int, cfg: TestgenConfig) -> TestCase:
    """One case in memory."""
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, 0x7E57]).spawn(6)]
    r_body, r_scan, r_tree, r_nod, r_noise, r_write = rngs
    t = body.sample_thorax(r_body)
    contrast = bool(r_body.random() < 0.3)
    if contrast:
        t.hu["blood"] = float(r_body.uniform(150, 320))
    sc = _protocol(r_scan, cfg, t)
    n, px = sc.rows, sc.pixel
    xs = sc.origin[0] - sc.body_offset[0] + np.arange(n) * px  # body-frame x of each column
    ys = sc.origin[1] - sc.body_offset[1] + np.arange(n) * px
    renderer = body.SliceRenderer(t, xs, ys, px)
    sub = max(1, math.ceil(sc.thickness / cfg.profile_step_mm - 1e-9))
    offs = (np.arange(sub) - (sub - 1) / 2) * (sc.thickness / sub)
    vol = np.empty((sc.slices, n, n), np.float32)
    lung = np.empty((sc.slices, n, n), bool)
    coarse = []
    for k in range(sc.slices):
        z = sc.z0_body + k * sc.spacing
        acc_hu, acc_lung = None, None
        for o in offs:  # the slice profile: mean of thin samples across the thickness
            hu, lf, lc = renderer.render(z + o)
            acc_hu = hu if acc_hu is None else acc_hu + hu
            acc_lung = lf if acc_lung is None else acc_lung + lf
            if o == offs[len(offs) // 2]:
                coarse.append(lc)
        vol[k] = acc_hu / sub
        lung[k] = acc_lung / sub > 0.5
    spacing = (sc.spacing, px, px)
    lung_c = np.stack(coarse) < 0  # coarse lung mask (every 4th pixel)
    cstep = (n - 1) / (lung_c.shape[1] - 1)

    def to_vol(p_body: np.ndarray) -> np.ndarray:  # body (x, y, z) -> volume mm (z, y, x)
        p = np.atleast_2d(p_body)
        return np.column_stack([(p[:, 2] - sc.z0_body), (p[:, 1] - ys[0]), (p[:, 0] - xs[0])])

    # vessel and airway trees, grown into each lung separately
    idx = np.argwhere(lung_c)
    pts = np.column_stack([idx[:, 0] * sc.spacing, idx[:, 1] * cstep * px, idx[:, 2] * cstep * px])
    mid_col = (t.med_shift - xs[0]) / px
    segs_v, segs_air = [], []
    vessel_nodes = []
    for side in (-1.0, 1.0):
        mine = pts[(pts[:, 2] / px < mid_col) == (side < 0)]
        if len(mine) < 50:
            continue
        hil = to_vol(t.hilum(side))[0]
        atrium = to_vol(np.array([t.heart_c[0] + side * 20.0, t.heart_c[1] + 0.7 * t.heart_r[1], t.heart_c[2] + 0.5 * t.heart_r[2]]))[0]
        for root, r_leaf in ((hil, 0.42), (atrium, 0.4)):
            att = mine[r_tree.choice(len(mine), size=min(cfg.attractors_per_tree, len(mine)), replace=False)]
            att = att + r_tree.uniform(-2, 2, size=att.shape)
            tr = trees.grow(r_tree, root[None], att, r_leaf=r_leaf, r_max=6.5, step=3.5, kill=4.5)
            segs_v.append(tr.segments())
            vessel_nodes.append(np.column_stack([tr.nodes, tr.radius]))
        att = mine[r_tree.choice(len(mine), size=min(250, cfg.attractors_per_tree // 4, len(mine)), replace=False)]
        tr = trees.grow(r_tree, hil[None] + np.array([0.0, 12.0, 0.0]), att, r_leaf=0.7, r_max=7.0, step=5.0, kill=9.0)
        seg = tr.segments()
        segs_air.append(seg[np.maximum(seg[:, 6], seg[:, 7]) > 1.1])
    carina = to_vol(np.array([t.med_shift, t.spine_y - t.spine_r - 14.0, 0.62 * t.lung_height]))[0]
    top = carina + np.array([0.45 * t.lung_height + 60.0, 0.0, 0.0])
    r_tr = float(r_tree.uniform(7, 10))
    trachea = np.array([np.r_[top, carina, r_tr, r_tr]] + [np.r_[carina, to_vol(t.hilum(s))[0] + np.array([0.0, 12.0, 0.0]), 0.7 * r_tr, 0.6 * r_tr] for s in (-1.0, 1.0)])
    for s_arr in segs_v:
        trees.draw_segments(vol, spacing, s_arr, t.hu["blood"], lung=lung)
    air = np.vstack([trachea, *segs_air]) if segs_air else trachea
    walls = air.copy()
    walls[:, 6:8] += 0.6 + 0.12 * walls[:, 6:8]
    trees.draw_segments(vol, spacing, walls, float(r_tree.uniform(-60, 30)), mode="set")
    trees.draw_segments(vol, spacing, air, -1000.0, mode="set")

    # nodules: depth below the pleura from the coarse mask, clearance from the vessel centrelines
    depth = ndimage.distance_transform_edt(lung_c, sampling=(sc.spacing, cstep * px, cstep * px))
    nodes = np.vstack(vessel_nodes) if vessel_nodes else np.zeros((0, 4))
    kd = cKDTree(nodes[:, :3]) if len(nodes) else None
    truth_nodules: list[dict[str, Any]] = []
    count = 0 if r_nod.random() < cfg.p_no_nodules else int(r_nod.integers(cfg.nodules[0], cfg.nodules[1] + 1))
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(count):
        kind = _choose(r_nod, cfg.kind_weights)
        lo, hi = cfg.diameter_mm
        d = float(np.exp(r_nod.uniform(np.log(max(lo, 6.0 if kind == "part_solid" else lo)), np.log(hi))))
        if kind == "calcified":
            d = min(d, 12.0)
        attach = _choose(r_nod, {"isolated": 0.5, "juxtavascular": 0.25, "juxtapleural": 0.25})
        centre = None
        for _try in range(400):
            c = pts[r_nod.integers(len(pts))] + r_nod.uniform(-2, 2, 3) if len(pts) else None
            if c is None:
                break
            ci = np.clip(np.round(c / np.array([sc.spacing, cstep * px, cstep * px])).astype(int), 0, np.array(depth.shape) - 1)
            dep = float(depth[tuple(ci)])
            if attach == "juxtapleural":
                ok = 0.4 * d / 2 < dep < 0.8 * d / 2 + 1.0
            elif attach == "juxtavascular" and kd is not None:
                near = kd.query_ball_point(c, d / 2 + 6.0)
                cand = [j for j in near if 1.0 <= nodes[j, 3] <= 4.5]
                if not cand:
                    continue
                v = nodes[cand[int(r_nod.integers(len(cand)))]]
                u = r_nod.normal(size=3)
                u /= np.linalg.norm(u)
                c = v[:3] + u * (v[3] + 0.7 * d / 2)
                ci = np.clip(np.round(c / np.array([sc.spacing, cstep * px, cstep * px])).astype(int), 0, np.array(depth.shape) - 1)
                ok = float(depth[tuple(ci)]) > d / 2 + 1.0
            else:
                clear = kd is None or kd.query(c)[0] > d / 2 + 2.5
                ok = dep > d / 2 + 3.0 and clear
            if ok and 0.3 * d < c[0] < (sc.slices - 1) * sc.spacing - 0.3 * d and all(np.linalg.norm(c - p) > (d + q) / 2 + 4 for p, q in placed):
                centre = c
                break
        if centre is None:
            continue
        drawn = lesions.draw_nodule(r_nod, vol, spacing, centre, d, kind)
        if drawn is None:
            continue
        placed.append((centre, d))
        kij = drawn.centre / np.asarray(spacing)
        mm = (sc.origin[0] + kij[2] * px, sc.origin[1] + kij[1] * px, sc.origin[2] + kij[0] * sc.spacing)
        truth_nodules.append({
            "nodule_id": len(truth_nodules) + 1,
            "centre_mm": [round(float(v), 3) for v in mm],
            "centre_voxel": [round(float(v), 3) for v in kij],
            "diameter_mm": round(drawn.diameter, 2),
            "type": "solid" if kind == "calcified" else kind,
            "attachment": attach,
            "mean_hu": round(drawn.mean_hu, 1),
            "core_diameter_mm": None,
            "side": "left" if mm[0] - sc.body_offset[0] > t.med_shift else "right",
            "subtype": "calcified" if kind == "calcified" else "",
            "margin": drawn.margin,
            "is_mass": drawn.diameter > 30.0,
        })

    # imaging: MTF, then FBP noise of the anatomy zone by zone
    window, cut = KERNELS[sc.kernel]
    for k in range(sc.slices):
        vol[k] = _mtf_blur(vol[k], px, cut)
    zones = np.array_split(np.arange(sc.slices), max(1, min(cfg.noise_zones, sc.slices)))
    for zone in zones:
        real = noise.noise_realisations(r_noise, vol[zone[len(zone) // 2]], px, cfg.realisations, window)
        for k in zone:
            wts = r_noise.normal(size=len(real))
            wts /= np.linalg.norm(wts)
            sh = r_noise.integers(-24, 25, size=(len(real), 2))
            layer = sum(w * np.roll(r_, tuple(s), axis=(0, 1)) for w, r_, s in zip(wts, real, sh, strict=True))
            vol[k] += np.float32(sc.noise_hu) * layer
    np.clip(vol, -1024, 3071, out=vol)

    layout = SeriesLayout.sample(r_write)
    truth = {
        "case_id": case_id_of(seed),
        "seed": seed,
        "geometry": {
            "rows": n, "columns": n, "slices": sc.slices, "pixel_spacing": [px, px], "slice_spacing": sc.spacing,
            "slice_thickness": sc.thickness, "origin": list(sc.origin), "orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        },
        "nodules": truth_nodules,
        "noise_hu": round(sc.noise_hu, 2),
        "psf_sigma_mm": 0.0,
        "generator_version": VERSION,
        "profile": "testgen",
        "scanner": {"kernel": sc.kernel, "contrast": contrast, "layout": asdict(layout), "noise_model": "fbp-poisson"},
    }
    return TestCase(vol, lung, truth, layout)


def generate_case(seed: int, out_dir: Path, cfg: TestgenConfig | None = None) -> dict[str, Any]:
    cfg = cfg or TestgenConfig()
    case = build_case(seed, cfg)
    truth = case.truth
    case_dir = Path(out_dir) / truth["case_id"]
    write_series(case.vol, truth, case_dir / "series", case.layout)
    (case_dir / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def generate_set(out_dir: Path, cases: int, seed: int = TESTGEN_SEED, cfg: TestgenConfig | None = None,
                 on_case: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Cases seed..seed+cases-1 and DIR/manifest.json in the layout ``ctlesion evaluate --cases-dir`` reads."""
    cfg = cfg or TestgenConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(seed, seed + cases):
        t0 = time.perf_counter()
        truth = generate_case(s, out, cfg)
        entry = {
            "case_id": truth["case_id"], "seed": s, "series_dir": f"{truth['case_id']}/series", "truth": f"{truth['case_id']}/truth.json",
            "slices": truth["geometry"]["slices"], "nodules": len(truth["nodules"]), "seconds": round(time.perf_counter() - t0, 2),
        }
        entries.append(entry)
        if on_case:
            on_case(entry)
    manifest = {"generator_version": VERSION, "seed": seed, "config": asdict(cfg), "cases": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
