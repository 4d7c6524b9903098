"""Evaluation of the detector as the field measures it: LUNA16 FROC / CPM per lesion, COCO mAP per slice.

    ctlesion evaluate --checkpoint models/ctlesion_damoyolo.pt --cases 20 --seed TEST_SEED --out work/eval
    ctlesion evaluate --onnx work/export/detector_int8.onnx --cases 20 --out work/eval_int8

Lesion level (``froc``): every case runs through the SERVING pipeline (``run_detector_on_case``:
preprocess_slab -> detector -> postprocess_slab -> link_lesions, slab by slab with a halo, exactly
what the client and the Triton ensemble do), lesions are matched to the phantom truth with
LUNA16's hit criterion (``ctlesion_phantoms.matching``) and FROC / CPM follow LUNA16's definitions:
sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 false positives per scan, CPM = their mean, a bootstrap
95 % interval over scans. The model-card target counts nodules >= 4 mm: smaller ones leave the
truth and candidates on them are ignored, as LUNA16 treats its irrelevant findings.

Slice level (``slice_map``): COCO mAP@0.5 and mAP@.5:.95 with pycocotools, the truth boxes being
the spheres' cross-sections on each slice (``truth_slice_boxes``, also what training learns from).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ctlesion_phantoms.config import ATTACHMENTS, NODULE_TYPES, PhantomConfig
from ctlesion_phantoms.matching import MatchResult, match_lesions
from ctlesion_phantoms.splits import DEMO_SEED, TEST_SEED, TRAIN_SEED, VALIDATION_SEED, split_of
from ctlesion_phantoms.truth import CaseTruth, NoduleTruth
from preprocess_backend.dicom_io import read_header, slice_normal
from preprocess_backend.errors import DicomInputError
from preprocess_backend.lesions import link_lesions
from preprocess_backend.pipeline import postprocess_slab, preprocess_slab
from preprocess_backend.series import SeriesGeometry
from preprocess_backend.types import Detection, Lesion, Options

log = logging.getLogger(__name__)

FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # LUNA16's operating points
TARGET_FP_RATE = 4.0  # the model card's sensitivity target is read here
TARGET_MIN_DIAMETER_MM = 4.0  # the model card's target counts nodules >= 4 mm
SIZE_BINS_MM: tuple[tuple[float, float], ...] = ((3.0, 4.0), (4.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 30.0))
MAX_CANDIDATES_PER_SCAN = 100  # LUNA16 scores at most 100 candidates per scan
EVAL_SCORE_THRESHOLD = 0.05  # low, so the FROC curve reaches far enough to the right

PredictFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
SliceBoxes = dict[int, np.ndarray]


# ============================================================================ lesion level: FROC


@dataclass
class CaseResult:
    """One scan's candidates (scores in lesion order) and their match against the truth."""

    case_id: str
    nodules: list[NoduleTruth]
    match: MatchResult

    @property
    def scores(self) -> np.ndarray:
        return np.asarray(self.match.lesion_scores, dtype=np.float64)


def case_result(
    lesions: Sequence[Lesion],
    truth: CaseTruth,
    radius_scale: float = 1.0,
    max_candidates: int | None = MAX_CANDIDATES_PER_SCAN,
) -> CaseResult:
    """Keep the ``max_candidates`` best lesions (LUNA16's cap) and match them to the truth."""
    kept = sorted(lesions, key=lambda les: -les.max_score)
    if max_candidates is not None:
        kept = kept[:max_candidates]
    return CaseResult(truth.case_id, list(truth.nodules), match_lesions(kept, truth, radius_scale))


