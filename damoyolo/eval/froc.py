"""LUNA16 FROC / CPM over scans, with bootstrap confidence bands (as the challenge's script does).

Per scan, ``case_result`` keeps the 100 best candidates (LUNA16's cap) and matches them to the truth
with ``preprocess_backend.matching`` (the one implementation of the hit criterion); ``froc`` turns
the per-scan matches into the FROC curve, sensitivity at 1/8 .. 8 FP/scan, CPM = their mean, and a
bootstrap 95 % interval over scans. Nodules are duck-typed (``nodule_id``, ``centre_mm``,
``diameter_mm``; ``type`` / ``attachment`` where known, for the breakdown).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ctlesion_phantoms.config import ATTACHMENTS, NODULE_TYPES
from preprocess_backend.matching import CandidateLike, MatchResult, NoduleLike, match_lesions
from preprocess_backend.types import Lesion

FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # LUNA16's operating points
TARGET_FP_RATE = 4.0  # the model card's sensitivity target is read here
TARGET_MIN_DIAMETER_MM = 4.0  # the model card's target counts nodules >= 4 mm
SIZE_BINS_MM: tuple[tuple[float, float], ...] = ((3.0, 4.0), (4.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 30.0))
# scan geometry bins (upper bounds inclusive): thin / standard / thick reconstructions, fine / typical / coarse pixels
SLICE_BINS_MM: tuple[tuple[str, float], ...] = (("<=1.25", 1.25), ("1.25-2.5", 2.5), (">2.5", math.inf))
PIXEL_BINS_MM: tuple[tuple[str, float], ...] = (("<0.7", 0.7 - 1e-9), ("0.7-0.85", 0.85), (">0.85", math.inf))
MAX_CANDIDATES_PER_SCAN = 100  # LUNA16 scores at most 100 candidates per scan


@dataclass
class CaseResult:
    """One scan's candidates (scores in lesion order) and their match against the truth."""

    case_id: str
    nodules: list[Any]  # NoduleLike
    match: MatchResult
    slice_mm: float | None = None  # the scan's slice thickness (else spacing), for the breakdown
    pixel_mm: float | None = None  # its in-plane pixel size

    @property
    def scores(self) -> np.ndarray:
        return np.asarray(self.match.lesion_scores, dtype=np.float64)


def case_result(
    lesions: Sequence[Lesion] | Sequence[CandidateLike],
    truth: Any,
    radius_scale: float = 1.0,
    max_candidates: int | None = MAX_CANDIDATES_PER_SCAN,
    irrelevant: Sequence[NoduleLike] | None = None,
) -> CaseResult:
    """Keep the ``max_candidates`` best lesions (LUNA16's cap) and match them to the truth.

    ``irrelevant`` (default: ``truth.irrelevant`` where the truth has it) are findings whose
    candidates are ignored, LUNA16's ``annotations_excluded.csv``.
    """
    kept = sorted(lesions, key=lambda les: -les.max_score)
    if max_candidates is not None:
        kept = kept[:max_candidates]
    irr = tuple(getattr(truth, "irrelevant", ()) if irrelevant is None else irrelevant)
    slice_mm, pixel_mm = _scan_scale(getattr(truth, "geometry", None))
    return CaseResult(truth.case_id, list(truth.nodules), match_lesions(kept, truth, radius_scale, irr), slice_mm, pixel_mm)


def _scan_scale(geometry: Any) -> tuple[float | None, float | None]:
    """(slice thickness or spacing, pixel size) in mm of a truth's geometry, None where unknown."""
    if geometry is None:
        return None, None
    thickness = getattr(geometry, "slice_thickness", None) or getattr(geometry, "slice_spacing", None)
    spacing = getattr(geometry, "pixel_spacing", None)
    pixel = float(min(spacing)) if spacing is not None and len(spacing) else None
    return (float(thickness) if thickness else None), pixel


@dataclass
class GroupSensitivity:
    """Sensitivity of one subgroup of nodules at the operating point of ``TARGET_FP_RATE``."""

    nodules: int
    detected: int

    @property
    def sensitivity(self) -> float:
        return self.detected / self.nodules if self.nodules else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"nodules": self.nodules, "detected": self.detected, "sensitivity": json_num(self.sensitivity)}


