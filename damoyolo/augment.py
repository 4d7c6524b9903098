"""Training augmentations of the article, applied to one 2.5D image with its boxes.

Every geometric transform moves the boxes with the pixels. Rotation uses the box's inscribed
ellipse (a nodule is round): the rotated box is the bounding box of the rotated ellipse, not of the
rotated corners, which would inflate a round object's box by up to 41 % at 45 degrees.

Probabilities and magnitudes are the article's: horizontal / vertical flip 0.5 each, rotation up to
15 degrees at 0.5, brightness / contrast 0.1 at 0.3, Gaussian blur (3 x 3) at 0.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentConfig:
    p_hflip: float = 0.5
    p_vflip: float = 0.5
    p_rotate: float = 0.5
    max_rotate_deg: float = 15.0
    p_brightness_contrast: float = 0.3
    brightness: float = 0.1  # additive, as a fraction of the 0..255 range
    contrast: float = 0.1  # multiplicative, around the image mean
    p_blur: float = 0.1
    blur_sigma: float = 0.8  # with truncate 1.25 -> a 3 x 3 kernel, as the article's blur 3


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """image [C, H, W], boxes [M, 4] xyxy px with pixel centres on integers (docs/contracts.md,
    "Coordinates"; the truth boxes' convention): column j goes to w - 1 - j."""
    w = image.shape[2]
    out = boxes.copy()
    out[:, 0], out[:, 2] = (w - 1) - boxes[:, 2], (w - 1) - boxes[:, 0]
    return image[:, :, ::-1], out


def vflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = image.shape[1]
    out = boxes.copy()
    out[:, 1], out[:, 3] = (h - 1) - boxes[:, 3], (h - 1) - boxes[:, 1]
    return image[:, ::-1, :], out


def rotate(image: np.ndarray, boxes: np.ndarray, degrees: float, fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Rotate about the image centre (counter-clockwise on screen for positive degrees).

    Boxes: centres rotate exactly; size = bounding box of the rotated inscribed ellipse. Boxes
    are clipped to the image afterwards.
    """
    c, h, w = image.shape
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # ndimage.rotate rotates in the (row, col) plane; its positive angle turns the image
    # counter-clockwise as displayed (rows down), which maps a point (x, y) about the centre to
    # (cx + cos*dx + sin*dy, cy - sin*dx + cos*dy).
    out = np.empty_like(image)
    for i in range(c):
        ndimage.rotate(image[i], degrees, reshape=False, order=1, mode="constant", cval=fill, output=out[i])
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0  # ndimage.rotate's centre, in pixel-centre coordinates
    bx = (boxes[:, 0] + boxes[:, 2]) / 2 - cx
    by = (boxes[:, 1] + boxes[:, 3]) / 2 - cy
    a = (boxes[:, 2] - boxes[:, 0]) / 2
    b = (boxes[:, 3] - boxes[:, 1]) / 2
    nx = cx + cos * bx + sin * by
    ny = cy - sin * bx + cos * by
    hw = np.sqrt((a * cos) ** 2 + (b * sin) ** 2)
    hh = np.sqrt((a * sin) ** 2 + (b * cos) ** 2)
    rotated = np.stack([nx - hw, ny - hh, nx + hw, ny + hh], axis=1)
    return out, clip_boxes(rotated, w, h)


def brightness_contrast(image: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """(image - mean) * (1 + contrast) + mean + brightness * 255, clipped to 0..255 (float32)."""
    img = image.astype(np.float32)
    mean = float(img.mean())
    img = (img - mean) * (1.0 + contrast) + mean + brightness * 255.0
    return np.clip(img, 0.0, 255.0)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    img = image.astype(np.float32)
    # in-plane only (axis 0 is the 2.5D slice axis); truncate so the kernel is 3 x 3
    return ndimage.gaussian_filter(img, sigma=(0, sigma, sigma), truncate=1.0 / sigma + 1e-6)


def clip_boxes(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    out = boxes.copy()
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def augment(
    image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, config: AugmentConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One random draw of the article's augmentations. image [C, H, W] (0..255), boxes [M, 4] xyxy.

    Returns float32 [C, H, W] and boxes; boxes that shrink below 1 px after clipping are dropped.
    """
    cfg = config or AugmentConfig()
    img = np.asarray(image)
    bx = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if rng.random() < cfg.p_hflip:
        img, bx = hflip(img, bx)
    if rng.random() < cfg.p_vflip:
        img, bx = vflip(img, bx)
    img = np.ascontiguousarray(img, dtype=np.float32)
    if rng.random() < cfg.p_rotate:
        img, bx = rotate(img, bx, float(rng.uniform(-cfg.max_rotate_deg, cfg.max_rotate_deg)))
    if rng.random() < cfg.p_brightness_contrast:
        img = brightness_contrast(
            img, float(rng.uniform(-cfg.brightness, cfg.brightness)), float(rng.uniform(-cfg.contrast, cfg.contrast))
        )
    if rng.random() < cfg.p_blur:
        img = gaussian_blur(img, cfg.blur_sigma)
    keep = ((bx[:, 2] - bx[:, 0]) >= 1) & ((bx[:, 3] - bx[:, 1]) >= 1)
    return img, bx[keep]
