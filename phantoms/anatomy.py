"""Large-scale chest anatomy, rendered slice by slice from per-case shape parameters.

Frame: "body mm" = patient LPS mm shifted so the body centre is (0, 0) in-plane and the lowest lung
base is z = 0 (x to the patient's left, y posterior, z cranial). Every in-plane field that does not
depend on z is computed once per case; a slice then costs a few comparisons per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# tissue labels; HU per label is drawn per case in sample_hu()
AIR, FAT, MUSCLE, CORTEX, MARROW, CARTILAGE, LUNG, MED_FAT, BLOOD, LIVER, CSF, DISC, SHELL, FOAM, PAD = range(15)
N_LABELS = 15


@dataclass
class AnatomyParams:
    """Shape of one synthetic patient (mm, body frame)."""

    half_width: float  # A: body half-width (x)
    half_depth: float  # B: body half-depth (y)
    exponent: float  # superellipse exponent of the body outline
    harmonics: np.ndarray  # [K, 2] (amplitude, phase) of the outline's angular wobble
    roll_deg: float  # patient rotation about z
    fat_mm: float
    muscle_mm: float
    posterior_muscle_mm: float  # extra paraspinal muscle
    rib_zone_mm: float
    lung_height: float  # H: lung base (z=0) to apex
    apex_offsets: tuple[float, float]  # apex height offset right, left
    apex_curvature: float  # radius of the apical paraboloid
    dome_height: tuple[float, float]  # diaphragm dome height right, left
    dome_base: tuple[float, float]  # costophrenic level right, left
    mediastinum_half_width: float
    mediastinum_shift: float  # x of the midline of the mediastinum
    heart_centre: tuple[float, float, float]
    heart_axes: tuple[float, float, float]
    heart_angle_deg: float
    vertebra_y: float
    vertebra_radius: float
    vertebra_period: float
    rib_period: float
    rib_drop: float  # how much lower the anterior end of a rib lies than the posterior end
    rib_height: float
    rib_thickness: float
    rib_phase: float
    table_gap: float
    lung_gradient_hu: float  # gravity-dependent density: posterior lung is denser
    hu: np.ndarray  # [N_LABELS] HU per label

    @property
    def hilum_z(self) -> float:
        return 0.5 * self.lung_height

    @property
    def carina_z(self) -> float:
        return 0.62 * self.lung_height


def sample_hu(rng: np.random.Generator) -> np.ndarray:
    hu = np.zeros(N_LABELS, dtype=np.float32)
    hu[AIR] = -1000
    hu[FAT] = rng.uniform(-115, -85)
    hu[MUSCLE] = rng.uniform(35, 60)
    hu[CORTEX] = rng.uniform(700, 1100)
    hu[MARROW] = rng.uniform(150, 300)
    hu[CARTILAGE] = rng.uniform(80, 160)
    hu[LUNG] = rng.uniform(-885, -820)
    hu[MED_FAT] = hu[FAT] + rng.uniform(0, 25)
    hu[BLOOD] = rng.uniform(30, 50)
    hu[LIVER] = rng.uniform(45, 70)
    hu[CSF] = rng.uniform(5, 20)
    hu[DISC] = rng.uniform(70, 110)
    hu[SHELL] = rng.uniform(150, 400)
    hu[FOAM] = rng.uniform(-950, -850)
    hu[PAD] = rng.uniform(-900, -700)
    return hu


def sample_anatomy(rng: np.random.Generator, fov_mm: float) -> AnatomyParams:
    """A patient that fits the field of view (small pixel spacing <=> small patient, as scanners set it)."""
    half_width = fov_mm * rng.uniform(0.36, 0.45)
    half_depth = half_width * rng.uniform(0.6, 0.78)
    fat = rng.uniform(4, 28) * half_width / 170
    muscle = rng.uniform(7, 14)
    lung_height = rng.uniform(0.95, 1.35) * half_width * 1.25
    vr = rng.uniform(14, 19)
    return AnatomyParams(
        half_width=half_width,
        half_depth=half_depth,
        exponent=rng.uniform(2.0, 2.6),
        harmonics=np.stack([rng.uniform(0, 0.025, 5), rng.uniform(0, 2 * np.pi, 5)], axis=1),
        roll_deg=rng.uniform(-4, 4),
        fat_mm=fat,
        muscle_mm=muscle,
        posterior_muscle_mm=rng.uniform(18, 32),
        rib_zone_mm=rng.uniform(9, 12),
        lung_height=lung_height,
        apex_offsets=(rng.uniform(-8, 4), rng.uniform(-8, 4)),
        apex_curvature=rng.uniform(80, 120),
        dome_height=(rng.uniform(45, 75), rng.uniform(35, 65)),
        dome_base=(rng.uniform(5, 20), rng.uniform(0, 10)),
        mediastinum_half_width=rng.uniform(20, 30),
        mediastinum_shift=rng.uniform(-8, 6),
        heart_centre=(rng.uniform(12, 30), -half_depth * rng.uniform(0.12, 0.28), lung_height * rng.uniform(0.22, 0.3)),
        heart_axes=(rng.uniform(52, 68), rng.uniform(40, 52), lung_height * rng.uniform(0.26, 0.33)),
        heart_angle_deg=rng.uniform(20, 45),
        vertebra_y=half_depth * rng.uniform(0.38, 0.5),
        vertebra_radius=vr,
        vertebra_period=rng.uniform(22, 28),
        rib_period=rng.uniform(22, 30),
        rib_drop=rng.uniform(95, 135),
        rib_height=rng.uniform(8, 12),
        rib_thickness=rng.uniform(5.5, 8),
        rib_phase=rng.uniform(0, 30),
        table_gap=rng.uniform(0, 3),
        lung_gradient_hu=rng.uniform(20, 70),
        hu=sample_hu(rng),
    )


class AnatomyRenderer:
    """Precomputes the z-independent in-plane fields of one case; ``render(z)`` gives one slice."""

    def __init__(self, params: AnatomyParams, x: np.ndarray, y: np.ndarray) -> None:
        """x, y: body-frame mm of the pixel grid, each [H, W] (before the patient's roll)."""
        p = params
        self.p = p
        a = np.deg2rad(p.roll_deg)
        xr = (np.cos(a) * x + np.sin(a) * y).astype(np.float32)
        yr = (-np.sin(a) * x + np.cos(a) * y).astype(np.float32)
        self.x, self.y = xr, yr
        r = np.hypot(xr, yr) + 1e-3
        theta = np.arctan2(yr, xr)  # 0 = patient left, +pi/2 = posterior
        wobble = 1.0 + sum(amp * np.cos((k + 2) * theta + ph) for k, (amp, ph) in enumerate(p.harmonics))
        # superellipse "radius" is 1-homogeneous, so r / rho is the outline's radius along the ray
        rho = ((np.abs(xr) / p.half_width) ** p.exponent + (np.abs(yr) / p.half_depth) ** p.exponent) ** (1 / p.exponent)
        rho = rho / wobble
        self.outline_r = (r / np.maximum(rho, 1e-6)).astype(np.float32)
        self.r = r.astype(np.float32)
        post = np.clip(np.sin(theta), 0, None) ** 3
        self.t_fat = (p.fat_mm * (1 + 0.35 * np.cos(theta + 0.5))).astype(np.float32)
        self.t_muscle = self.t_fat + (p.muscle_mm + p.posterior_muscle_mm * post).astype(np.float32)
        self.t_cavity = self.t_muscle + p.rib_zone_mm
        self.table_top = p.half_depth * 0.93 + p.table_gap
        self.below_table = yr >= self.table_top - 0.0012 * xr**2 - p.table_gap
        # ribs: angle from the spine, 0 posterior .. 1 anterior; anterior ends lie lower
        u = np.abs(np.arctan2(xr, yr)) / np.pi  # 0 at posterior midline, 1 anterior midline
        self.rib_shift = (p.rib_drop * u + p.rib_phase).astype(np.float32)
        self.rib_angle_ok = (u > 0.08) & (u < 0.8)
        self.cartilage_angle = (u >= 0.8) & (u < 0.93)
        # ribs live in a thin ring: evaluate them only there (the body scales by <= 6 % over z)
        depth0 = self.outline_r - self.r
        ring = (depth0 > self.t_muscle - 0.07 * self.outline_r) & (depth0 < self.t_muscle + p.rib_thickness + 3)
        ring &= self.rib_angle_ok | self.cartilage_angle
        self.ring_idx = np.flatnonzero(ring)
        self.ring_muscle = self.t_muscle.ravel()[self.ring_idx]
        self.ring_shift = self.rib_shift.ravel()[self.ring_idx]
        self.ring_cartilage = self.cartilage_angle.ravel()[self.ring_idx]
        # lungs
        side = np.where(xr < p.mediastinum_shift, 0, 1)
        apex_x = np.where(side == 0, -1.0, 1.0) * 0.5 * (p.half_width - p.fat_mm - p.muscle_mm)
        apex_h = np.where(side == 0, p.apex_offsets[0], p.apex_offsets[1]) + p.lung_height
        self.z_top = (apex_h - ((xr - apex_x) ** 2 + (yr - 0.15 * p.half_depth) ** 2) / (2 * p.apex_curvature)).astype(np.float32)
        dome_h = np.where(side == 0, p.dome_height[0], p.dome_height[1])
        dome_b = np.where(side == 0, p.dome_base[0], p.dome_base[1])
        # domes peak anteriorly; the posterior costophrenic recesses reach lowest
        ax, ay = 0.5 * p.half_width, 0.8 * p.half_depth
        q = ((xr - apex_x * 0.9) / ax) ** 2 + ((yr + 0.3 * p.half_depth) / ay) ** 2
        self.z_dome = (dome_b + dome_h * np.clip(1 - 0.7 * q, 0, None)).astype(np.float32)
        # mediastinum half-width shrinks anteriorly (anterior junction line) and near the spine
        ant = np.clip(-yr / p.half_depth, 0, 1)
        self.med_dx = (np.abs(xr - p.mediastinum_shift) / (1.0 - 0.45 * ant)).astype(np.float32)
        # heart (rotated ellipse in-plane, ellipsoid in z)
        hx, hy, _ = p.heart_centre
        b = np.deg2rad(p.heart_angle_deg)
        u1 = np.cos(b) * (xr - hx) + np.sin(b) * (yr - hy)
        v1 = -np.sin(b) * (xr - hx) + np.cos(b) * (yr - hy)
        self.heart_q = ((u1 / p.heart_axes[0]) ** 2 + (v1 / p.heart_axes[1]) ** 2).astype(np.float32)
        # spine
        vy, vr = p.vertebra_y, p.vertebra_radius
        d_vb = np.hypot(xr, yr - vy)
        canal_y = vy + vr + 8.0
        d_canal = np.hypot(xr, yr - canal_y)
        self.vb_cortex = d_vb < vr
        self.vb_marrow = d_vb < vr - 1.8
        self.canal = d_canal < 7.5
        arch = (d_canal < 13.0) & ~self.canal & (yr > canal_y - 4)
        spinous = (np.abs(xr) < 3.5) & (yr > canal_y) & (yr < canal_y + 38)
        transverse = (np.abs(yr - canal_y + 2) < 4) & (np.abs(xr) < vr + 16)
        self.post_elems = arch | spinous | transverse
        self.spine_exclusion = (d_vb < vr + 7) | ((np.abs(xr) < vr + 10) & (yr > vy))
        # descending aorta indents the left lung beside the spine
        self.aorta = np.hypot(xr - (0.75 * vr + 12), yr - (vy - 0.8 * vr)) < 12.0
        # sternum
        self.sternum_zone = np.abs(xr) < 14
        self.lung_y_frac = np.clip((yr + p.half_depth) / (2 * p.half_depth), 0, 1).astype(np.float32)
        self.table = self._table(xr, yr)

    def _table(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Curved carbon-fibre table: shells around a foam core, a pad on top."""
        p = self.p
        top = self.table_top - 0.0012 * x**2  # a cradle: the sides rise
        lab = np.full(x.shape, AIR, dtype=np.uint8)
        wide = np.abs(x) < 1.25 * p.half_width
        lab[wide & (y >= top - p.table_gap) & (y < top)] = PAD
        lab[wide & (y >= top) & (y < top + 2.0)] = SHELL
        lab[wide & (y >= top + 2.0) & (y < top + 30.0)] = FOAM
        lab[wide & (y >= top + 30.0) & (y < top + 32.0)] = SHELL
        return lab

    def render(self, z: float) -> tuple[np.ndarray, np.ndarray]:
        """Labels uint8 [H, W] and lung mask bool [H, W] of the slice at body-frame height z."""
        p = self.p
        scale = 1.0 - 0.05 * ((z - 0.45 * p.lung_height) / p.lung_height) ** 2
        depth = self.outline_r * scale - self.r  # mm inside the skin along the ray
        lab = self.table.copy()
        body = (depth > 0) & ~self.below_table
        lab[body] = FAT
        lab[body & (depth > self.t_fat)] = MUSCLE
        cavity = body & (depth > self.t_cavity)
        # ribs: cortex shell around marrow; cartilage at the anterior ends; only where lungs are
        if -20 < z < p.lung_height + 10:
            idx = self.ring_idx
            dep = depth.ravel()[idx] - self.ring_muscle
            w = np.abs(np.mod(z + self.ring_shift, p.rib_period) - p.rib_period / 2)
            in_rib = (dep > 1.0) & (dep < 1.0 + p.rib_thickness) & (w < p.rib_height / 2)
            inner = (dep > 2.5) & (dep < p.rib_thickness - 0.5) & (w < p.rib_height / 2 - 1.5)
            cart = self.ring_cartilage
            flat = lab.ravel()  # a view: writes land in lab
            flat[idx[in_rib & ~cart]] = CORTEX
            flat[idx[in_rib & inner & ~cart]] = MARROW
            flat[idx[in_rib & cart]] = CARTILAGE
        lab[cavity] = MED_FAT
        above_top = z > self.z_top
        lab[cavity & above_top & (z > p.lung_height - 15)] = MUSCLE  # neck / thoracic inlet
        below = cavity & (z < self.z_dome)
        lab[below] = LIVER
        hz, haz = p.heart_centre[2], p.heart_axes[2]
        hz_frac = 1 - ((z - hz) / haz) ** 2
        heart = np.zeros_like(body)
        if hz_frac > 0:
            heart = cavity & (self.heart_q < hz_frac * 1.18)
            lab[heart] = MED_FAT  # epicardial fat
            lab[cavity & (self.heart_q < hz_frac)] = BLOOD
        # mediastinum widens towards the heart
        zt = np.clip((z - 0.35 * p.lung_height) / (0.3 * p.lung_height), 0, 1)
        med_w = p.mediastinum_half_width * (1.35 - 0.45 * zt)
        lung = cavity & ~above_top & ~below & (self.med_dx > med_w) & ~heart & ~self.spine_exclusion
        if z < 0.78 * p.lung_height:
            lab[cavity & self.aorta] = BLOOD
            lung &= ~self.aorta
        lab[lung] = LUNG
        # spine: vertebral bodies with discs every vertebra_period, canal, posterior elements
        in_disc = np.mod(z + 3.0, p.vertebra_period) < 5.0
        lab[self.vb_cortex & body] = DISC if in_disc else CORTEX
        if not in_disc:
            lab[self.vb_marrow & body] = MARROW
        lab[self.post_elems & body & ~self.vb_cortex] = CORTEX
        lab[self.canal & body] = CSF
        if 0.35 * p.lung_height < z < p.lung_height:
            sternum = self.sternum_zone & body & (depth > self.t_muscle - 2) & (depth < self.t_muscle + 9)
            lab[sternum] = CORTEX
            lab[sternum & (depth > self.t_muscle - 0.5) & (depth < self.t_muscle + 7.5)] = MARROW
        return lab, lung

    def lung_hu_offset(self) -> np.ndarray:
        """Gravity-dependent lung density (patient supine: posterior lung is denser) [H, W]."""
        return (self.p.lung_gradient_hu * self.lung_y_frac**2).astype(np.float32)