@dataclass
class FrocResult:
    """LUNA16 FROC over a set of scans.

    ``sensitivities[i]`` is the sensitivity at ``fp_rates[i]`` false positives per scan: the best
    sensitivity of any score threshold whose FP count per scan does not exceed the rate (LUNA16
    interpolates the same step curve). ``breakdown`` gives the sensitivity at ``TARGET_FP_RATE``
    by size (over ALL nodules, so the excluded 3-4 mm bin stays visible), type and attachment
    (over the nodules that count).
    """

    fp_rates: tuple[float, ...]
    sensitivities: list[float]
    cpm: float
    scans: int
    nodules: int  # nodules that count (>= min_diameter_mm)
    excluded_nodules: int
    candidates: int
    false_positives: int  # candidates hitting no nodule, at the lowest threshold
    detected: int  # nodules hit at the lowest threshold
    min_diameter_mm: float
    threshold_at_target: float  # score threshold of the TARGET_FP_RATE operating point
    curve_fps: list[float]
    curve_sensitivity: list[float]
    curve_thresholds: list[float]
    breakdown: dict[str, dict[str, GroupSensitivity]] = field(default_factory=dict)
    cpm_ci: tuple[float, float] | None = None
    sensitivity_ci: list[tuple[float, float]] | None = None
    bootstrap_samples: int = 0
    band_fps: list[float] = field(default_factory=list)  # bootstrap 95 % band of the curve (for the plot)
    band_low: list[float] = field(default_factory=list)
    band_high: list[float] = field(default_factory=list)

    @property
    def sensitivity_at_target(self) -> float:
        return self.sensitivity_at(TARGET_FP_RATE)

    @property
    def max_sensitivity(self) -> float:
        return self.detected / self.nodules if self.nodules else math.nan

    def sensitivity_at(self, rate: float) -> float:
        return _sens_at(np.asarray(self.curve_fps), np.asarray(self.curve_sensitivity), rate)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            k: v for k, v in asdict(self).items() if k not in ("breakdown", "cpm_ci", "sensitivity_ci", "sensitivities")
        }
        d["sensitivities"] = {rate_label(r): json_num(s) for r, s in zip(self.fp_rates, self.sensitivities, strict=True)}
        d["cpm"] = json_num(self.cpm)
        d["cpm_ci"] = None if self.cpm_ci is None else [json_num(v) for v in self.cpm_ci]
        d["sensitivity_ci"] = None if self.sensitivity_ci is None else [[json_num(a), json_num(b)] for a, b in self.sensitivity_ci]
        d["sensitivity_at_target"] = json_num(self.sensitivity_at_target)
        d["max_sensitivity"] = json_num(self.max_sensitivity)
        d["threshold_at_target"] = json_num(self.threshold_at_target)
        d["breakdown"] = {k: {g: s.to_dict() for g, s in v.items()} for k, v in self.breakdown.items()}
        for key in ("curve_fps", "curve_sensitivity", "curve_thresholds", "band_fps", "band_low", "band_high"):
            d[key] = [json_num(v) for v in d[key]]
        return d


def json_num(v: float) -> float | None:
    """JSON has no inf / NaN."""
    return float(v) if math.isfinite(v) else None


def rate_label(rate: float) -> str:
    return f"1/{round(1 / rate)}" if rate < 1 else f"{rate:g}"


def _sens_at(fps: np.ndarray, sens: np.ndarray, rate: float) -> float:
    """Sensitivity of the last curve point with fps <= rate (both arrays non-decreasing)."""
    i = int(np.searchsorted(fps, rate + 1e-9, side="right")) - 1  # 1e-9: k / n computed in floats
    return float(sens[max(i, 0)])


@dataclass
class _Entries:
    """Scored events of all scans, sorted by score descending; a tie group ends at ``ends``."""

    score: np.ndarray  # float64 [E]
    is_tp: np.ndarray  # bool [E]
    case: np.ndarray  # int [E] scan index (for the bootstrap weights)
    ends: np.ndarray  # indices of the last entry of each distinct score


