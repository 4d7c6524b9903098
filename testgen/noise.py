"""Quantum noise as a scanner makes it: Poisson noise on the sinogram, reconstructed by filtered back-projection.

Pure numpy (no scipy / skimage radon). The attenuation of a representative slice is forward-
projected at low resolution; a ray through more tissue gets fewer photons and so more noise
(var ~ 1 / N, N = N0 exp(-integral mu)); white noise with that variance per ray is ramp-filtered
(with the kernel's apodisation window) and back-projected onto the image grid. The result has a
CT noise power spectrum, is stronger in the body centre and streaky along the most attenuating
directions (shoulders, a wide patient's lateral axis), which no stationary filtered noise gives.
"""

from __future__ import annotations

import numpy as np

MU_WATER = 0.0192  # 1/mm at ~70 keV
VIEWS = 360
WINDOWS = ("ram-lak", "shepp-logan", "hann")


def _bilinear(img: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    h, w = img.shape
    r0 = np.clip(np.floor(r).astype(int), 0, h - 2)
    c0 = np.clip(np.floor(c).astype(int), 0, w - 2)
    fr, fc = np.clip(r - r0, 0, 1), np.clip(c - c0, 0, 1)
    inside = (r >= 0) & (r <= h - 1) & (c >= 0) & (c <= w - 1)
    v = (img[r0, c0] * (1 - fr) * (1 - fc) + img[r0 + 1, c0] * fr * (1 - fc)
         + img[r0, c0 + 1] * (1 - fr) * fc + img[r0 + 1, c0 + 1] * fr * fc)
    return np.where(inside, v, 0.0)


def forward_project(mu: np.ndarray, pixel: float, views: int = VIEWS) -> np.ndarray:
    """Line integrals [views, detectors] of mu (1/mm) on a square grid of ``pixel`` mm, parallel beam."""
    n = mu.shape[0]
    det = int(np.ceil(n * np.sqrt(2)))
    t = (np.arange(det) - (det - 1) / 2)[:, None]
    s = (np.arange(det) - (det - 1) / 2)[None, :]
    c0 = (n - 1) / 2
    out = np.empty((views, det), dtype=np.float64)
    for i, th in enumerate(np.linspace(0, np.pi, views, endpoint=False)):
        ct, st = np.cos(th), np.sin(th)
        col = c0 + t * ct - s * st
        row = c0 + t * st + s * ct
        out[i] = _bilinear(mu, row, col).sum(axis=1) * pixel
    return out


def _filter(sino: np.ndarray, window: str) -> np.ndarray:
    det = sino.shape[1]
    size = int(2 ** np.ceil(np.log2(2 * det)))
    f = np.fft.rfftfreq(size)
    ramp = 2 * f
    if window == "shepp-logan":
        ramp = ramp * np.sinc(f)
    elif window == "hann":
        ramp = ramp * 0.5 * (1 + np.cos(2 * np.pi * f))
    spec = np.fft.rfft(sino, n=size, axis=1) * ramp
    return np.fft.irfft(spec, n=size, axis=1)[:, :det]


def back_project(filtered: np.ndarray, n: int) -> np.ndarray:
    """FBP image [n, n] (detector pitch = pixel) of filtered projections [views, det]."""
    views, det = filtered.shape
    c0 = (n - 1) / 2
    rows, cols = np.mgrid[0:n, 0:n].astype(np.float64)
    xr, yr = cols - c0, rows - c0
    img = np.zeros((n, n))
    for i, th in enumerate(np.linspace(0, np.pi, views, endpoint=False)):
        t = xr * np.cos(th) + yr * np.sin(th) + (det - 1) / 2
        t0 = np.clip(np.floor(t).astype(int), 0, det - 2)
        ft = t - t0
        img += filtered[i, t0] * (1 - ft) + filtered[i, t0 + 1] * ft
    return img * np.pi / (2 * views)


def noise_realisations(rng: np.random.Generator, hu_slice: np.ndarray, pixel: float, count: int, window: str,
                       photons: float = 2e5) -> np.ndarray:
    """``count`` noise images [count, n, n] (unit std inside the body) for the anatomy of ``hu_slice``.

    Matrices above 256 are reconstructed at half resolution and upsampled (a soft-kernel grain):
    back-projection costs views x pixels.
    """
    full = hu_slice.shape[0]
    half = 2 if full > 256 else 1
    hu_slice = hu_slice[::half, ::half]
    pixel = pixel * half
    n = hu_slice.shape[0]
    f = 4 if n >= 256 else 2
    small = hu_slice[::f, ::f][: n // f, : n // f]
    mu = np.clip(MU_WATER * (1 + small / 1000.0), 0, None)
    p = forward_project(mu, pixel * f)  # low resolution is enough for the photon counts
    det = int(np.ceil(n * np.sqrt(2)))
    t_full = np.linspace(0, p.shape[1] - 1, det)
    counts = photons * np.exp(-np.stack([np.interp(t_full, np.arange(p.shape[1]), row) for row in p]))
    sigma = 1.0 / np.sqrt(np.maximum(counts, 1.0))
    body = hu_slice > -500
    out = np.empty((count, n, n), dtype=np.float32)
    for k in range(count):
        img = back_project(_filter(rng.standard_normal(sigma.shape) * sigma, window), n)
        out[k] = img / (img[body].std() if body.any() else img.std() + 1e-12)
    if half > 1:
        up = np.repeat(np.repeat(out, 2, axis=1), 2, axis=2)[:, :full, :full]
        # a 2x2 box after pixel repetition: bilinear-like, no blocky texture
        up = 0.25 * (up + np.roll(up, 1, 1) + np.roll(up, 1, 2) + np.roll(np.roll(up, 1, 1), 1, 2))
        return (up / up.std(axis=(1, 2), keepdims=True)).astype(np.float32)
    return out
