"""Final confidence of a 3D lesion: the detector's score combined with the FPR model's probability.

Used by the client after the ``lesion_fpr`` request and by the evaluation, so the threshold chosen
on validation data means the same in both. ``Lesion.max_score`` becomes the combined confidence
(everything downstream sorts, thresholds and reports on it); the detector's own best score is kept
in ``Lesion.detector_score`` and the FPR output in ``Lesion.fpr_probability``.

Rules: ``fpr`` (the FPR probability alone), ``geometric`` (sqrt of the product: both must agree,
neither dominates), ``product``, and ``logistic``: a logistic regression on the detector's logit,
the FPR logit and the lesion's size, fitted on validation candidates (``ctlesion_fpr.rescoring_fit``)
and carried with the FPR model as ``coefficients`` (its metadata, the served config's parameters).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from preprocess_backend.types import Lesion

RULES = ("fpr", "geometric", "product")  # the fixed rules; "logistic" needs fitted coefficients
LOGISTIC = "logistic"
LOGIT_EPS = 1e-4  # probabilities clipped to [eps, 1 - eps] before the logit: finite features
DIAMETER_RANGE_MM = (1.0, 60.0)  # log-size feature clipped here: a 100 mm merge is not "more" than 60


def logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(q / (1.0 - q))


def lesion_features(detector_score: np.ndarray, fpr_probability: np.ndarray, diameter_mm: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """[N, len(names)] float64 features of the logistic rule, by name."""
    table = {
        "detector_logit": lambda: logit(detector_score),
        "fpr_logit": lambda: logit(fpr_probability),
        "log_diameter_mm": lambda: np.log(np.clip(np.asarray(diameter_mm, dtype=np.float64), *DIAMETER_RANGE_MM)),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown rescoring feature(s) {unknown} (known: {', '.join(table)})")
    n = np.asarray(detector_score).reshape(-1).size
    return np.stack([np.broadcast_to(table[name](), (n,)).astype(np.float64) for name in names], axis=1) if names else np.zeros((n, 0))


def logistic_scores(features: np.ndarray, coefficients: Mapping[str, Any]) -> np.ndarray:
    """sigmoid(((x - mean) / scale) . weights + bias) per row; an unknown feature (a lesion without a
    measured diameter: NaN) counts as the validation mean."""
    mean = np.asarray(coefficients["mean"], dtype=np.float64)
    scale = np.asarray(coefficients["scale"], dtype=np.float64)
    weights = np.asarray(coefficients["weights"], dtype=np.float64)
    standard = (features - mean) / scale
    standard[~np.isfinite(standard)] = 0.0
    z = standard @ weights + float(coefficients["bias"])
    return 1.0 / (1.0 + np.exp(-z))


def check_coefficients(coefficients: Mapping[str, Any]) -> None:
    names = list(coefficients.get("features", ()))
    for key in ("mean", "scale", "weights"):
        if len(coefficients.get(key, ())) != len(names):
            raise ValueError(f"logistic rescoring: {len(names)} features but {len(coefficients.get(key, ()))} {key}")
    if not all(float(s) > 0 for s in coefficients["scale"]):
        raise ValueError("logistic rescoring: scales must be > 0")
    lesion_features(np.zeros(1), np.zeros(1), np.ones(1), names)  # names known


def check_rule(rule: str, coefficients: Mapping[str, Any] | None) -> None:
    """Refuse a rule this code cannot apply (unknown, or ``logistic`` without valid coefficients)."""
    if rule not in (*RULES, LOGISTIC):
        raise ValueError(f"unknown rescoring rule {rule!r} (one of {', '.join((*RULES, LOGISTIC))})")
    if rule == LOGISTIC:
        if coefficients is None:
            raise ValueError("the logistic rescoring rule needs its fitted coefficients")
        check_coefficients(coefficients)


def combine(
    detector_score: np.ndarray | float,
    fpr_probability: np.ndarray | float,
    rule: str = "geometric",
    coefficients: Mapping[str, Any] | None = None,
    diameter_mm: np.ndarray | float | None = None,
) -> np.ndarray:
    """Combined confidence in [0, 1] by ``rule`` (``coefficients`` and ``diameter_mm`` for ``logistic``)."""
    d = np.clip(np.asarray(detector_score, dtype=np.float64), 0.0, 1.0)
    p = np.clip(np.asarray(fpr_probability, dtype=np.float64), 0.0, 1.0)
    if rule == "fpr":
        return p
    if rule == "geometric":
        return np.sqrt(d * p)
    if rule == "product":
        return d * p
    if rule == LOGISTIC:
        if coefficients is None:
            raise ValueError("the logistic rescoring rule needs its fitted coefficients")
        diam = np.full(d.shape, math.nan) if diameter_mm is None else np.asarray(diameter_mm, dtype=np.float64)
        shape = np.broadcast(d, p, diam).shape
        feats = lesion_features(np.broadcast_to(d, shape).reshape(-1), np.broadcast_to(p, shape).reshape(-1),
                                np.broadcast_to(diam, shape).reshape(-1), list(coefficients["features"]))  # fmt: skip
        return logistic_scores(feats, coefficients).reshape(shape)
    raise ValueError(f"unknown rescoring rule {rule!r} (one of {', '.join((*RULES, LOGISTIC))})")


def apply_fpr(
    lesions: Sequence[Lesion],
    probabilities: Sequence[float] | np.ndarray,
    rule: str = "geometric",
    coefficients: Mapping[str, Any] | None = None,
) -> list[Lesion]:
    """Lesions re-scored (highest first, ids renumbered); ``probabilities[i]`` belongs to ``lesions[i]``."""
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if probs.size != len(lesions):
        raise ValueError(f"{probs.size} FPR probabilities for {len(lesions)} lesions")
    det = np.array([les.detector_score if les.detector_score is not None else les.max_score for les in lesions], dtype=np.float64)
    diam = np.array([les.diameter_mm for les in lesions], dtype=np.float64)
    finite = np.isfinite(probs)
    scores = det.copy()
    if finite.any():
        scores[finite] = combine(det[finite], probs[finite], rule, coefficients, diam[finite])
    out = [replace(les, max_score=float(s), detector_score=float(d), fpr_probability=float(p))
           for les, s, d, p in zip(lesions, scores, det, probs, strict=True)]  # fmt: skip
    return renumber(out)


def renumber(lesions: Sequence[Lesion]) -> list[Lesion]:
    """Highest confidence first, ids 1..n."""
    out = sorted(lesions, key=lambda les: -les.max_score)
    for i, les in enumerate(out, start=1):
        les.lesion_id = i
    return out
