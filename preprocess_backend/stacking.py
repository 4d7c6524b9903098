"""2.5D stacking: each slice with its k // 2 neighbours on each side as channels.

The ends get edge-replicated context (the article drops the first and last slices; we keep them), so
a slab of Z slices always yields Z samples.
"""

from __future__ import annotations

import numpy as np

from preprocess_backend.errors import DicomInputError

ALLOWED_K = (1, 3, 5)


def stack_indices(z: int, k: int = 3) -> np.ndarray:
    """int64 [z, k]: source slice of each channel, clipped at the ends (edge replication)."""
    if k not in ALLOWED_K:
        raise DicomInputError("stack_25d", f"k must be one of {ALLOWED_K}, got {k}")
    if z < 1:
        raise DicomInputError("stack_25d", "no slices to stack")
    return np.clip(np.arange(z)[:, None] + np.arange(k)[None, :] - k // 2, 0, z - 1)


def stack_25d(volume: np.ndarray, k: int = 3, out: np.ndarray | None = None) -> np.ndarray:
    """[Z, H, W] -> [Z, k, H, W] (C-contiguous); channel k // 2 is the slice itself."""
    if volume.ndim != 3:
        raise DicomInputError("stack_25d", f"expected a [Z, H, W] volume, got shape {volume.shape}")
    idx = stack_indices(volume.shape[0], k)
    if out is None:
        return volume[idx]  # one gather: fancy indexing writes a fresh C-contiguous array
    np.take(volume, idx, axis=0, out=out)
    return out
