"""Fit the ``logistic`` rescoring rule (``preprocess_backend.rescoring``) on validation candidates.

Each candidate lesion the served path would send to the FPR model is one sample: label 1 where it
hits a truth nodule (LUNA16's criterion, ``match_lesions``), 0 where it hits nothing; candidates on
an irrelevant finding are left out, as the FROC ignores them. The fit is an L2-regularised logistic
regression (Newton's method on standardised features): a handful of weights, so a few hundred
candidates of 20-30 validation series pin it down, and the operating threshold is then chosen on
the same scores as for the fixed rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from preprocess_backend.matching import match_lesions
from preprocess_backend.rescoring import lesion_features
from preprocess_backend.types import Lesion

DEFAULT_FEATURES = ("detector_logit", "fpr_logit", "log_diameter_mm")


def candidate_samples(
    lesions: Sequence[Sequence[Lesion]], probabilities: Sequence[np.ndarray], truths: Sequence[Any], features: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(X [N, F], y [N]) over every scan's candidates, irrelevant-finding hits left out."""
    xs, ys = [], []
    for les, probs, truth in zip(lesions, probabilities, truths, strict=True):
        if not les:
            continue
        match = match_lesions(les, truth)
        keep = np.array([bool(hits) or not match.ignored(i) for i, hits in enumerate(match.lesion_hits)])
        det = np.array([x.detector_score if x.detector_score is not None else x.max_score for x in les])
        diam = np.array([x.diameter_mm for x in les])
        xs.append(lesion_features(det, np.asarray(probs), diam, features)[keep])
        ys.append(np.array([1.0 if hits else 0.0 for hits in match.lesion_hits])[keep])
    if not xs:
        return np.zeros((0, len(features))), np.zeros(0)
    return np.concatenate(xs), np.concatenate(ys)


def fit_logistic(x: np.ndarray, y: np.ndarray, features: Sequence[str], l2: float = 1e-2, iterations: int = 100) -> dict[str, Any]:
    """Coefficients for ``preprocess_backend.rescoring.logistic_scores``."""
    if x.shape[0] == 0 or y.min(initial=1) == y.max(initial=0):
        raise ValueError(f"a logistic fit needs both nodules and false positives ({int(y.sum())} of {y.size} are nodules)")
    finite = np.isfinite(x).all(axis=1)
    x, y = x[finite], y[finite]
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = np.c_[(x - mean) / scale, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    penalty = np.r_[np.full(z.shape[1] - 1, l2), 0.0]  # no penalty on the bias
    for _ in range(iterations):
        s = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (s - y) + penalty * w
        hess = z.T @ (z * (s * (1 - s))[:, None]) + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return {
        "features": list(features),
        "mean": [round(float(v), 6) for v in mean],
        "scale": [round(float(v), 6) for v in scale],
        "weights": [round(float(v), 6) for v in w[:-1]],
        "bias": round(float(w[-1]), 6),
        "samples": int(y.size),
        "nodules": int(y.sum()),
        "l2": l2,
    }
