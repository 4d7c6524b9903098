"""The test generator's patient: a thorax composed of signed distance fields.

Body frame (mm): x to the patient's left, y posterior, z cranial; z = 0 at the lung bases. Lungs
are superquadrics cut by spherical diaphragm domes and by the mediastinum, heart and spine; ribs are
chains of capsules along tilted elliptical arcs; vertebrae stacked capped cylinders; the sternum a
rounded box. Each slice is evaluated on a grid four times coarser than the image and the distance
fields (smooth, so they interpolate well) are upsampled before thresholding: crisp edges at a
sixteenth of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ctlesion_testgen import sdf

COARSE = 4


@dataclass
class Thorax:
    a: float  # body half-width
    b: float  # body half-depth
    n: float  # superellipse exponent of the outline
    fat: float
    muscle: float
    lung_height: float
    dome_top: tuple[float, float]  # right, left dome summit heights
    dome_radius: float
    med_shift: float
    heart_c: tuple[float, float, float]
    heart_r: tuple[float, float, float]
    heart_angle: float
    spine_y: float
    spine_r: float
    vert_period: float
    ribs: list[np.ndarray] = field(default_factory=list)  # per rib [P, 3] polyline
    rib_r: float = 4.0
    lung_hu: float = -850.0
    lung_gradient: float = 40.0
    hu: dict[str, float] = field(default_factory=dict)

    @property
    def cavity(self) -> tuple[float, float]:
        inset = self.fat + self.muscle + 11.0
        return self.a - inset, self.b - inset

    def hilum(self, side: float) -> np.ndarray:
        return np.array([side * (30.0 + 0.06 * self.a), -0.02 * self.b, 0.55 * self.lung_height])


def sample_thorax(rng: np.random.Generator) -> Thorax:
    a = rng.uniform(135, 185)
    b = a * rng.uniform(0.62, 0.78)
    H = rng.uniform(200, 280)
    t = Thorax(
        a=a, b=b, n=rng.uniform(2.2, 3.0), fat=rng.uniform(5, 30), muscle=rng.uniform(8, 14), lung_height=H,
        dome_top=(H * rng.uniform(0.2, 0.32), H * rng.uniform(0.14, 0.26)), dome_radius=rng.uniform(95, 140),
        med_shift=rng.uniform(-6, 8),
        heart_c=(rng.uniform(15, 30), -b * rng.uniform(0.15, 0.3), H * rng.uniform(0.25, 0.33)),
        heart_r=(rng.uniform(55, 70), rng.uniform(42, 52), H * rng.uniform(0.2, 0.26)), heart_angle=np.deg2rad(rng.uniform(20, 40)),
        spine_y=0.0, spine_r=rng.uniform(15, 19), vert_period=rng.uniform(23, 28),
        lung_hu=rng.uniform(-880, -830), lung_gradient=rng.uniform(20, 70),
    )
    ca, cb = t.cavity
    t.spine_y = cb - t.spine_r - 4.0
    t.rib_r = rng.uniform(3.2, 4.3)
    period = rng.uniform(22, 28)
    drop = rng.uniform(60, 100)
    for i in range(12):
        z_post = H + 15 - i * period
        for side in (-1.0, 1.0):
            ang = np.linspace(np.deg2rad(80), np.deg2rad(-55), 8)  # posterior (y > 0) to anterolateral
            x = side * (ca + 7.0) * np.cos(ang) * 1.02
            y = (cb + 7.0) * np.sin(ang)
            z = z_post - drop * np.linspace(0, 1, len(ang)) ** 1.3
            t.ribs.append(np.stack([x, y, z], axis=1))
    t.hu = {
        "fat": rng.uniform(-110, -85), "muscle": rng.uniform(35, 60), "medfat": rng.uniform(-95, -60),
        "liver": rng.uniform(45, 70), "blood": rng.uniform(30, 50), "cortex": rng.uniform(650, 1000),
        "marrow": rng.uniform(150, 280), "table": rng.uniform(-300, 100),
    }
    return t


def _fields(t: Thorax, x: np.ndarray, y: np.ndarray, z: float) -> dict[str, np.ndarray]:
    """Coarse distance fields of every tissue at height z."""
    H = t.lung_height
    s = 1.0 - 0.06 * ((z - 0.5 * H) / H) ** 2
    body = sdf.superellipse(x, y, t.a * s, t.b * s, t.n)
    inner = sdf.superellipse(x, y, t.a * s - t.fat, t.b * s - t.fat, t.n)
    ca, cb = t.cavity
    cavity = sdf.superellipse(x, y, ca * s, cb * s, t.n)
    out: dict[str, np.ndarray] = {"body": body, "muscle": inner, "cavity": cavity}
    # lungs: superquadrics, minus domes, mediastinum, heart, spine
    lungs = []
    for side, dome in ((-1.0, t.dome_top[0]), (1.0, t.dome_top[1])):
        c = (side * 0.5 * ca + t.med_shift * 0.5, 0.05 * cb, 0.52 * H)
        lq = sdf.superquadric(x - c[0], y - c[1], z - c[2], (0.47 * ca, 0.9 * cb, 0.56 * H), 2.6, 2.2)
        dome_sphere = sdf.sphere(x, y, z, (side * 0.45 * ca, -0.15 * cb, dome - t.dome_radius), t.dome_radius)
        lungs.append(sdf.subtract(lq, dome_sphere - 2.0))
    lung = np.minimum(*lungs)
    med = sdf.box(x, y, z, (t.med_shift, -0.2 * cb, 0.75 * H), (18.0 + 8.0 * (z < 0.55 * H), 0.8 * cb, 0.4 * H))
    heart = sdf.ellipsoid(x, y, z, t.heart_c, t.heart_r, t.heart_angle)
    spine = sdf.cylinder_z(x, y, z, 0.0, t.spine_y, t.spine_r + 6.0, -100, H + 100)
    aorta_d = sdf.cylinder_z(x, y, z, t.spine_r + 8.0, t.spine_y - t.spine_r, 11.0, -80, 0.8 * H)
    arch_a, arch_b = np.array([t.spine_r + 8.0, t.spine_y - t.spine_r, 0.8 * H]), np.array([-5.0, -0.35 * cb, 0.86 * H])
    arch = sdf.capsule(x, y, z, arch_a, arch_b, 11.5)
    asc = sdf.capsule(x, y, z, arch_b, np.array([0.0, -0.3 * cb, t.heart_c[2] + 0.8 * t.heart_r[2]]), 13.0)
    svc = sdf.cylinder_z(x, y, z, -24.0 + t.med_shift, -0.2 * cb, 9.0, 0.45 * H, H + 40)
    blood = np.minimum(np.minimum(np.minimum(heart, aorta_d), np.minimum(arch, asc)), svc)
    lung = sdf.subtract(lung, sdf.smooth_union(med, blood - 3.0, 8.0))
    lung = sdf.subtract(lung, spine)
    out["lung"] = np.maximum(lung, cavity + 1.0)  # lungs stay inside the rib cage
    out["blood"] = np.maximum(blood, cavity)
    # liver and upper abdomen: the cavity below the right dome (and the left, lower)
    dome_r = sdf.sphere(x, y, z, (-0.45 * ca, -0.15 * cb, t.dome_top[0] - t.dome_radius), t.dome_radius)
    dome_l = sdf.sphere(x, y, z, (0.45 * ca, -0.15 * cb, t.dome_top[1] - t.dome_radius), t.dome_radius)
    out["liver"] = np.maximum(np.minimum(dome_r, dome_l), cavity)
    # bones
    phase = np.mod(z, t.vert_period)
    in_disc = phase < 5.0
    vb = sdf.cylinder_z(x, y, z, 0.0, t.spine_y, t.spine_r, -1e3, 1e3)
    canal_y = t.spine_y + t.spine_r + 8.0
    arch_bone = sdf.subtract(sdf.box(x, y, z, (0.0, canal_y + 4.0, z), (14.0, 12.0, 10.0)), sdf.cylinder_z(x, y, z, 0.0, canal_y, 7.0, -1e3, 1e3))
    spinous = sdf.box(x, y, z, (0.0, canal_y + 24.0, z), (3.5, 14.0, 10.0))
    bone = np.minimum(arch_bone, spinous)
    if not in_disc:
        bone = np.minimum(bone, vb)
    out["disc"] = vb if in_disc else np.full_like(vb, 50.0)
    ribs = np.full_like(x, 50.0)
    for poly in t.ribs:
        zmin, zmax = poly[:, 2].min() - 8, poly[:, 2].max() + 8
        if not zmin <= z <= zmax:
            continue
        for a, b_ in zip(poly[:-1], poly[1:], strict=True):
            if min(a[2], b_[2]) - 6 <= z <= max(a[2], b_[2]) + 6:
                ribs = np.minimum(ribs, sdf.capsule(x, y, z, a, b_, t.rib_r))
    bone = np.minimum(bone, ribs)
    if 0.35 * H < z < 0.95 * H:
        bone = np.minimum(bone, sdf.box(x, y, z, (0.0, -cb - 5.0, z), (11.0, 5.0, 10.0)))
    out["bone"] = bone
    return out


def _linear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] linear interpolation from n_in samples to n_out, ends aligned."""
    pos = np.linspace(0, n_in - 1, n_out)
    i0 = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - i0
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1 - frac
    m[np.arange(n_out), i0 + 1] = frac
    return m


