"""Vessel and airway trees by space colonisation (Runions et al. 2007), radii by Murray's law.

Attractor points fill the lung; each grows the tree node nearest to it one step towards it; nodes
that reach attractors consume them. A vessel's radius then follows from how many terminal
branches it feeds: r^3 = sum of the children's r^3 (Murray), so trunks taper smoothly to the
periphery and branch points conserve flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


@dataclass
class Tree:
    nodes: np.ndarray  # [N, 3] volume mm (z, y, x)
    parent: np.ndarray  # [N] index of the parent node, -1 for roots
    radius: np.ndarray  # [N] mm

    def segments(self) -> np.ndarray:
        """[S, 8]: start (3), end (3), start radius, end radius (mm)."""
        child = np.flatnonzero(self.parent >= 0)
        p = self.parent[child]
        return np.column_stack([self.nodes[p], self.nodes[child], self.radius[p], self.radius[child]])


def colonise(
    rng: np.random.Generator, roots: np.ndarray, attractors: np.ndarray, step: float = 4.0, influence: float = 60.0,
    kill: float = 6.0, max_nodes: int = 4000,
) -> tuple[np.ndarray, np.ndarray]:
    roots = np.atleast_2d(np.asarray(roots, float))
    nodes = np.zeros((max_nodes + len(attractors) + len(roots), 3))
    parent = np.full(len(nodes), -1, dtype=int)
    count = len(roots)
    nodes[:count] = roots
    alive = np.asarray(attractors, float)
    for _ in range(400):
        if not len(alive) or count >= max_nodes:
            break
        arr = nodes[:count]
        d, idx = cKDTree(arr).query(alive, distance_upper_bound=influence)
        ok = np.isfinite(d)
        if not ok.any():
            break
        pull = (alive[ok] - arr[idx[ok]]) / np.maximum(d[ok], 1e-6)[:, None]
        acc = np.zeros_like(arr)
        np.add.at(acc, idx[ok], pull)
        growing = np.flatnonzero(np.linalg.norm(acc, axis=1) > 1e-6)[: max_nodes - count]
        if not len(growing):
            break
        new = arr[growing] + step * (acc[growing] / np.linalg.norm(acc[growing], axis=1)[:, None] + rng.normal(scale=0.08, size=(len(growing), 3)))
        nodes[count : count + len(new)] = new
        parent[count : count + len(new)] = growing
        count += len(new)
        near = cKDTree(new).query(alive, distance_upper_bound=kill)[0]
        alive = alive[~np.isfinite(near)]
    return nodes[:count].copy(), parent[:count].copy()


def murray_radii(parent: np.ndarray, r_leaf: float, r_max: float) -> np.ndarray:
    """Terminal branches r_leaf; every parent r = (sum of children r^3)^(1/3) (children come after parents)."""
    cube = np.zeros(len(parent))
    has_child = np.zeros(len(parent), dtype=bool)
    has_child[parent[parent >= 0]] = True
    cube[~has_child] = r_leaf**3
    for n in range(len(parent) - 1, -1, -1):
        if parent[n] >= 0:
            cube[parent[n]] += cube[n]
    return np.minimum(np.cbrt(cube), r_max)


def grow(rng: np.random.Generator, roots: np.ndarray, attractors: np.ndarray, r_leaf: float, r_max: float, **kw: float) -> Tree:
    nodes, parent = colonise(rng, roots, attractors, **kw)  # type: ignore[arg-type]
    return Tree(nodes, parent, murray_radii(parent, r_leaf, r_max))


def draw_segments(vol: np.ndarray, spacing: tuple[float, float, float], segs: np.ndarray, hu: float | np.ndarray,
                  lung: np.ndarray | None = None, r_free: float = 3.0, mode: str = "max") -> None:
    """Rasterise tapered tubes: soft occupancy from the distance to each segment's axis, in its box.

    ``mode`` "max": raise HU only (vessels over parenchyma); "set": blend to ``hu`` (airway lumen).
    Tubes thinner than ``r_free`` are drawn only where ``lung`` is (they belong to the lung).
    """
    sp = np.asarray(spacing)
    pix = float(min(sp[1:]))
    hu_arr = np.broadcast_to(np.asarray(hu, dtype=np.float32), (len(segs),))
    for s, value in zip(segs, hu_arr, strict=True):
        a, b, r0, r1 = s[0:3], s[3:6], float(s[6]), float(s[7])
        if max(r0, r1) <= 0.05:
            continue
        reach = max(r0, r1) + pix
        lo = np.maximum(np.floor((np.minimum(a, b) - reach) / sp).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(a, b) + reach) / sp).astype(int) + 1, vol.shape)
        if np.any(hi <= lo):
            continue
        z = (np.arange(lo[0], hi[0]) * sp[0])[:, None, None]
        y = (np.arange(lo[1], hi[1]) * sp[1])[None, :, None]
        x = (np.arange(lo[2], hi[2]) * sp[2])[None, None, :]
        ab = b - a
        t = np.clip(((z - a[0]) * ab[0] + (y - a[1]) * ab[1] + (x - a[2]) * ab[2]) / (ab @ ab + 1e-9), 0, 1)
        d = np.sqrt((z - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (x - a[2] - t * ab[2]) ** 2)
        r = r0 + t * (r1 - r0)
        occ = np.clip(0.5 + (r - d) / pix, 0, 1).astype(np.float32)
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        if lung is not None and max(r0, r1) < r_free:
            occ *= lung[box]
        v = vol[box]
        if mode == "max":
            np.maximum(v, v + occ * (value - v), out=v)
        else:
            v += occ * (value - v)
