"""The official LUNA16 protocol on a real data set (``ctlesion evaluate --data luna16:DIR --fold K``).

Each scan of the held-out fold(s) runs through the served pipeline (``run_detector_on_case`` on
its DICOM series, then the second stage: LUNA16 volumes are read from the DICOM cache
``damoyolo.data`` writes; the per-scan work is ``ScoredCases``, shared with the phantom evaluation), the 100
best candidates per scan are kept, candidates on irrelevant findings (annotations_excluded.csv)
are ignored, and FROC / CPM with a bootstrap over scans follow (``damoyolo.eval.froc``): the figure
of ``froc_all``. The candidates are also written in the challenge's submission format
(``candidates.csv``: seriesuid, coordX, coordY, coordZ, probability) so the official script can
score the same run; ``score_submission`` scores such a file (e.g. all ten folds' files together).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

from damoyolo.data.types import Case, CaseSource, DataError
from damoyolo.eval.evaluation import EvaluationReport, ScoredCases, _tqdm
from damoyolo.eval.froc import MAX_CANDIDATES_PER_SCAN, FrocResult, case_result, froc
from damoyolo.eval.plots import plot_froc
from damoyolo.eval.runner import (
    ModelInfo,
    PredictFn,
    order_series,
    series_files,
)
from damoyolo.eval.truth_geometry import SeriesTruth
from preprocess_backend.types import Lesion, Options


def _trained_folds(info: ModelInfo) -> set[int]:
    """Folds the checkpoint was trained or validated on (from its meta), to refuse scoring on them."""
    from damoyolo.data import parse_folds

    cfg = info.meta.get("train_config") or {}
    if not cfg.get("data"):
        return set()
    from damoyolo.train import TrainConfig, resolve_folds

    known = {k: v for k, v in cfg.items() if k in TrainConfig.__dataclass_fields__}
    try:
        train_folds, val_folds = resolve_folds(TrainConfig(**known))
    except DataError:
        return parse_folds(cfg.get("folds")) or set()
    return train_folds | val_folds


def write_submission(path: Path, rows: list[tuple[str, Lesion]]) -> Path:
    """LUNA16's CAD result format: one row per candidate."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "probability"])
        for uid, les in rows:
            w.writerow([uid, *(f"{v:.3f}" for v in les.centre_mm), f"{les.max_score:.6f}"])
    return path


@dataclass(frozen=True)
class SubmittedCandidate:
    """One row of a LUNA16 submission CSV (what matching needs of a candidate)."""

    centre_mm: tuple[float, float, float]
    max_score: float


def read_submission(path: Path) -> dict[str, list[SubmittedCandidate]]:
    """seriesuid -> candidates of a CSV in the challenge's format (seriesuid, coordX, coordY, coordZ, probability)."""
    out: dict[str, list[SubmittedCandidate]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            centre = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
            out.setdefault(row["seriesuid"].strip(), []).append(SubmittedCandidate(centre, float(row["probability"])))
    return out


def score_submission(source: CaseSource, path: Path, folds: set[int] | None, bootstrap: int = 1000) -> FrocResult:
    """LUNA16 FROC / CPM of a submission CSV over the scans of ``folds`` (e.g. the ten folds'
    candidates.csv files concatenated: the figure the papers report over all scans).

    Every scan of the folds counts, with or without rows; rows of other scans are refused.
    """
    submitted = read_submission(path)
    cases = list(source.cases(folds))
    unknown = set(submitted) - {c.case_id for c in cases}
    if unknown:
        raise DataError(f"{path}: {len(unknown)} seriesuid(s) not in {source.name} fold(s) {sorted(folds) if folds else 'all'}, "
                        f"e.g. {sorted(unknown)[0]}")
    results = [case_result(submitted.get(c.case_id, []), c) for c in cases]
    return froc(results, 0.0, bootstrap=bootstrap)


def evaluate_source(
    predictor: tuple[PredictFn, ModelInfo],
    source: CaseSource,
    folds: set[int] | None,
    out_dir: Path,
    options: Options | None = None,
    bootstrap: int = 1000,
    progress: bool = True,
    allow_trained_folds: bool = False,
    fpr_onnx: Path | None = None,
    operating_threshold: float | None = None,
) -> EvaluationReport:
    """Score the scans of ``folds`` of ``source`` through the served two-stage pipeline (detector,
    linking, ``fpr_onnx``'s false-positive reduction when given, the 3D size rule); writes
    metrics.json, froc.png and candidates.csv."""
    from damoyolo.eval.fpr_stage import FprStage

    predict_fn, info = predictor
    overlap = (folds or set()) & _trained_folds(info)
    if overlap and not allow_trained_folds:
        raise DataError(f"the checkpoint was trained or validated on fold(s) {sorted(overlap)}: not a held-out score")
    options = options or info.options()
    cases: list[Case] = list(source.cases(folds))
    if not cases:
        raise DataError(f"{source.name}: no scan in fold(s) {sorted(folds) if folds else 'all'}")
    stage = FprStage(Path(fpr_onnx)) if fpr_onnx is not None else None
    if operating_threshold is None:
        operating_threshold = stage.info.operating_threshold if stage is not None else 0.3
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scored = ScoredCases()
    submission: list[tuple[str, Lesion]] = []
    for case in _tqdm(iterable=cases, desc="evaluate", unit="scan", disable=not progress):
        series_dir = case.series_dir()
        _, geometry = order_series(series_files(series_dir), options)
        truth = SeriesTruth(case.case_id, list(case.nodules), geometry, list(case.irrelevant))
        lesions = scored.score(predict_fn, series_dir, truth, options, stage, operating_threshold,
                               {**case.to_dict(), "slices": truth.slices})
        kept = sorted(lesions, key=lambda les: -les.max_score)[:MAX_CANDIDATES_PER_SCAN]  # what LUNA16 scores
        submission += [(case.case_id, les) for les in kept]
    fold_text = "all folds" if folds is None else "fold " + ",".join(str(f) for f in sorted(folds))
    report = scored.report(info, options, t0, bootstrap, stage, fpr_onnx, operating_threshold, f"{source.name} {fold_text}")
    (out_dir / "metrics.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    write_submission(out_dir / "candidates.csv", submission)
    plot_froc({f"{source.name} {fold_text}": report.froc_all}, out_dir / "froc.png", title=Path(info.source).name)
    return report
