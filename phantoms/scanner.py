"""The imaging chain: scanner PSF (Gaussian blur) and quantum noise, textured like CT noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

TRUNCATE = 3.0
NOISE_BANK = 12  # distinct noise slices; each output slice gets one of them, flipped and shifted


def _kernel_gain(sigma: float) -> float:
    """sqrt(sum(k^2)) of scipy's discrete 1-D Gaussian: how much the filter shrinks white noise."""
    if sigma <= 0.05:
        return 1.0
    radius = int(TRUNCATE * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    return float(np.sqrt((k**2).sum()))


def _blur(vol: np.ndarray, sig_z: float, sig_xy: float) -> None:
    sig = tuple(s if s > 0.05 else 0.0 for s in (sig_z, sig_xy, sig_xy))
    if any(s > 0 for s in sig):
        ndimage.gaussian_filter(vol, sigma=sig, truncate=TRUNCATE, output=vol)


def apply_scanner(
    vol: np.ndarray,
    rng: np.random.Generator,
    noise_hu: float,
    psf_sigma_px: float,
    z_sigma_vox: float,
    noise_grain_px: float = 0.8,
) -> None:
    """In place: blur the anatomy with the PSF, then add correlated noise of std ``noise_hu``.

    Real CT noise is not white: reconstruction kernels give it a grain of about a pixel or more, so
    the noise is filtered with max(PSF, grain) and rescaled to the requested standard deviation.
    Drawing fresh Gaussian noise for 100 M voxels costs more than everything else together, so
    slices take theirs from a small bank, randomly flipped and circularly shifted: no two
    neighbouring slices share a pattern at the same place.
    """
    _blur(vol, z_sigma_vox if z_sigma_vox > 0.45 else 0.0, psf_sigma_px)
    if noise_hu <= 0:
        return
    grain = max(psf_sigma_px, noise_grain_px)
    n_bank = min(NOISE_BANK, vol.shape[0])
    bank = rng.standard_normal(size=(n_bank, *vol.shape[1:]), dtype=np.float32)
    _blur(bank, 0.0, grain)
    bank *= np.float32(noise_hu / _kernel_gain(grain) ** 2)
    picks = rng.integers(0, n_bank, size=vol.shape[0])
    shifts = rng.integers(0, vol.shape[1], size=(vol.shape[0], 2))
    flips = rng.integers(0, 4, size=vol.shape[0])
    for k in range(vol.shape[0]):
        b = bank[picks[k]]
        if flips[k] & 1:
            b = b[::-1]
        if flips[k] & 2:
            b = b[:, ::-1]
        vol[k] += np.roll(b, tuple(shifts[k]), axis=(0, 1))