@dataclass
class GroupSensitivity:
    """Sensitivity of one subgroup of nodules at the operating point of ``TARGET_FP_RATE``."""

    nodules: int
    detected: int

    @property
    def sensitivity(self) -> float:
        return self.detected / self.nodules if self.nodules else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"nodules": self.nodules, "detected": self.detected, "sensitivity": _num(self.sensitivity)}


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
        d["sensitivities"] = {_rate_label(r): _num(s) for r, s in zip(self.fp_rates, self.sensitivities, strict=True)}
        d["cpm"] = _num(self.cpm)
        d["cpm_ci"] = None if self.cpm_ci is None else [_num(v) for v in self.cpm_ci]
        d["sensitivity_ci"] = None if self.sensitivity_ci is None else [[_num(a), _num(b)] for a, b in self.sensitivity_ci]
        d["sensitivity_at_target"] = _num(self.sensitivity_at_target)
        d["max_sensitivity"] = _num(self.max_sensitivity)
        d["threshold_at_target"] = _num(self.threshold_at_target)
        d["breakdown"] = {k: {g: s.to_dict() for g, s in v.items()} for k, v in self.breakdown.items()}
        for key in ("curve_fps", "curve_sensitivity", "curve_thresholds", "band_fps", "band_low", "band_high"):
            d[key] = [_num(v) for v in d[key]]
        return d


def _num(v: float) -> float | None:
    """JSON has no inf / NaN."""
    return float(v) if math.isfinite(v) else None


def _rate_label(rate: float) -> str:
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
    counted: list[tuple[NoduleTruth, float]] = []  # (nodule, best score or NaN), nodules that count
    all_nodules: list[tuple[NoduleTruth, float]] = []
    candidates = 0
    for ci, cr in enumerate(case_results):
        m = cr.match
        candidates += len(m.lesion_scores)
        for n in cr.nodules:
            best = m.nodule_best_score.get(n.nodule_id, math.nan)
            all_nodules.append((n, best))
            if n.diameter_mm >= min_diameter_mm:
                counted.append((n, best))
                tp_scores.append(best)
                tp_case.append(ci)
        for s, hits in zip(m.lesion_scores, m.lesion_hits, strict=True):
            if not hits:
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


