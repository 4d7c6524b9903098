"""Slab results -> series detections: map slab-local indices back to series order, drop the halo."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from ctlesion_client.slabs import SlabPlan
from preprocess_backend.types import Detection


def to_series_detections(
    plan: SlabPlan,
    detections: Iterable[Detection],
    index_of_uid: Mapping[str, int],
) -> tuple[list[Detection], list[str]]:
    """Detections of one slab with ``slice_index`` in series order; halo slices' detections dropped.

    The server orders the slab by position with the same function the client used for the whole
    series, so slab index ``i`` is series index ``send_start + i``; the returned SOPInstanceUID is
    the authority when both are known (it survives duplicate positions). Returns
    (kept detections, warnings).
    """
    kept: list[Detection] = []
    warnings: list[str] = []
    for det in detections:
        series_index = index_of_uid.get(det.sop_instance_uid)
        if series_index is None:
            series_index = plan.send_start + int(det.slice_index)
            if not 0 <= det.slice_index < plan.size:
                warnings.append(f"slab {plan.index}: detection on unknown slice {det.sop_instance_uid!r} dropped")
                continue
        elif series_index not in plan.sent:
            warnings.append(f"slab {plan.index}: detection on {det.sop_instance_uid} which was not sent in it, dropped")
            continue
        if not plan.owns(series_index):
            continue  # a halo slice: its owner slab reports it
        kept.append(dataclasses.replace(det, slice_index=series_index))
    return kept, warnings


def merge_slabs(
    results: Sequence[tuple[SlabPlan, Sequence[Detection]]],
    index_of_uid: Mapping[str, int],
) -> tuple[list[Detection], list[str]]:
    """All slabs of a series -> one list sorted by (slice, -score), plus warnings."""
    out: list[Detection] = []
    warnings: list[str] = []
    for plan, dets in results:
        kept, warn = to_series_detections(plan, dets, index_of_uid)
        out.extend(kept)
        warnings.extend(warn)
    out.sort(key=lambda d: (d.slice_index, -d.score))
    return out, warnings