def _gather(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower neighbour index and its weight for linear interpolation, ends aligned."""
    pos = np.linspace(0, n_in - 1, n_out)
    i0 = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    return i0, (1 - (pos - i0)).astype(np.float32)


class SliceRenderer:
    """Renders one axial slice (HU, lung mask) of a Thorax on an image grid."""

    def __init__(self, t: Thorax, x_mm: np.ndarray, y_mm: np.ndarray, pixel: float) -> None:
        self.t, self.pixel = t, pixel
        self.n_rows, self.n_cols = len(y_mm), len(x_mm)
        mr = (self.n_rows - 1) // COARSE + 1
        mc = (self.n_cols - 1) // COARSE + 1
        self.cx, self.cy = np.meshgrid(np.linspace(x_mm[0], x_mm[-1], mc), np.linspace(y_mm[0], y_mm[-1], mr))
        self.up_r, self.up_c = _linear_matrix(self.n_rows, mr), _linear_matrix(self.n_cols, mc).T
        self.g_r0, self.g_rw = _gather(self.n_rows, mr)
        self.g_c0, self.g_cw = _gather(self.n_cols, mc)
        self.fx, self.fy = np.meshgrid(x_mm, y_mm)
        top = t.b * 1.02 + 4.0
        yt = self.fy - (top + 0.0015 * self.fx**2)
        self.table = ((yt > 0) & (yt < 3)) | ((yt > 22) & (yt < 25))
        self.table &= np.abs(self.fx) < 1.3 * t.a
        self.gradient = np.clip((self.fy + t.b) / (2 * t.b), 0, 1) ** 2 * t.lung_gradient

    def _up(self, f: np.ndarray) -> np.ndarray:
        """Bilinear upsampling: two small matrix products for large images, gathers for small ones."""
        f = f.astype(np.float32)
        if self.n_rows > 256:
            return self.up_r @ f @ self.up_c
        a = f[self.g_r0] * self.g_rw[:, None] + f[self.g_r0 + 1] * (1 - self.g_rw)[:, None]
        return a[:, self.g_c0] * self.g_cw[None] + a[:, self.g_c0 + 1] * (1 - self.g_cw)[None]

    def render(self, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(HU float32 [H, W], lung fraction float32 [H, W], coarse lung distance [h, w])."""
        t, px = self.t, self.pixel
        f = _fields(t, self.cx, self.cy, z)
        hu = np.full((self.n_rows, self.n_cols), -1000.0, dtype=np.float32)
        hu[self.table] = t.hu["table"]

        def paint(name: str, value: float | np.ndarray, offset: float = 0.0) -> np.ndarray:
            if float(f[name].min()) + offset > 4.0 * COARSE * px:  # nowhere near this slice
                return np.zeros(hu.shape, np.float32)
            occ = sdf.occupancy(self._up(f[name]) + offset, px)
            hu[...] = hu + occ * (value - hu)
            return occ

        paint("body", t.hu["fat"])
        paint("muscle", t.hu["muscle"])
        paint("cavity", t.hu["medfat"])
        paint("liver", t.hu["liver"])
        lung = paint("lung", t.lung_hu + self.gradient)
        paint("blood", t.hu["blood"])
        paint("disc", 90.0)
        paint("bone", t.hu["cortex"])
        paint("bone", t.hu["marrow"], offset=1.8)
        return hu, lung, f["lung"]
