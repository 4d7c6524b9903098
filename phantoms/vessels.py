"""Branching trees (pulmonary vessels, bronchi) grown inside the lung mask, as tapered segments.

A vessel cut across looks exactly like a small nodule on one slice; only its continuation on the
neighbouring slices tells them apart. That is the confounder these trees are for.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np

InLung = Callable[[np.ndarray], bool]


def lung_lookup(lung: np.ndarray, spacing: tuple[float, float, float]) -> InLung:
    sp = np.asarray(spacing)
    shape = np.asarray(lung.shape)

    def inside(p: np.ndarray) -> bool:
        idx = np.rint(p / sp).astype(int)
        return bool(np.all(idx >= 0) and np.all(idx < shape) and lung[tuple(idx)])

    return inside


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


def _turn(rng: np.random.Generator, d: np.ndarray, angle_deg: float, axis: np.ndarray | None = None) -> np.ndarray:
    """d rotated by angle about an axis perpendicular to d (random unless given)."""
    if axis is None:
        axis = _unit(np.cross(d, rng.normal(size=3)))
    a = np.deg2rad(angle_deg)
    return _unit(d * np.cos(a) + np.cross(axis, d) * np.sin(a))


def grow_tree(
    rng: np.random.Generator,
    roots: list[tuple[np.ndarray, np.ndarray, float]],
    inside: InLung,
    min_radius: float,
    max_segments: int,
    length_per_radius: tuple[float, float] = (4.0, 7.0),
    free_generations: int = 1,
) -> np.ndarray:
    """Grow thickest-first from roots (start grid mm, direction, radius); returns segments [S, 8].

    Thickest-first so that a cap on the segment count trims the finest branches, never a trunk.
    Branching is asymmetric, as in real lungs: the main child keeps most of the radius and runs
    on to the periphery, side branches are thinner. The first ``free_generations`` may start
    outside the lung (hilum / mediastinum).
    """
    segs: list[np.ndarray] = []
    heap: list[tuple[float, int, np.ndarray, np.ndarray, float, int, np.ndarray]] = []
    counter = 0
    for p, d, r in roots:
        heapq.heappush(heap, (-float(r), counter, np.asarray(p, float), _unit(np.asarray(d, float)), float(r), 0, np.asarray(p, float)))
        counter += 1
    while heap and len(segs) < max_segments:
        _, _, p, d, r, gen, origin = heapq.heappop(heap)
        length = r * rng.uniform(*length_per_radius) + 3.0
        end = None
        for attempt in range(8):  # a few tries to stay inside the lung: bend, then shorten
            cand_dir = d if attempt == 0 else _turn(rng, d, rng.uniform(15, 25 + 10 * attempt))
            step = length * (1.0 if attempt < 4 else 0.5)
            cand = p + cand_dir * step
            mid = p + cand_dir * step * 0.5
            if gen < free_generations or (inside(cand) and inside(mid)):
                end, d, length = cand, cand_dir, step
                break
        if end is None:
            continue
        r_end = r * rng.uniform(0.9, 0.97)
        if r > 1.2:  # a slight kink in the middle: real vessels are not straight rods
            kink = p + d * length * 0.5 + rng.normal(scale=0.1 * length, size=3)
            segs.append(np.r_[p, kink, r, 0.5 * (r + r_end)])
            segs.append(np.r_[kink, end, 0.5 * (r + r_end), r_end])
        else:
            segs.append(np.r_[p, end, r, r_end])
        if r_end < min_radius:
            continue
        outward = _unit(end - origin)
        axis = _unit(np.cross(d, rng.normal(size=3)))
        n_children = 3 if rng.random() < 0.15 else 2
        fracs = [rng.uniform(0.82, 0.95), rng.uniform(0.45, 0.72), rng.uniform(0.4, 0.6)][:n_children]
        angles = [rng.uniform(8, 25), -rng.uniform(35, 70), rng.uniform(40, 75)][:n_children]
        for i, (frac, ang) in enumerate(zip(fracs, angles, strict=True)):
            cd = _turn(rng, d, ang, axis if i < 2 else None)
            cd = _unit(cd + 0.3 * outward)
            rc = r_end * frac
            heapq.heappush(heap, (-rc, counter, end, cd, rc, gen + 1, origin))
            counter += 1
    return np.asarray(segs, dtype=np.float64).reshape(-1, 8)
