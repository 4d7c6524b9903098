"""Final confidence of a 3D lesion: the detector's score combined with the FPR model's probability.

Used by the client after the ``lesion_fpr`` request and by the evaluation, so the threshold chosen
on validation data means the same in both. ``Lesion.max_score`` becomes the combined confidence
(everything downstream sorts, thresholds and reports on it); the detector's own best score is kept
in ``Lesion.detector_score`` and the FPR output in ``Lesion.fpr_probability``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from preprocess_backend.types import Lesion

RULES = ("fpr", "geometric", "product")


def combine(detector_score: np.ndarray | float, fpr_probability: np.ndarray | float, rule: str = "geometric") -> np.ndarray:
    """Combined confidence in [0, 1]: ``fpr`` (the FPR probability alone), ``geometric`` (sqrt of the
    product: both must agree, neither dominates) or ``product``."""
    d = np.clip(np.asarray(detector_score, dtype=np.float64), 0.0, 1.0)
    p = np.clip(np.asarray(fpr_probability, dtype=np.float64), 0.0, 1.0)
    if rule == "fpr":
        return p
    if rule == "geometric":
        return np.sqrt(d * p)
    if rule == "product":
        return d * p
    raise ValueError(f"unknown rescoring rule {rule!r} (one of {', '.join(RULES)})")


def apply_fpr(lesions: Sequence[Lesion], probabilities: Sequence[float] | np.ndarray, rule: str = "geometric") -> list[Lesion]:
    """Lesions re-scored (highest first, ids renumbered); ``probabilities[i]`` belongs to ``lesions[i]``."""
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if probs.size != len(lesions):
        raise ValueError(f"{probs.size} FPR probabilities for {len(lesions)} lesions")
    out = []
    for les, p in zip(lesions, probs, strict=True):
        det = les.detector_score if les.detector_score is not None else les.max_score
        score = float(combine(det, p, rule)) if math.isfinite(p) else float(det)
        out.append(replace(les, max_score=score, detector_score=float(det), fpr_probability=float(p)))
    return renumber(out)


def renumber(lesions: Sequence[Lesion]) -> list[Lesion]:
    """Highest confidence first, ids 1..n."""
    out = sorted(lesions, key=lambda les: -les.max_score)
    for i, les in enumerate(out, start=1):
        les.lesion_id = i
    return out
