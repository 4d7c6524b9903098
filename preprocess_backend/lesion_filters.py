"""Filters on 3D lesions (after linking), not on per-slice boxes.

A 31 mm nodule is one finding: its size is the largest in-plane extent over all its slices, so a
per-slice 3-30 mm rule would drop its middle slices and split it in two. Here the size rule applies
to the linked lesion: < ``min_size_mm`` is dropped (LUNA16 counts nodules >= 3 mm), up to
``max_size_mm`` (30 mm) it is a nodule, larger it is reported as a mass, never dropped silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from preprocess_backend.types import Lesion

MASS = "mass"
NODULE = "nodule"


@dataclass(frozen=True)
class LesionFilter:
    """Size bounds (mm) and the operating threshold on the lesion's final confidence."""

    min_size_mm: float = 3.0
    max_size_mm: float = 30.0  # larger: a mass (kept, labelled)
    score_threshold: float = 0.0


def classify_size(diameter_mm: float, max_size_mm: float = 30.0) -> str:
    return MASS if math.isfinite(diameter_mm) and diameter_mm > max_size_mm else NODULE


def filter_lesions(lesions: Sequence[Lesion], rule: LesionFilter) -> list[Lesion]:
    """Lesions at or above the threshold and ``min_size_mm``, each labelled nodule or mass (order kept).

    A lesion of unknown size (no PixelSpacing) is kept: nothing says it is too small.
    """
    out = []
    for les in lesions:
        if les.max_score < rule.score_threshold:
            continue
        d = les.diameter_mm
        if math.isfinite(d) and d < rule.min_size_mm:
            continue
        out.append(replace(les, kind=classify_size(d, rule.max_size_mm)))
    return out
