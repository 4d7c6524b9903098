"""Profile "wide": the imaging chain after the anatomy, in output (written) slice space.

Motion blur at the lung bases, the kernel (PSF plus edge enhancement of sharp kernels),
beam-hardening streaks, noise with a CT-like noise power spectrum (ramp times the kernel's
apodisation: fine grain for sharp kernels, blotchy for soft ones; lateral streakiness at low
dose), correlated along z when reconstructions overlap, and the reconstruction circle.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ctlesion_phantoms.wide import WideScan

NOISE_BANK = 10


def motion(vol: np.ndarray, scan: WideScan, z_body: np.ndarray, lung_height: float, pixel: float) -> None:
    """Breathing moves the bases most: blur (or a double contour) along y, fading towards the apex."""
    if scan.motion_mm <= 0:
        return
    strength = scan.motion_mm * np.clip(1.0 - z_body / (0.65 * lung_height), 0.0, 1.0)
    for k, s_mm in enumerate(strength):
        px = int(round(s_mm / pixel))
        if px < 1:
            continue
        if scan.ghost:
            shifted = np.empty_like(vol[k])
            shifted[px:] = vol[k][:-px]
            shifted[:px] = vol[k][:1]
            vol[k] = 0.65 * vol[k] + 0.35 * shifted
        else:
            vol[k] = ndimage.uniform_filter1d(vol[k], size=px + 1, axis=0, mode="nearest")


def kernel(vol: np.ndarray, scan: WideScan, pixel: float) -> None:
    """In-plane PSF, then the overshoot at edges that sharp (lung / bone) kernels give."""
    sigma = scan.psf_sigma_mm / pixel
    edge_sigma = 1.2 / pixel
    for k in range(vol.shape[0]):
        sl = ndimage.gaussian_filter(vol[k], sigma=sigma, truncate=3.0) if sigma > 0.05 else vol[k]
        if scan.edge_gain > 0:
            sl = sl + np.float32(scan.edge_gain) * (sl - ndimage.gaussian_filter(sl, sigma=edge_sigma, truncate=3.0))
        vol[k] = sl


def streak_patterns(rng: np.random.Generator, scan: WideScan, mid_slice: np.ndarray, pixel: float) -> tuple[np.ndarray, np.ndarray]:
    """Streak lines through dense bone of the middle slice: patterns [L, H, W] and signs [L]."""
    h, w = mid_slice.shape
    bone = np.argwhere(mid_slice[::4, ::4] > 400) * 4
    if scan.streaks == 0 or not len(bone):
        return np.zeros((0, h, w), np.float32), np.zeros(0)
    ii, jj = np.mgrid[0:h, 0:w].astype(np.float32)
    pats, signs = [], []
    for _ in range(scan.streaks):
        ci, cj = bone[rng.integers(len(bone))]
        theta = rng.uniform(0, np.pi)
        width = rng.uniform(0.6, 2.0) / pixel
        decay = rng.uniform(60, 220) / pixel
        u, v = np.cos(theta), np.sin(theta)
        t = (ii - ci) * u + (jj - cj) * v  # along the line
        d = -(ii - ci) * v + (jj - cj) * u  # across it
        pats.append((np.exp(-0.5 * (d / width) ** 2) * np.exp(-np.abs(t) / decay)).astype(np.float32))
        signs.append(-1.0 if rng.random() < 0.8 else 1.0)  # mostly dark bands between dense objects
    return np.stack(pats), np.asarray(signs)


def streaks(vol: np.ndarray, rng: np.random.Generator, scan: WideScan, pixel: float) -> None:
    pats, signs = streak_patterns(rng, scan, vol[vol.shape[0] // 2], pixel)
    if not len(pats):
        return
    n = vol.shape[0]
    # each streak lives over part of the scan, rising and falling smoothly
    z = np.arange(n, dtype=np.float64)
    amps = []
    for _ in range(len(pats)):
        c, half = rng.uniform(0, n), rng.uniform(0.1, 0.5) * n
        amps.append(scan.streak_hu * rng.uniform(0.4, 1.0) * np.clip(1 - ((z - c) / half) ** 2, 0, None))
    amps_arr = np.asarray(amps) * signs[:, None]
    for k in range(n):
        a = amps_arr[:, k]
        if np.any(a):
            body = vol[k] > -990  # streaks show in tissue and lung, not in the air around the patient
            vol[k] += np.tensordot(a.astype(np.float32), pats, axes=1) * body


def _noise_bank(rng: np.random.Generator, scan: WideScan, shape: tuple[int, int], pixel: float) -> np.ndarray:
    h, w = shape
    fy = np.fft.fftfreq(h, d=pixel)[:, None]
    fx = np.fft.rfftfreq(w, d=pixel)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    # amplitude = sqrt(NPS), NPS ~ |f| * MTF(f)^2 (filtered back-projection of white sinogram noise)
    amp = np.sqrt(f) * np.exp(-0.5 * (2 * np.pi * scan.noise_grain_mm * f) ** 2)
    if scan.noise_anisotropy > 0:
        amp = amp * (1.0 + scan.noise_anisotropy * (fy**2 / (f**2 + 1e-12)))
    bank = np.empty((NOISE_BANK, h, w), dtype=np.float32)
    for b in range(NOISE_BANK):
        spec = np.fft.rfft2(rng.standard_normal((h, w)).astype(np.float32)) * amp
        n = np.fft.irfft2(spec, s=(h, w)).astype(np.float32)
        bank[b] = n / (n.std() + 1e-6)
    return bank


def noise(vol: np.ndarray, rng: np.random.Generator, scan: WideScan, pixel: float, overlap: int) -> None:
    """Add noise of std ``scan.noise_hu``; ``overlap`` slices share noise when reconstructions overlap."""
    if scan.noise_hu <= 0:
        return
    n, h, w = vol.shape
    bank = _noise_bank(rng, scan, (h, w), pixel)
    m = n + overlap - 1
    picks = rng.integers(0, NOISE_BANK, size=m)
    shifts = rng.integers(0, h, size=(m, 2))
    flips = rng.integers(0, 4, size=m)

    def layer(i: int) -> np.ndarray:
        b = bank[picks[i]]
        if flips[i] & 1:
            b = b[::-1]
        if flips[i] & 2:
            b = b[:, ::-1]
        return np.roll(b, tuple(shifts[i]), axis=(0, 1))

    scale = np.float32(scan.noise_hu / np.sqrt(overlap))
    for k in range(n):
        acc = layer(k)
        for j in range(1, overlap):
            acc = acc + layer(k + j)
        vol[k] += scale * acc


def reconstruction_circle(shape: tuple[int, int], scan: WideScan) -> np.ndarray | None:
    """Pixels outside the reconstruction circle (None when the whole square is reconstructed)."""
    if scan.padding == "none":
        return None
    h, w = shape
    r = scan.circle_scale * min(h, w) / 2.0
    ii, jj = np.ogrid[0:h, 0:w]
    return ((ii - (h - 1) / 2) ** 2 + (jj - (w - 1) / 2) ** 2) > r * r