def _breakdown(
    counted: list[tuple[NoduleTruth, float]], all_nodules: list[tuple[NoduleTruth, float]], threshold: float
) -> dict[str, dict[str, GroupSensitivity]]:
    def tally(pairs: list[tuple[NoduleTruth, float]], key: Callable[[NoduleTruth], str], order: Sequence[str]) -> dict[str, GroupSensitivity]:
        groups = {name: GroupSensitivity(0, 0) for name in order}
        for n, best in pairs:
            g = groups.setdefault(key(n), GroupSensitivity(0, 0))
            g.nodules += 1
            g.detected += int(math.isfinite(best) and best >= threshold)
        return groups

    return {
        "size_mm": tally(all_nodules, lambda n: _size_bin(n.diameter_mm), [f"{lo:g}-{hi:g}" for lo, hi in SIZE_BINS_MM]),
        "type": tally(counted, lambda n: n.type, NODULE_TYPES),
        "attachment": tally(counted, lambda n: n.attachment, ATTACHMENTS),
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


# ============================================================================ slice level: mAP


def truth_slice_boxes(truth: CaseTruth, min_fraction: float = 0.5, min_radius_mm: float = 1.0) -> dict[int, np.ndarray]:
    """Per slice index, the truth boxes [M, 4] (x1, y1, x2, y2 in pixels, x = column) of the nodules.

    A nodule is a sphere of radius R: on a slice dz mm from its centre the cross-section has radius
    r = sqrt(R^2 - dz^2). A slice gets a box only where r >= ``min_fraction`` * R and r >=
    ``min_radius_mm`` (the thin end caps are not something a detector should be asked to find).
    Pixel coordinates follow the serving pipeline: pixel (row i, column j) has its centre at x = j,
    y = i, so a box centre maps back to the nodule's LPS centre through ImagePositionPatient.
    """
    out: dict[int, list[list[float]]] = {}
    for k, _, box in _slice_boxes(truth, min_fraction, min_radius_mm):
        out.setdefault(k, []).append(box)
    return {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in sorted(out.items())}


def truth_slice_nodules(truth: CaseTruth, min_fraction: float = 0.5, min_radius_mm: float = 1.0) -> dict[int, list[int]]:
    """Per slice index, the index in ``truth.nodules`` of each box of ``truth_slice_boxes`` (same order)."""
    out: dict[int, list[int]] = {}
    for k, n, _ in _slice_boxes(truth, min_fraction, min_radius_mm):
        out.setdefault(k, []).append(n)
    return dict(sorted(out.items()))


def _slice_boxes(truth: CaseTruth, min_fraction: float, min_radius_mm: float) -> Iterator[tuple[int, int, list[float]]]:
    g = truth.geometry
    row_sp, col_sp = g.pixel_spacing
    z = np.asarray(g.origin[2], np.float64) + np.arange(g.slices) * g.slice_spacing
    for index, n in enumerate(truth.nodules):
        radius = n.diameter_mm / 2.0
        _, ci, cj = n.centre_voxel
        dz = z - n.centre_mm[2]
        r = np.sqrt(np.clip(radius**2 - dz**2, 0.0, None))
        for k in np.nonzero((r >= min_fraction * radius) & (r >= min_radius_mm) & (r > 0))[0]:
            rx, ry = r[k] / col_sp, r[k] / row_sp
            yield int(k), index, [cj - rx, ci - ry, cj + rx, ci + ry]


def slice_map(
    predictions: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
) -> dict[str, float]:
    """COCO-style box mAP over slices with pycocotools.

    ``predictions[i]`` = (boxes [P, 4] xyxy, scores [P], classes [P]) and ``ground_truth[i]`` =
    (boxes [M, 4] xyxy, classes [M]) of image i; images without truth still count (their boxes are
    false positives). Returns map50, map50_95 (NaN when there is no truth box at all) and counts.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction images vs {len(ground_truth)} truth images")
    images, anns, dets = [], [], []
    classes: set[int] = set()
    for img_id, ((pb, ps, pc), (gb, gc)) in enumerate(zip(predictions, ground_truth, strict=True), start=1):
        images.append({"id": img_id, "width": 1, "height": 1})
        for box, c in zip(np.asarray(gb, np.float64).reshape(-1, 4), np.asarray(gc).reshape(-1), strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            classes.add(int(c))
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(c), "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
        pbox = np.asarray(pb, np.float64).reshape(-1, 4)
        for box, s, c in zip(pbox, np.asarray(ps).reshape(-1), np.asarray(pc).reshape(-1), strict=True):
            classes.add(int(c))
            dets.append({"image_id": img_id, "category_id": int(c), "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])], "score": float(s)})
    counts = {"images": float(len(images)), "truth_boxes": float(len(anns)), "predictions": float(len(dets))}
    if not anns:
        return {"map50": math.nan, "map50_95": math.nan, **counts}
    if not dets:  # pycocotools' loadRes cannot take an empty list; no prediction means AP 0
        return {"map50": 0.0, "map50_95": 0.0, **counts}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its table
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in sorted(classes)]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats[0] = AP@[.5:.95], stats[1] = AP@.5 (area all, 100 detections per image); -1 means undefined
    return {"map50": max(float(ev.stats[1]), 0.0), "map50_95": max(float(ev.stats[0]), 0.0), **counts}


def slice_map_inputs(
    detections: Sequence[Detection], truth: CaseTruth, **truth_kw: float
) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
    """One image per slice of the series (empty slices included) for ``slice_map``."""
    boxes = truth_slice_boxes(truth, **truth_kw)
    preds, gts = [], []
    by_slice: dict[int, list[Detection]] = {}
    for d in detections:
        by_slice.setdefault(d.slice_index, []).append(d)
    for k in range(truth.geometry.slices):
        ds = by_slice.get(k, [])
        preds.append(
            (
                np.array([d.box_px for d in ds], np.float64).reshape(-1, 4),
                np.array([d.score for d in ds], np.float64),
                np.array([d.class_id for d in ds], np.int64),
            )
        )
        gb = boxes.get(k, np.zeros((0, 4)))
        gts.append((gb, np.zeros(len(gb), np.int64)))  # the phantoms have one class: nodule
    return preds, gts


# ============================================================================ the serving pipeline on a case


def eval_options(**overrides: Any) -> Options:
    """Serving options with a low score threshold (FROC needs the low-confidence tail) and float32 images."""
    return replace(Options(score_threshold=EVAL_SCORE_THRESHOLD, image_dtype="float32"), **overrides)


def _series_files(case_dir: Path) -> list[Path]:
    d = Path(case_dir)
    d = d / "series" if (d / "series").is_dir() else d
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in (".dcm", ""))
    if not files:
        raise FileNotFoundError(f"no DICOM files in {d}")
    return files


def _order_series(files: Sequence[Path], options: Options) -> tuple[list[Path], SeriesGeometry]:
    """Order by position along the normal from headers only (as the client does) and build the geometry."""
    headers = [read_header(p, p.name, options.limits) for p in files]
    series = {h.series_instance_uid for h in headers}
    if len(series) != 1:
        raise DicomInputError(str(files[0].parent), f"{len(series)} series in one case folder")
    first = headers[0]
    if first.orientation is None or first.pixel_spacing is None or any(h.position is None for h in headers):
        raise DicomInputError(first.source, "no geometry: cannot order the series or place lesions in mm")
    normal = slice_normal(first.orientation)
    order = np.argsort([float(np.dot(h.position, normal)) for h in headers], kind="stable")  # type: ignore[arg-type]
    ordered = [headers[i] for i in order]
    geometry = SeriesGeometry(
        positions=np.array([h.position for h in ordered], dtype=np.float64),
        orientation=np.asarray(first.orientation, dtype=np.float64),
        pixel_spacing=first.pixel_spacing,
        rows=first.rows,
        columns=first.columns,
        slice_thickness=first.slice_thickness,
        sop_instance_uids=[h.sop_instance_uid for h in ordered],
    )
    return [files[i] for i in order], geometry


def run_detector_on_case(
    predict_fn: PredictFn,
    case_dir: Path,
    options: Options | None = None,
    slab_size: int = 16,
    halo: int = 1,
    batch_size: int = 8,
) -> tuple[list[Detection], list[Lesion]]:
    """Run the serving pipeline on one case's DICOM series; detections carry series slice indices.

    The series is cut into slabs of ``slab_size`` owned slices plus ``halo`` context slices at each end
    (so every owned slice's 2.5D stack sees its real neighbours); each slab goes through
    ``preprocess_slab`` -> ``predict_fn`` -> ``postprocess_slab`` and detections on halo slices are
    dropped (the slab owning the slice reports them). The kept detections are linked into lesions
    with the whole series' geometry.
    """
    options = options or eval_options()
    if slab_size < 1 or halo < 0:
        raise ValueError("slab_size must be >= 1 and halo >= 0")
    files, geometry = _order_series(_series_files(case_dir), options)
    n = len(files)
    detections: list[Detection] = []
    for start in range(0, n, slab_size):
        stop = min(start + slab_size, n)
        lo, hi = max(0, start - halo), min(n, stop + halo)
        slab = preprocess_slab([files[i].read_bytes() for i in range(lo, hi)], options)
        got = [slab.meta.uid(i) for i in range(len(slab.meta))]
        if got != geometry.sop_instance_uids[lo:hi]:  # the server orders the same way; anything else is a bug
            raise DicomInputError(str(case_dir), f"slab {lo}:{hi} came back in another slice order")
        parts = [predict_fn(np.ascontiguousarray(slab.images[i : i + batch_size])) for i in range(0, len(slab.images), batch_size)]
        scores = np.concatenate([np.asarray(p[0], np.float32) for p in parts])
        boxes = np.concatenate([np.asarray(p[1], np.float32) for p in parts])
        for d in postprocess_slab(scores, boxes, slab.meta, options):
            k = lo + d.slice_index
            if start <= k < stop:  # halo slices belong to the neighbouring slab
                detections.append(replace(d, slice_index=k))
    lesions = link_lesions(detections, geometry, link_iou=options.link_iou, max_gap=options.link_max_gap)
    return detections, lesions


# ============================================================================ predictors


@dataclass
class ModelInfo:
    """What the evaluation needs to know about the model it runs."""

    source: str
    backend: str  # "torch" | "onnxruntime"
    model_size: int
    in_channels: int
    window: str = "lung"
    meta: dict[str, Any] = field(default_factory=dict)


def torch_predictor(checkpoint: Path, device: str = "cpu", variant: str | None = None) -> tuple[PredictFn, ModelInfo]:
    """Checkpoint -> fused eval-mode model; ``predict_fn(images) -> (scores, boxes)`` numpy."""
    import torch

    from ctlesion_export.cli import load_detector

    model, meta = load_detector(Path(checkpoint), variant)
    model.fuse()  # serve what is deployed: RepConv branches folded
    model.eval().to(device)

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            scores, boxes = model(torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device))
        return scores.float().cpu().numpy(), boxes.float().cpu().numpy()

    info = ModelInfo(
        source=str(checkpoint),
        backend="torch",
        model_size=int(meta.get("model_size", 512)),
        in_channels=int(meta.get("in_channels", 3)),
        window=str(meta.get("window") or "lung"),
        meta={k: v for k, v in meta.items() if isinstance(v, str | int | float | bool | list | dict)},
    )
    return predict, info


def onnx_predictor(path: Path, threads: int = 0, window: str = "lung") -> tuple[PredictFn, ModelInfo]:
    """ONNX detector (fp32 or INT8 QDQ) in onnxruntime on the CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = inp.shape
    size = int(shape[2]) if isinstance(shape[2], int) else 512
    channels = int(shape[1]) if isinstance(shape[1], int) else 3

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, boxes = sess.run(["scores", "boxes"], {inp.name: np.ascontiguousarray(images, np.float32)})
        return scores, boxes

    return predict, ModelInfo(source=str(path), backend="onnxruntime", model_size=size, in_channels=channels, window=window)


# ============================================================================ the whole evaluation


@dataclass
class EvaluationReport:
    model: ModelInfo
    cases: int
    froc_target: FrocResult  # nodules >= TARGET_MIN_DIAMETER_MM (the model card's target set)
    froc_all: FrocResult  # every nodule
    slice_map: dict[str, float]
    seconds: float
    options: dict[str, Any]
    per_case: list[dict[str, Any]] = field(default_factory=list)

    @property
    def target_met(self) -> bool:
        return self.froc_target.cpm >= 0.90 and self.froc_target.sensitivity_at_target >= 0.95

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": asdict(self.model),
            "cases": self.cases,
            "target": {"cpm_min": 0.90, "sensitivity_at_4fp_min": 0.95, "min_diameter_mm": TARGET_MIN_DIAMETER_MM, "met": self.target_met},
            "froc_target": self.froc_target.to_dict(),
            "froc_all": self.froc_all.to_dict(),
            "slice_map": {k: _num(v) for k, v in self.slice_map.items()},
            "seconds": self.seconds,
            "options": self.options,
            "per_case": self.per_case,
        }


def ensure_cases(
    cases_dir: Path, cases: int, seed: int, progress: bool = True, config: PhantomConfig | None = None
) -> list[Path]:
    """The case folders of ``cases`` phantoms with seeds seed..seed+cases-1, generated if missing.

    ``config`` (default: the generator's realistic defaults) only matters when cases are generated.
    """
    from ctlesion_phantoms import generate_dataset

    cases_dir = Path(cases_dir)
    manifest_path = cases_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        entries = manifest.get("cases", [])
        if manifest.get("seed") == seed and len(entries) >= cases:
            dirs = [cases_dir / e["case_id"] for e in entries[:cases]]
            if all((d / "truth.json").exists() for d in dirs):
                return dirs
        if manifest.get("seed") != seed:
            raise ValueError(f"{cases_dir} holds cases of seed {manifest.get('seed')}, not {seed}: choose another --cases-dir")
    log.info("generating %d held-out cases (seed %d) into %s", cases, seed, cases_dir)
    bar = _tqdm(total=cases, desc="generate", disable=not progress)
    manifest = generate_dataset(cases_dir, cases, seed, config, on_case=lambda _: bar.update(1))
    bar.close()
    return [cases_dir / e["case_id"] for e in manifest["cases"]]


def _tqdm(**kw: Any) -> Any:
    from tqdm import tqdm

    return tqdm(file=sys.stderr, **kw)


def evaluate(
    model_path: Path,
    cases_dir: Path | None,
    out_dir: Path,
    cases: int = 20,
    seed: int = TEST_SEED,
    onnx: bool | None = None,
    device: str = "cpu",
    options: Options | None = None,
    bootstrap: int = 1000,
    progress: bool = True,
    predictor: tuple[PredictFn, ModelInfo] | None = None,
    phantom_config: PhantomConfig | None = None,
) -> EvaluationReport:
    """Evaluate a checkpoint (``.pt``) or ONNX file on held-out phantoms; writes metrics.json + froc.png.

    ``cases_dir`` (default ``out_dir/cases``) holds the phantoms of seeds seed..seed+cases-1; they are
    generated when missing. ``predictor`` overrides loading ``model_path`` (tests pass a fake).
    """
    if split_of(seed) in ("train", "validation"):
        log.warning("seed %d lies in the %s range: these are not held-out cases", seed, split_of(seed))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if predictor is None:
        onnx = Path(model_path).suffix.lower() == ".onnx" if onnx is None else onnx
        predictor = onnx_predictor(Path(model_path)) if onnx else torch_predictor(Path(model_path), device)
    predict_fn, info = predictor
    options = options or eval_options(window=info.window, model_size=info.model_size, k=info.in_channels)
    case_dirs = ensure_cases(Path(cases_dir) if cases_dir else out_dir / "cases", cases, seed, progress, phantom_config)

    t0 = time.perf_counter()
    results: list[CaseResult] = []
    map_preds: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    map_gts: list[tuple[np.ndarray, np.ndarray]] = []
    per_case: list[dict[str, Any]] = []
    for case_dir in _tqdm(iterable=case_dirs, desc="evaluate", unit="case", disable=not progress):
        truth = CaseTruth.load(case_dir / "truth.json")
        tc = time.perf_counter()
        dets, lesions = run_detector_on_case(predict_fn, case_dir, options)
        cr = case_result(lesions, truth)
        results.append(cr)
        p, g = slice_map_inputs(dets, truth)
        map_preds += p
        map_gts += g
        per_case.append(
            {
                "case_id": truth.case_id,
                "seed": truth.seed,
                "slices": truth.geometry.slices,
                "nodules": [{"nodule_id": n.nodule_id, "diameter_mm": n.diameter_mm, "type": n.type, "attachment": n.attachment} for n in truth.nodules],
                "detections": len(dets),
                "lesions": len(lesions),
                "seconds": round(time.perf_counter() - tc, 2),
                "match": cr.match.to_dict(),
            }
        )
    report = EvaluationReport(
        model=info,
        cases=len(case_dirs),
        froc_target=froc(results, TARGET_MIN_DIAMETER_MM, bootstrap=bootstrap),
        froc_all=froc(results, 0.0, bootstrap=bootstrap),
        slice_map=slice_map(map_preds, map_gts),
        seconds=round(time.perf_counter() - t0, 1),
        options=options.to_dict(),
        per_case=per_case,
    )
    (out_dir / "metrics.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    plot_froc({f"nodules >= {TARGET_MIN_DIAMETER_MM:g} mm": report.froc_target, "all nodules": report.froc_all}, out_dir / "froc.png", title=Path(info.source).name)
    return report


# ============================================================================ output


def plot_froc(curves: Mapping[str, FrocResult], path: Path, title: str = "") -> Path:
    """FROC curve as LUNA16 draws it: log-x FP/scan from 1/8 to 8, the 7 operating points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for (label, r), colour in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        # a step curve: sensitivity holds until the next FP arrives
        ax.step(np.clip(r.curve_fps, 1e-3, None), r.curve_sensitivity, where="post", color=colour, label=f"{label} (CPM {r.cpm:.3f})")
        if r.band_fps and label == next(iter(curves)):  # one band only: overlapping bands hide each other
            ax.fill_between(r.band_fps, r.band_low, r.band_high, step="post", color=colour, alpha=0.15, linewidth=0)
        ax.plot(r.fp_rates, r.sensitivities, "o", color=colour, markersize=5)
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.125 / 1.2, 8 * 1.2)
    ax.set_xticks(list(FP_RATES), [_rate_label(r) for r in FP_RATES])
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"FROC {title}".strip())
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_report(report: EvaluationReport) -> str:
    def ci(v: tuple[float, float] | None) -> str:
        return "" if v is None else f" [{v[0]:.3f}, {v[1]:.3f}]"

    lines = [f"model {report.model.source} ({report.model.backend}), {report.cases} cases, {report.seconds:.0f} s"]
    for name, r in (("nodules >= 4 mm (target)", report.froc_target), ("all nodules", report.froc_all)):
        lines.append("")
        lines.append(f"{name}: {r.nodules} nodules in {r.scans} scans, {r.candidates} candidates, {r.false_positives} FP candidates")
        lines.append(f"  CPM {r.cpm:.3f}{ci(r.cpm_ci)}")
        lines.append("  FP/scan      " + "".join(f"{_rate_label(x):>8}" for x in r.fp_rates))
        lines.append("  sensitivity  " + "".join(f"{s:8.3f}" for s in r.sensitivities))
        thr = f"score >= {r.threshold_at_target:.3f}" if math.isfinite(r.threshold_at_target) else "no candidate"
        lines.append(f"  at {TARGET_FP_RATE:g} FP/scan ({thr}):")
        for kind, groups in r.breakdown.items():
            cells = ", ".join(f"{g} {s.detected}/{s.nodules}" for g, s in groups.items() if s.nodules)
            lines.append(f"    {kind:<11} {cells}")
    m = report.slice_map
    lines.append("")
    lines.append(f"slice mAP@0.5 {m['map50']:.3f}, mAP@.5:.95 {m['map50_95']:.3f} ({int(m['truth_boxes'])} truth boxes on {int(m['images'])} slices)")
    lines.append(f"target (CPM >= 0.90 and sensitivity >= 0.95 at 4 FP/scan, nodules >= 4 mm): {'met' if report.target_met else 'NOT met'}")
    return "\n".join(lines)


_SEED_NAMES = {"TEST_SEED": TEST_SEED, "VALIDATION_SEED": VALIDATION_SEED, "TRAIN_SEED": TRAIN_SEED, "DEMO_SEED": DEMO_SEED}


def _seed(text: str) -> int:
    return _SEED_NAMES[text.upper()] if text.upper() in _SEED_NAMES else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctlesion evaluate", description="LUNA16 FROC / CPM and slice mAP of the detector on held-out phantoms")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="PyTorch checkpoint (models/ctlesion_damoyolo.pt)")
    src.add_argument("--onnx", type=Path, help="ONNX detector (fp32 or INT8 QDQ), run with onnxruntime")
    p.add_argument("--cases", type=int, default=20, help="number of held-out cases")
    p.add_argument("--seed", type=_seed, default=TEST_SEED, help="first case seed, or TEST_SEED / VALIDATION_SEED (default TEST_SEED)")
    p.add_argument("--cases-dir", type=Path, default=Path("work/phantoms/test"), help="where the held-out cases are / are generated (shared by fp32 and INT8 runs)")
    p.add_argument("--out", type=Path, default=Path("work/eval"))
    p.add_argument("--device", default="cpu", help="torch device for --checkpoint (cpu, cuda)")
    p.add_argument("--score-threshold", type=float, default=EVAL_SCORE_THRESHOLD)
    p.add_argument("--window", default=None, help="window preset (default: the checkpoint's, else lung)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples for the CPM interval (0: none)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    model_path = args.checkpoint or args.onnx
    predictor = onnx_predictor(args.onnx) if args.onnx else torch_predictor(args.checkpoint, args.device)
    info = predictor[1]
    if args.window:
        info.window = args.window
    options = eval_options(score_threshold=args.score_threshold, window=info.window, model_size=info.model_size, k=info.in_channels)
    try:
        report = evaluate(
            model_path, args.cases_dir, args.out, args.cases, args.seed, options=options, bootstrap=args.bootstrap,
            progress=not args.no_progress, predictor=predictor,
        )
    except (FileNotFoundError, ValueError, DicomInputError) as exc:
        print(f"ctlesion evaluate: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"\nwrote {args.out / 'metrics.json'} and {args.out / 'froc.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