def _entries(tp_scores: np.ndarray, tp_case: np.ndarray, fp_scores: np.ndarray, fp_case: np.ndarray) -> _Entries:
    found = np.isfinite(tp_scores)  # missed nodules have no score: they only count in the denominator
    score = np.concatenate([tp_scores[found], fp_scores])
    is_tp = np.concatenate([np.ones(int(found.sum()), bool), np.zeros(fp_scores.size, bool)])
    case = np.concatenate([tp_case[found], fp_case]).astype(np.int64)
    order = np.argsort(-score, kind="stable")
    score, is_tp, case = score[order], is_tp[order], case[order]
    # one curve point per distinct threshold: a threshold keeps every entry with score >= it
    ends = np.nonzero(np.append(score[1:] != score[:-1], True))[0] if score.size else np.zeros(0, np.int64)
    return _Entries(score, is_tp, case, ends)


def _curve(e: _Entries, case_weight: np.ndarray, nodules: float, scans: float) -> tuple[np.ndarray, np.ndarray]:
    """(fps per scan, sensitivity) at every distinct threshold, with the empty point (0, 0) first."""
    w = case_weight[e.case]
    tp = np.cumsum(np.where(e.is_tp, w, 0.0))[e.ends]
    fp = np.cumsum(np.where(e.is_tp, 0.0, w))[e.ends]
    fps = np.concatenate([[0.0], fp / scans])
    sens = np.concatenate([[0.0], tp / nodules]) if nodules > 0 else np.full(fps.size, math.nan)
    return fps, sens


def froc(
    case_results: Sequence[CaseResult],
    min_diameter_mm: float = 0.0,
    fp_rates: Sequence[float] = FP_RATES,
    bootstrap: int = 1000,
    seed: int = 0,
) -> FrocResult:
    """LUNA16 FROC / CPM over scans.

    Nodules smaller than ``min_diameter_mm`` leave the truth, and candidates hitting only such nodules
    are ignored (neither TP nor FP). A nodule's score is the best of the candidates hitting it;
    further hits on it are ignored; a candidate hitting no nodule is a false positive.
    ``bootstrap`` > 0 resamples scans with replacement for 95 % intervals of CPM and of each
    sensitivity (the LUNA16 evaluation does the same).
    """
    rates = tuple(float(r) for r in fp_rates)
    tp_scores, tp_case, fp_scores, fp_case = [], [], [], []
    counted: list[tuple[Any, float, CaseResult]] = []  # (nodule, best score or NaN, its scan), nodules that count
    all_nodules: list[tuple[Any, float, CaseResult]] = []
    candidates = 0
    for ci, cr in enumerate(case_results):
        m = cr.match
        candidates += len(m.lesion_scores)
        for n in cr.nodules:
            best = m.nodule_best_score.get(n.nodule_id, math.nan)
            all_nodules.append((n, best, cr))
            if n.diameter_mm >= min_diameter_mm:
                counted.append((n, best, cr))
                tp_scores.append(best)
                tp_case.append(ci)
        for li, (s, hits) in enumerate(zip(m.lesion_scores, m.lesion_hits, strict=True)):
            if not hits and not m.ignored(li):  # ignored: on an irrelevant finding
                fp_scores.append(s)
                fp_case.append(ci)
    scans = len(case_results)
    if scans == 0:
        raise ValueError("froc needs at least one scan")
    e = _entries(
        np.asarray(tp_scores, np.float64), np.asarray(tp_case, np.int64), np.asarray(fp_scores, np.float64), np.asarray(fp_case, np.int64)
    )
    n_nod = len(counted)
    fps, sens = _curve(e, np.ones(scans), float(n_nod), float(scans))
    thresholds = np.concatenate([[math.inf], e.score[e.ends]])
    sensitivities = [_sens_at(fps, sens, r) for r in rates]
    i_target = int(np.searchsorted(fps, TARGET_FP_RATE + 1e-9, side="right")) - 1
    thr = float(thresholds[max(i_target, 0)])

    result = FrocResult(
        fp_rates=rates,
        sensitivities=sensitivities,
        cpm=float(np.mean(sensitivities)),
        scans=scans,
        nodules=n_nod,
        excluded_nodules=len(all_nodules) - n_nod,
        candidates=candidates,
        false_positives=len(fp_scores),
        detected=int(np.isfinite(np.asarray(tp_scores, np.float64)).sum()),
        min_diameter_mm=float(min_diameter_mm),
        threshold_at_target=thr,
        curve_fps=fps.tolist(),
        curve_sensitivity=sens.tolist(),
        curve_thresholds=thresholds.tolist(),
        breakdown=_breakdown(counted, all_nodules, thr),
    )
    if bootstrap > 0 and n_nod > 0:
        _bootstrap(result, e, np.asarray(tp_case, np.int64), scans, bootstrap, seed)
    return result


