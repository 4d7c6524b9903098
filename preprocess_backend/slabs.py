"""Slab planning (the one implementation; the client, the evaluation runner, bench and loadtest use it).

Cut an ordered series into slabs of consecutive slices with a halo of context slices.

Each slab *owns* ``slab_size`` slices (the last one fewer); ``halo`` extra slices at each end are
sent too, so the 2.5D stack of every owned slice sees its real neighbours instead of the
edge-replicated padding the server applies at a request's ends. Detections on halo slices are
dropped client-side, so each slice is counted exactly once (by the slab that owns it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SlabPlan:
    """Series indices: owned ``[start, stop)``, sent ``[send_start, send_stop)`` (owned + halo)."""

    index: int
    start: int
    stop: int
    send_start: int
    send_stop: int

    @property
    def owned(self) -> range:
        return range(self.start, self.stop)

    @property
    def sent(self) -> range:
        return range(self.send_start, self.send_stop)

    @property
    def size(self) -> int:
        return self.send_stop - self.send_start

    def owns(self, series_index: int) -> bool:
        return self.start <= series_index < self.stop

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_slabs(num_slices: int, slab_size: int = 16, halo: int = 1) -> list[SlabPlan]:
    """Consecutive owned ranges of ``slab_size`` covering ``0..num_slices-1``, each with its halo.

    The halo is clipped at the series ends (there are no neighbours there; the server
    edge-replicates exactly as it would for the whole series).
    """
    if num_slices < 0:
        raise ValueError("num_slices must be >= 0")
    if slab_size < 1:
        raise ValueError("slab_size must be >= 1")
    if halo < 0:
        raise ValueError("halo must be >= 0")
    plans = []
    for i, start in enumerate(range(0, num_slices, slab_size)):
        stop = min(start + slab_size, num_slices)
        plans.append(SlabPlan(i, start, stop, max(0, start - halo), min(num_slices, stop + halo)))
    return plans


def merging_slab_size(max_batch_size: int, halo: int, merge: int = 2) -> int:
    """Owned slices per request such that ``merge`` requests, each with its 2 x ``halo`` context
    slices, fill one detector batch of ``max_batch_size`` (Triton's dynamic batcher never splits a
    request, so an 18-slice request and a batch of 32 never merge two). Falls back to one request
    per batch when ``merge`` would leave fewer than one owned slice."""
    if max_batch_size < 1 or halo < 0 or merge < 1:
        raise ValueError(f"bad batch {max_batch_size} / halo {halo} / merge {merge}")
    for m in range(merge, 0, -1):
        owned = max_batch_size // m - 2 * halo
        if owned >= 1:
            return owned
    return 1


def context_halo(k: int, context_mm: float | None = None, spacing_mm: float | None = None) -> int:
    """Context slices each slab needs at each end: k // 2 neighbours, or with planes at fixed mm
    offsets (``Options.context_mm``) as many slices as reach ``k // 2 x context_mm`` at this spacing."""
    half = k // 2
    if context_mm is None or spacing_mm is None or not spacing_mm > 0 or half == 0:
        return half
    return max(half, math.ceil(half * context_mm / spacing_mm - 1e-6))


def request_slab_size(slab_size: int, planned_halo: int, halo: int) -> int:
    """Owned slices when a series needs ``halo`` instead of the ``planned_halo`` its slab size was
    chosen for: the request keeps its size (owned + 2 x halo), so concurrent requests still fill one
    detector batch."""
    return max(1, slab_size + 2 * (planned_halo - halo))
