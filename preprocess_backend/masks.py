"""Body and lung masks from HU: thresholds + scipy morphology, per slice, on a coarse grid.

Everything runs on [Z, h, w] stacks with 2D (1, 3, 3) structuring elements, so each slice is
processed independently in one scipy call for the whole slab (no per-slice Python loop). Run it on the
1/4 grid the pipeline keeps (128 x 128 for a 512 model): a few hundred microseconds per slice.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BODY_HU = -500.0  # tissue vs air outside the patient
LUNG_HU = -400.0  # aerated lung (parenchyma about -850) vs soft tissue; ground-glass stays below ~ -300
MIN_LUNG_FRACTION = 0.002  # lung components smaller than this fraction of the slice are noise
BODY = np.uint8(1)  # bit flags of the packed anatomy mask
LUNG = np.uint8(2)

_S2 = ndimage.generate_binary_structure(2, 1)[None]  # 4-connected, in-plane only
_S2_8 = ndimage.generate_binary_structure(2, 2)[None]  # 8-connected, in-plane only


def _as_stack(hu: np.ndarray) -> tuple[np.ndarray, bool]:
    if hu.ndim == 2:
        return hu[None], True
    if hu.ndim != 3:
        raise ValueError(f"expected [H, W] or [Z, H, W], got {hu.shape}")
    return hu, False


def _largest_per_slice(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected component of each slice."""
    labels, n = ndimage.label(mask, structure=_S2_8)
    if n <= 1:
        return labels > 0
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    counts[0] = 0
    z_of = np.zeros(n + 1, dtype=np.int64)
    z_of[labels.reshape(labels.shape[0], -1)] = np.arange(labels.shape[0])[:, None]
    best = np.zeros(labels.shape[0], dtype=np.int64)  # label with the most pixels in each slice
    order = np.lexsort((counts, z_of))  # by slice, then size: the last of each slice is its largest
    best[z_of[order]] = order
    keep = np.zeros(n + 1, dtype=bool)
    keep[best[best > 0]] = True
    keep[0] = False
    return keep[labels]


def body_mask(hu: np.ndarray, threshold: float = BODY_HU) -> np.ndarray:
    """bool mask of the patient's body (largest tissue component, holes such as the lungs filled)."""
    stack, squeeze = _as_stack(hu)
    tissue = stack > np.float32(threshold)
    tissue = ndimage.binary_opening(tissue, structure=_S2)  # detach thin table / blanket edges
    body = _largest_per_slice(tissue)
    body = ndimage.binary_fill_holes(body, structure=_S2)
    return body[0] if squeeze else body


def lung_mask(hu: np.ndarray, body: np.ndarray | None = None, threshold: float = LUNG_HU, close_iter: int = 2) -> np.ndarray:
    """bool mask of aerated lung inside the body, closed and hole-filled so nodules and vessels inside
    it (and most juxtapleural nodules, through the closing) count as lung."""
    stack, squeeze = _as_stack(hu)
    if body is None:
        body = body_mask(stack)
    else:
        body, _ = _as_stack(body)
    air = (stack < np.float32(threshold)) & ndimage.binary_erosion(body, structure=_S2, iterations=1)
    air = ndimage.binary_opening(air, structure=_S2)
    labels, n = ndimage.label(air, structure=_S2_8)
    if n:
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        min_px = max(4, int(MIN_LUNG_FRACTION * stack.shape[1] * stack.shape[2]))
        keep = counts >= min_px
        keep[0] = False
        air = keep[labels]
    if close_iter:
        air = ndimage.binary_closing(air, structure=_S2_8, iterations=close_iter, border_value=0)
    lung = ndimage.binary_fill_holes(air, structure=_S2) & body
    return lung[0] if squeeze else lung


def anatomy_mask(hu: np.ndarray) -> np.ndarray:
    """uint8 packed mask: bit 0 body, bit 1 lung (what crosses from preprocess to postprocess)."""
    body = body_mask(hu)
    lung = lung_mask(hu, body=body)
    return body.astype(np.uint8) | (lung.astype(np.uint8) << 1)