def _size_bin(d: float) -> str:
    for lo, hi in SIZE_BINS_MM:
        if lo <= d < hi or (hi == SIZE_BINS_MM[-1][1] and d == hi):
            return f"{lo:g}-{hi:g}"
    return f"<{SIZE_BINS_MM[0][0]:g}" if d < SIZE_BINS_MM[0][0] else f">{SIZE_BINS_MM[-1][1]:g}"


def scale_bin(value: float | None, bins: Sequence[tuple[str, float]]) -> str:
    if value is None:
        return "unknown"
    return next(name for name, upper in bins if value <= upper)


def _breakdown(
    counted: list[tuple[Any, float, CaseResult]], all_nodules: list[tuple[Any, float, CaseResult]], threshold: float
) -> dict[str, dict[str, GroupSensitivity]]:
    def tally(
        pairs: list[tuple[Any, float, CaseResult]], key: Callable[[Any, CaseResult], str], order: Sequence[str]
    ) -> dict[str, GroupSensitivity]:
        groups = {name: GroupSensitivity(0, 0) for name in order}
        for n, best, cr in pairs:
            g = groups.setdefault(key(n, cr), GroupSensitivity(0, 0))
            g.nodules += 1
            g.detected += int(math.isfinite(best) and best >= threshold)
        return groups

    return {
        "size_mm": tally(all_nodules, lambda n, _: _size_bin(n.diameter_mm), [f"{lo:g}-{hi:g}" for lo, hi in SIZE_BINS_MM]),
        "type": tally(counted, lambda n, _: getattr(n, "type", "unknown"), NODULE_TYPES),
        "attachment": tally(counted, lambda n, _: getattr(n, "attachment", "unknown"), ATTACHMENTS),
        "slice_mm": tally(counted, lambda _, cr: scale_bin(cr.slice_mm, SLICE_BINS_MM), [b for b, _ in SLICE_BINS_MM]),
        "pixel_mm": tally(counted, lambda _, cr: scale_bin(cr.pixel_mm, PIXEL_BINS_MM), [b for b, _ in PIXEL_BINS_MM]),
    }


def _bootstrap(result: FrocResult, e: _Entries, tp_case_all: np.ndarray, scans: int, samples: int, seed: int) -> None:
    """Resample scans with replacement: a scan drawn twice counts its nodules and FPs twice."""
    rng = np.random.default_rng(seed)
    grid = np.geomspace(result.fp_rates[0], result.fp_rates[-1], 49)
    cpms, sens_rates, sens_grid = [], [], []
    for _ in range(samples):
        weight = np.bincount(rng.integers(0, scans, scans), minlength=scans).astype(np.float64)
        n_nod = float(weight[tp_case_all].sum())
        if n_nod == 0:
            continue  # no nodule in this draw: sensitivity undefined
        fps, sens = _curve(e, weight, n_nod, float(scans))
        s = [_sens_at(fps, sens, r) for r in result.fp_rates]
        cpms.append(np.mean(s))
        sens_rates.append(s)
        sens_grid.append([_sens_at(fps, sens, r) for r in grid])
    if not cpms:
        return
    lo, hi = np.percentile(cpms, [2.5, 97.5])
    result.cpm_ci = (float(lo), float(hi))
    pr = np.percentile(np.asarray(sens_rates), [2.5, 97.5], axis=0)
    result.sensitivity_ci = [(float(a), float(b)) for a, b in zip(pr[0], pr[1], strict=True)]
    pg = np.percentile(np.asarray(sens_grid), [2.5, 97.5], axis=0)
    result.bootstrap_samples = len(cpms)
    result.band_fps, result.band_low, result.band_high = grid.tolist(), pg[0].tolist(), pg[1].tolist()

