"""Profile "wide" (domain randomisation): what one case's scanner and patient are, drawn per seed.

The default profile ties the patient to the field of view and keeps slices thin. Here the patient's
habitus is drawn first, the scanner's protocol next (matrix, field of view, slice spacing and
thickness with overlapping reconstructions, kernel, dose, reconstruction circle, artefacts), so
the two vary independently, as they do between hospitals. Slices thicker than about a millimetre
are rendered on a finer internal z grid and averaged over the slice profile (``integrate_slices``):
partial volume of small nodules and vessels then comes out of the geometry, not a rule of thumb.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ctlesion_phantoms import anatomy as an
from ctlesion_phantoms.config import PhantomConfig
from ctlesion_phantoms.geometry import BodyPlacement, sample_geometry
from ctlesion_phantoms.truth import ScanGeometry

# reconstructed slice spacings seen in practice, 0.625-5 mm
WIDE_SLICE_SPACINGS = (0.625, 0.7, 0.75, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
MAX_INTERNAL_DZ_MM = 1.0  # finest z step a thick slice is integrated from
# kernel -> (in-plane PSF sigma mm range, edge enhancement gain range, noise grain sigma mm range)
KERNELS: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "SOFT": ((0.7, 1.0), (0.0, 0.0), (0.9, 1.4)),
    "STANDARD": ((0.45, 0.7), (0.0, 0.15), (0.6, 0.9)),
    "LUNG": ((0.3, 0.45), (0.3, 0.7), (0.35, 0.55)),
    "BONE": ((0.25, 0.35), (0.6, 1.0), (0.25, 0.4)),
}
KERNEL_WEIGHTS = {"SOFT": 0.2, "STANDARD": 0.35, "LUNG": 0.35, "BONE": 0.1}
# outside the reconstruction circle: GE writes PixelPaddingValue -2000 with intercept -1024 (-3024 HU),
# some series -2048 HU; others fill the corners with air or reconstruct the whole square
PADDING_WEIGHTS = {"none": 0.3, "-3024": 0.35, "-2048": 0.15, "air": 0.2}


@dataclass
class WideScan:
    """The protocol of one wide case (recorded in truth.json ``scanner``)."""

    matrix: int
    pixel_spacing: float
    fov_mm: float
    kernel: str
    psf_sigma_mm: float
    edge_gain: float  # unsharp-mask overshoot of sharp kernels
    noise_hu: float
    noise_grain_mm: float
    low_dose: bool
    noise_anisotropy: float  # 0: isotropic; >0 lateral photon-starvation streakiness
    padding: str  # key of PADDING_WEIGHTS
    circle_scale: float  # reconstruction circle diameter / FOV
    streaks: int  # beam-hardening streak lines
    streak_hu: float
    motion_mm: float  # respiratory blur at the lung bases (0: none)
    ghost: bool  # motion shows as a double contour instead of a blur
    contrast: bool  # iodine contrast: vessels and heart bright
    kvp: int

    @property
    def padding_hu(self) -> float | None:
        return {"-3024": -3024.0, "-2048": -2048.0}.get(self.padding)

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["padding_hu"] = self.padding_hu
        return d


@dataclass
class WideCase:
    scan: WideScan
    params: an.AnatomyParams
    geometry: ScanGeometry  # the written series
    internal: ScanGeometry  # the finer z grid it is rendered on
    placement: BodyPlacement
    z_step: int  # internal slices per output slice
    z_margin: int  # internal slices below output slice 0 (and above the last)
    weights: np.ndarray  # slice-profile weights over internal offsets -z_margin..z_margin


def _pick(rng: np.random.Generator, weights: dict, cast: type = str) -> object:
    keys = list(weights)
    w = np.array([weights[k] for k in keys], dtype=float)
    return cast(keys[int(rng.choice(len(keys), p=w / w.sum()))])


def _thickness(rng: np.random.Generator, dz: float) -> float:
    """Thickness >= spacing; about a third overlapping (e.g. 1.25 mm every 0.625, 5 mm every 2.5)."""
    t = dz * float(rng.choice([1.25, 1.5, 2.0])) if rng.random() < 0.35 else dz
    return float(np.round(min(5.0, max(0.625, t)), 3))


def sample_anatomy_wide(rng: np.random.Generator) -> an.AnatomyParams:
    """Habitus first: slim to obese, narrow to broad; the protocol adapts to it, not the reverse."""
    half_width = float(rng.uniform(125.0, 200.0))
    params = an.sample_anatomy(rng, half_width / 0.405)
    params = dataclasses.replace(
        params,
        half_width=half_width,
        half_depth=half_width * float(rng.uniform(0.58, 0.82)),
        fat_mm=float(rng.choice([rng.uniform(3, 12), rng.uniform(10, 30), rng.uniform(25, 55)], p=[0.3, 0.5, 0.2])),
        lung_height=float(rng.uniform(0.95, 1.4)) * half_width * 1.25,
    )
    return params


def sample_case(rng: np.random.Generator, config: PhantomConfig) -> WideCase:
    params = sample_anatomy_wide(rng)
    matrix = int(_pick(rng, config.matrix_weights, int)) if config.matrix_weights else config.matrix
    lo, hi = config.pixel_spacing_mm
    body_width = 2.0 * params.half_width
    # most protocols fit the body with a margin; some reconstruct a targeted (cropping) field of view
    fov_target = body_width * (rng.uniform(1.05, 1.4) if rng.random() > 0.12 else rng.uniform(0.75, 1.0))
    pixel = float(np.round(np.clip(fov_target / matrix, lo, hi), 4))
    slices_max = config.slices_max
    if config.voxel_budget:
        slices_max = max(8, min(slices_max, config.voxel_budget // (matrix * matrix)))
    # thin-slice series longer than the voxel budget cover part of the chest (as targeted thin recons do)
    spacings = WIDE_SLICE_SPACINGS[:3] if rng.random() < 0.12 else WIDE_SLICE_SPACINGS
    geometry, placement = sample_geometry(
        rng, config, params, pixel, matrix=matrix, slices_max=slices_max, spacings=spacings, thickness_of=_thickness
    )
    kernel = str(_pick(rng, KERNEL_WEIGHTS))
    psf_r, gain_r, grain_r = KERNELS[kernel]
    low_dose = bool(rng.random() < 0.3)
    n_lo, n_hi = config.noise_hu
    # noise grows with patient size and falls with thickness (more photons per voxel)
    size_factor = (params.half_width / 160.0) ** 1.5
    base = rng.uniform(n_lo, 0.5 * (n_lo + n_hi)) if not low_dose else rng.uniform(0.5 * (n_lo + n_hi), n_hi)
    noise = float(np.clip(base * size_factor * math.sqrt(1.25 / geometry.slice_thickness), n_lo, n_hi))
    if kernel in ("LUNG", "BONE"):
        noise = float(min(n_hi, noise * 1.3))  # sharp kernels pass more noise
    scan = WideScan(
        matrix=matrix,
        pixel_spacing=pixel,
        fov_mm=round(matrix * pixel, 2),
        kernel=kernel,
        psf_sigma_mm=float(np.clip(rng.uniform(*psf_r), *config.psf_sigma_mm)),
        edge_gain=float(rng.uniform(*gain_r)),
        noise_hu=round(noise, 2),
        noise_grain_mm=float(rng.uniform(*grain_r)),
        low_dose=low_dose,
        noise_anisotropy=float(rng.uniform(0.3, 1.5)) if low_dose and rng.random() < 0.6 else 0.0,
        padding=str(_pick(rng, PADDING_WEIGHTS)),
        circle_scale=float(rng.uniform(0.97, 1.0)),
        streaks=int(rng.integers(0, 10)) if rng.random() < 0.7 else 0,
        streak_hu=float(rng.uniform(15, 70)),
        motion_mm=float(rng.uniform(1.0, 5.0)) if rng.random() < 0.3 else 0.0,
        ghost=bool(rng.random() < 0.3),
        contrast=bool(rng.random() < 0.35),
        kvp=int(rng.choice([80, 100, 120, 120, 140])),
    )
    if scan.contrast:  # iodine: blood pool 150-350 HU (arterial phase brighter)
        params.hu[an.BLOOD] = float(rng.uniform(150, 350))
    # internal z grid: q internal slices per output slice, within the voxel budget
    dz, thick = geometry.slice_spacing, geometry.slice_thickness
    q = max(1, math.ceil(dz / MAX_INTERNAL_DZ_MM - 1e-9))
    if config.voxel_budget:
        q = max(1, min(q, int(1.5 * config.voxel_budget // (geometry.slices * matrix * matrix))))
    d = dz / q
    margin = max(0, math.ceil(thick / (2 * d) - 0.5 + 1e-9))
    offs = np.arange(-margin, margin + 1) * d
    w = np.clip(np.minimum(offs + d / 2, thick / 2) - np.maximum(offs - d / 2, -thick / 2), 0.0, None)
    w = w / w.sum()
    internal = dataclasses.replace(
        geometry,
        slices=(geometry.slices - 1) * q + 1 + 2 * margin,
        slice_spacing=d,
        slice_thickness=d,
        origin=(geometry.origin[0], geometry.origin[1], geometry.origin[2] - margin * d),
    )
    return WideCase(scan, params, geometry, internal, placement, q, margin, w.astype(np.float32))


def integrate_slices(vol: np.ndarray, case: WideCase) -> np.ndarray:
    """Internal slices -> output slices, each the profile-weighted mean of its internal neighbours."""
    n, q, m = case.geometry.slices, case.z_step, case.z_margin
    if q == 1 and m == 0:
        return vol
    out = np.zeros((n, *vol.shape[1:]), dtype=np.float32)
    for j, w in enumerate(case.weights):
        if w > 0:
            out += np.float32(w) * vol[j : j + (n - 1) * q + 1 : q]
    return out
