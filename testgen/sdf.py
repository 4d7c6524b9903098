"""Signed distance fields (negative inside, mm) of the primitives the test generator's body is built from.

Superquadrics are not exact distances; they are scaled so that the zero level is exact and the
field grows at about 1 per mm near it, which is all the soft edges need.
"""

from __future__ import annotations

import numpy as np


def superellipse(x: np.ndarray, y: np.ndarray, a: float, b: float, n: float) -> np.ndarray:
    rho = (np.abs(x / a) ** n + np.abs(y / b) ** n) ** (1.0 / n)
    return (rho - 1.0) * min(a, b)


def superquadric(x: np.ndarray, y: np.ndarray, z: float, axes: tuple[float, float, float], e_xy: float, e_z: float) -> np.ndarray:
    """Barr's superquadric (inside-outside function) about the origin, as an approximate SDF."""
    ax, ay, az = axes
    inner = (np.abs(x / ax) ** e_xy + np.abs(y / ay) ** e_xy) ** (e_z / e_xy)
    f = (inner + abs(z / az) ** e_z) ** (1.0 / e_z)
    return (f - 1.0) * min(ax, ay, az)


def ellipsoid(x: np.ndarray, y: np.ndarray, z: float, c: tuple[float, float, float], r: tuple[float, float, float], angle: float = 0.0) -> np.ndarray:
    ca, sa = np.cos(angle), np.sin(angle)
    u = ca * (x - c[0]) + sa * (y - c[1])
    v = -sa * (x - c[0]) + ca * (y - c[1])
    k = np.sqrt((u / r[0]) ** 2 + (v / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2)
    return (k - 1.0) * min(r)


def sphere(x: np.ndarray, y: np.ndarray, z: float, c: tuple[float, float, float], r: float) -> np.ndarray:
    return np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - r


def capsule(x: np.ndarray, y: np.ndarray, z: float, a: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    """Exact SDF of a capsule from a to b (3-vectors, mm) of radius r, on the plane at height z."""
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / (ab @ ab + 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2) - r


def cylinder_z(x: np.ndarray, y: np.ndarray, z: float, cx: float, cy: float, r: float, z0: float, z1: float) -> np.ndarray:
    d_r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r
    d_z = max(z0 - z, z - z1)
    outside = np.sqrt(np.maximum(d_r, 0) ** 2 + max(d_z, 0.0) ** 2)
    return outside + np.minimum(np.maximum(d_r, d_z), 0.0)


def box(x: np.ndarray, y: np.ndarray, z: float, c: tuple[float, float, float], half: tuple[float, float, float]) -> np.ndarray:
    qx, qy, qz = np.abs(x - c[0]) - half[0], np.abs(y - c[1]) - half[1], abs(z - c[2]) - half[2]
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2 + max(qz, 0.0) ** 2)
    return outside + np.minimum(np.maximum(np.maximum(qx, qy), qz), 0.0)


def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def subtract(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a minus b."""
    return np.maximum(a, -b)


def occupancy(d: np.ndarray, pixel: float) -> np.ndarray:
    """Soft inside fraction of a pixel of size ``pixel`` from the distance at its centre."""
    return np.clip(0.5 - d / pixel, 0.0, 1.0).astype(np.float32)
