"""Lesion-to-truth matching with LUNA16's hit criterion (pure numpy; the client demo, evaluation and
training validation all use this one implementation).

A candidate (a 3D lesion) hits a nodule when its centre lies strictly within the nodule's radius of
the nodule's centre (Euclidean distance in patient mm, LPS). Every candidate that hits a nodule
detects it; a nodule hit by several candidates counts once, with the best score, and the extra hits
are neither true nor false positives (LUNA16 ignores them). A candidate that hits no nodule but lies
within an irrelevant finding (LUNA16's ``annotations_excluded.csv``; a finding without a diameter
counts as 10 mm, as the challenge's script does) is ignored; any other candidate is a false
positive. ``damoyolo.eval.froc.froc`` turns these per-case results into FROC / CPM.

Truth is duck-typed: anything with ``.nodules``, each having ``nodule_id``, ``centre_mm`` and
``diameter_mm`` (the phantoms' ``CaseTruth`` and ``damoyolo.data``'s ``Case`` both do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from preprocess_backend.types import Lesion

EXCLUDED_DEFAULT_DIAMETER_MM = 10.0  # LUNA16's script: an excluded finding with diameter < 0 counts as 10 mm


class NoduleLike(Protocol):
    nodule_id: int
    centre_mm: tuple[float, float, float]
    diameter_mm: float


class CandidateLike(Protocol):
    """What matching reads of a candidate: a ``Lesion``, or a row of a LUNA16 submission CSV."""

    @property
    def centre_mm(self) -> tuple[float, float, float]: ...

    @property
    def max_score(self) -> float: ...


class TruthLike(Protocol):
    @property
    def nodules(self) -> Sequence[NoduleLike]: ...


@dataclass
class MatchResult:
    """Matching of one case's candidates against its truth.

    Per lesion (same order as the input): ``lesion_nodule`` is the hit nodule's id (the nearest one
    in units of its radius when a candidate hits overlapping nodules) or None; ``lesion_hits`` lists
    every nodule it hits (LUNA16 lets one candidate detect two overlapping nodules);
    ``lesion_ignored`` marks candidates that hit no nodule but an irrelevant finding.
    Per nodule (keyed by ``nodule_id``): ``nodule_hit`` and ``nodule_best_score`` (NaN when missed).
    """

    lesion_nodule: list[int | None]
    lesion_hits: list[tuple[int, ...]]
    lesion_scores: list[float]
    nodule_hit: dict[int, bool] = field(default_factory=dict)
    nodule_best_score: dict[int, float] = field(default_factory=dict)
    radius_scale: float = 1.0
    lesion_ignored: list[bool] = field(default_factory=list)

    def ignored(self, index: int) -> bool:
        return bool(self.lesion_ignored[index]) if index < len(self.lesion_ignored) else False

    @property
    def true_positives(self) -> int:
        """Nodules detected (each counts once however many candidates hit it)."""
        return sum(self.nodule_hit.values())

    @property
    def false_positives(self) -> int:
        """Candidates that hit no nodule at all and no irrelevant finding."""
        return sum(1 for i, hits in enumerate(self.lesion_hits) if not hits and not self.ignored(i))

    @property
    def duplicate_hits(self) -> int:
        """Candidates hitting a nodule that a higher-scoring candidate already hits (ignored)."""
        hitting = sum(1 for hits in self.lesion_hits if hits)
        return max(0, hitting - self.true_positives)

    @property
    def missed(self) -> list[int]:
        return [nid for nid, hit in self.nodule_hit.items() if not hit]

    def to_dict(self) -> dict[str, Any]:
        return {
            "lesion_nodule": list(self.lesion_nodule),
            "lesion_hits": [list(h) for h in self.lesion_hits],
            "lesion_scores": [float(s) for s in self.lesion_scores],
            "nodule_hit": {str(k): bool(v) for k, v in self.nodule_hit.items()},
            "nodule_best_score": {str(k): (None if math.isnan(v) else float(v)) for k, v in self.nodule_best_score.items()},
            "radius_scale": self.radius_scale,
            "true_positives": self.true_positives,
            "false_positives": self.false_positives,
            "ignored": sum(self.ignored(i) for i in range(len(self.lesion_hits))),
        }


def _inside(centres: np.ndarray, nodules: Sequence[NoduleLike], radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth_c = np.array([n.centre_mm for n in nodules], dtype=np.float64).reshape(-1, 3)
    dist = np.linalg.norm(centres[:, None, :] - truth_c[None, :, :], axis=-1)  # [L, N]
    return dist, dist < radius[None, :]  # strictly inside, as LUNA16's evaluation script tests it


def match_lesions(
    lesions: Sequence[Lesion] | Sequence[CandidateLike],
    truth: TruthLike,
    radius_scale: float = 1.0,
    irrelevant: Sequence[NoduleLike] = (),
) -> MatchResult:
    """Match candidates to truth nodules by LUNA16's criterion (distance < diameter / 2 * radius_scale).

    The candidate's score is ``Lesion.max_score``. ``irrelevant`` findings make the candidates that
    hit them (and no nodule) ignored instead of false positives.
    """
    if radius_scale <= 0:
        raise ValueError("radius_scale must be positive")
    nodules = list(truth.nodules)
    scores = [float(les.max_score) for les in lesions]
    hit = {n.nodule_id: False for n in nodules}
    best = {n.nodule_id: math.nan for n in nodules}
    centres = np.array([les.centre_mm for les in lesions], dtype=np.float64).reshape(-1, 3)
    ignored = [False] * len(lesions)
    if lesions and irrelevant:
        r_irr = np.array(
            [(n.diameter_mm if n.diameter_mm > 0 else EXCLUDED_DEFAULT_DIAMETER_MM) / 2.0 * radius_scale for n in irrelevant]
        )
        ignored = _inside(centres, irrelevant, r_irr)[1].any(axis=1).tolist()
    if not lesions or not nodules:
        return MatchResult(
            lesion_nodule=[None] * len(lesions),
            lesion_hits=[()] * len(lesions),
            lesion_scores=scores,
            nodule_hit=hit,
            nodule_best_score=best,
            radius_scale=radius_scale,
            lesion_ignored=ignored,
        )

    radius = np.array([n.diameter_mm / 2.0 * radius_scale for n in nodules], dtype=np.float64)
    dist, inside = _inside(centres, nodules, radius)

    lesion_nodule: list[int | None] = []
    lesion_hits: list[tuple[int, ...]] = []
    for li in range(len(lesions)):
        cols = np.nonzero(inside[li])[0]
        lesion_hits.append(tuple(nodules[c].nodule_id for c in cols))
        if cols.size == 0:
            lesion_nodule.append(None)
            continue
        ignored[li] = False  # a hit on a nodule is a hit, whatever else it lies in
        nearest = cols[np.argmin(dist[li, cols] / radius[cols])]  # relative distance: the nodule it sits deepest in
        lesion_nodule.append(nodules[nearest].nodule_id)
        for c in cols:
            nid = nodules[c].nodule_id
            hit[nid] = True
            if math.isnan(best[nid]) or scores[li] > best[nid]:
                best[nid] = scores[li]
    return MatchResult(
        lesion_nodule=lesion_nodule,
        lesion_hits=lesion_hits,
        lesion_scores=scores,
        nodule_hit=hit,
        nodule_best_score=best,
        radius_scale=radius_scale,
        lesion_ignored=ignored,
    )
