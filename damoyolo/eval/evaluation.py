"""The whole evaluation on held-out cases: run the serving pipeline, score FROC / CPM and slice mAP,
write metrics.json and froc.png, and format the text report."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctlesion_phantoms.config import PhantomConfig
from ctlesion_phantoms.splits import TEST_SEED, split_of
from ctlesion_phantoms.truth import CaseTruth
from damoyolo.eval.froc import (
    PIXEL_BINS_MM,
    SLICE_BINS_MM,
    TARGET_FP_RATE,
    TARGET_MIN_DIAMETER_MM,
    CaseResult,
    FrocResult,
    case_result,
    froc,
    json_num,
    rate_label,
    scale_bin,
)
from damoyolo.eval.plots import plot_froc
from damoyolo.eval.runner import (
    ModelInfo,
    PredictFn,
    onnx_predictor,
    run_detector_on_case,
    torch_predictor,
)
from damoyolo.eval.slice_map import slice_map, slice_map_inputs
from preprocess_backend.types import Lesion, Options

log = logging.getLogger(__name__)


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
    protocol: str = "phantoms"  # or "luna16:fold K" etc. (damoyolo.eval.dataset_eval)
    # the shipped operating threshold on held-out scans: sensitivity and false positives per scan
    operating_point: dict[str, Any] = field(default_factory=dict)
    fpr: dict[str, Any] | None = None  # the FPR model's declared rule / thresholds, None without FPR

    @property
    def target_met(self) -> bool:
        return self.froc_target.cpm >= 0.90 and self.froc_target.sensitivity_at_target >= 0.95

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": asdict(self.model),
            "cases": self.cases,
            "protocol": self.protocol,
            "target": {"cpm_min": 0.90, "sensitivity_at_4fp_min": 0.95, "min_diameter_mm": TARGET_MIN_DIAMETER_MM, "met": self.target_met},
            "froc_target": self.froc_target.to_dict(),
            "froc_all": self.froc_all.to_dict(),
            "slice_map": {k: json_num(v) for k, v in self.slice_map.items()},
            "seconds": self.seconds,
            "options": self.options,
            "per_case": self.per_case,
            "operating_point": self.operating_point,
            "fpr": self.fpr,
        }


@dataclass
class ScoredCases:
    """Per-scan results of the served two-stage pipeline, gathered for FROC / CPM, mAP and the report."""

    results: list[CaseResult] = field(default_factory=list)
    map_preds: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    map_gts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    per_case: list[dict[str, Any]] = field(default_factory=list)

    def score(
        self, predict_fn: PredictFn, series_dir: Path, truth: Any, options: Options, stage: Any,
        operating_threshold: float, record: dict[str, Any],
    ) -> list[Lesion]:
        """Run one scan (detector, linking, second stage) and match it; returns its lesions."""
        from damoyolo.eval.fpr_stage import second_stage

        tc = time.perf_counter()
        dets, candidates = run_detector_on_case(predict_fn, series_dir, options)
        lesions = second_stage(series_dir, candidates, stage)
        cr = case_result(lesions, truth)
        self.results.append(cr)
        p, g = slice_map_inputs(dets, truth)
        self.map_preds += p
        self.map_gts += g
        self.per_case.append(
            {
                **record,
                "detections": len(dets),
                "candidates": len(candidates),
                "lesions": len(lesions),
                "findings_at_operating_point": sum(les.max_score >= operating_threshold for les in lesions),
                "seconds": round(time.perf_counter() - tc, 2),
                "match": cr.match.to_dict(),
            }
        )
        return lesions

    def report(
        self, info: ModelInfo, options: Options, t0: float, bootstrap: int, stage: Any, fpr_onnx: Path | None,
        operating_threshold: float, protocol: str = "phantoms",
    ) -> EvaluationReport:
        return EvaluationReport(
            model=info,
            cases=len(self.results),
            froc_target=froc(self.results, TARGET_MIN_DIAMETER_MM, bootstrap=bootstrap),
            froc_all=froc(self.results, 0.0, bootstrap=bootstrap),
            slice_map=slice_map(self.map_preds, self.map_gts),
            seconds=round(time.perf_counter() - t0, 1),
            options=options.to_dict(),
            per_case=self.per_case,
            operating_point=operating_point_stats(self.results, operating_threshold),
            fpr=None if stage is None else {"onnx": str(fpr_onnx), "rule": stage.info.rule,
                                            "operating_threshold": stage.info.operating_threshold,
                                            "candidate_threshold": stage.info.candidate_threshold},  # fmt: skip
            protocol=protocol,
        )


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
    fpr_onnx: Path | None = None,
    operating_threshold: float | None = None,
) -> EvaluationReport:
    """Evaluate a checkpoint (``.pt``) or ONNX file on held-out phantoms; writes metrics.json + froc.png.

    ``cases_dir`` (default ``out_dir/cases``) holds the phantoms of seeds seed..seed+cases-1; they are
    generated when missing. ``predictor`` overrides loading ``model_path`` (tests pass a fake).
    ``fpr_onnx`` adds the served 3D false-positive reduction (its rule rescores the lesions); the 3D
    size rule applies either way. ``operating_threshold`` (default: the FPR model's, else the
    article's 0.3) is where sensitivity and false positives per scan are reported.
    """
    from damoyolo.eval.fpr_stage import FprStage

    if split_of(seed) in ("train", "validation"):
        log.warning("seed %d lies in the %s range: these are not held-out cases", seed, split_of(seed))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if predictor is None:
        onnx = Path(model_path).suffix.lower() == ".onnx" if onnx is None else onnx
        predictor = onnx_predictor(Path(model_path)) if onnx else torch_predictor(Path(model_path), device)
    predict_fn, info = predictor
    options = options or info.options()
    case_dirs = ensure_cases(Path(cases_dir) if cases_dir else out_dir / "cases", cases, seed, progress, phantom_config)

    stage = FprStage(Path(fpr_onnx)) if fpr_onnx is not None else None
    if operating_threshold is None:
        operating_threshold = stage.info.operating_threshold if stage is not None else 0.3
    t0 = time.perf_counter()
    scored = ScoredCases()
    for case_dir in _tqdm(iterable=case_dirs, desc="evaluate", unit="case", disable=not progress):
        truth = CaseTruth.load(case_dir / "truth.json")
        record = {
            "case_id": truth.case_id,
            "seed": truth.seed,
            "slices": truth.geometry.slices,
            "nodules": [{"nodule_id": n.nodule_id, "diameter_mm": n.diameter_mm, "type": n.type, "attachment": n.attachment} for n in truth.nodules],
        }
        scored.score(predict_fn, case_dir, truth, options, stage, operating_threshold, record)
    report = scored.report(info, options, t0, bootstrap, stage, fpr_onnx, operating_threshold)
    (out_dir / "metrics.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    plot_froc({f"nodules >= {TARGET_MIN_DIAMETER_MM:g} mm": report.froc_target, "all nodules": report.froc_all}, out_dir / "froc.png", title=Path(info.source).name)
    return report



def operating_point_stats(results: list[CaseResult], threshold: float, min_diameter_mm: float = 0.0) -> dict[str, Any]:
    """Sensitivity (LUNA16 hits) and false positives per scan of the findings at ``threshold``,
    with bootstrap 95 % intervals over scans."""
    per_case = []
    for r in results:
        m = r.match
        nod = [n for n in r.nodules if n.diameter_mm >= min_diameter_mm]
        best = [m.nodule_best_score.get(n.nodule_id, float("nan")) for n in nod]
        hit = sum(1 for b in best if np.isfinite(b) and b >= threshold)
        fp = sum(1 for i, s in enumerate(m.lesion_scores) if s >= threshold and m.lesion_nodule[i] is None and not m.ignored(i))
        per_case.append((hit, len(nod), fp))
    arr = np.asarray(per_case, dtype=np.float64).reshape(-1, 3)
    by_scan: dict[str, dict[str, dict[str, float]]] = {}  # the same counts by the scans' slice / pixel size
    for kind, bins in (("slice_mm", SLICE_BINS_MM), ("pixel_mm", PIXEL_BINS_MM)):
        groups: dict[str, dict[str, float]] = {}
        for r, (hit, n, fp) in zip(results, per_case, strict=True):
            g = groups.setdefault(scale_bin(getattr(r, kind), bins), {"nodules": 0, "detected": 0, "scans": 0, "false_positives": 0})
            g["nodules"] += n
            g["detected"] += hit
            g["scans"] += 1
            g["false_positives"] += fp
        by_scan[kind] = {b: groups[b] for b in [name for name, _ in bins] + ["unknown"] if b in groups}

    def stats(a: np.ndarray) -> tuple[float, float]:
        return float(a[:, 0].sum() / max(a[:, 1].sum(), 1)), float(a[:, 2].sum() / max(len(a), 1))

    sens, fps = stats(arr)
    rng = np.random.default_rng(0)
    boot = np.array([stats(arr[rng.integers(0, len(arr), len(arr))]) for _ in range(1000)]) if len(arr) else np.zeros((1, 2))
    return {
        "threshold": round(float(threshold), 4), "sensitivity": round(sens, 4), "fp_per_scan": round(fps, 3),
        "sensitivity_ci95": [round(float(v), 4) for v in np.percentile(boot[:, 0], [2.5, 97.5])],
        "fp_per_scan_ci95": [round(float(v), 3) for v in np.percentile(boot[:, 1], [2.5, 97.5])],
        "nodules": int(arr[:, 1].sum()), "scans": len(arr), "by_scan": by_scan,
    }


def format_froc(name: str, r: FrocResult) -> list[str]:
    """The text lines of one FROC: counts, CPM with its interval, the 7 operating points, breakdown."""
    ci = "" if r.cpm_ci is None else f" [{r.cpm_ci[0]:.3f}, {r.cpm_ci[1]:.3f}]"
    lines = [f"{name}: {r.nodules} nodules in {r.scans} scans, {r.candidates} candidates, {r.false_positives} FP candidates"]
    lines.append(f"  CPM {r.cpm:.3f}{ci}")
    lines.append("  FP/scan      " + "".join(f"{rate_label(x):>8}" for x in r.fp_rates))
    lines.append("  sensitivity  " + "".join(f"{s:8.3f}" for s in r.sensitivities))
    thr = f"score >= {r.threshold_at_target:.3f}" if math.isfinite(r.threshold_at_target) else "no candidate"
    lines.append(f"  at {TARGET_FP_RATE:g} FP/scan ({thr}):")
    for kind, groups in r.breakdown.items():
        cells = ", ".join(f"{g} {s.detected}/{s.nodules}" for g, s in groups.items() if s.nodules)
        lines.append(f"    {kind:<11} {cells}")
    return lines


def format_report(report: EvaluationReport) -> str:
    lines = [f"model {report.model.source} ({report.model.backend}), {report.cases} cases, {report.seconds:.0f} s"]
    everything = "all nodules" if report.protocol == "phantoms" else f"all nodules, {report.protocol} (the LUNA16 figure)"
    for name, r in (("nodules >= 4 mm (target)", report.froc_target), (everything, report.froc_all)):
        lines.append("")
        lines += format_froc(name, r)
    m = report.slice_map
    lines.append("")
    lines.append(f"slice mAP@0.5 {m['map50']:.3f}, mAP@.5:.95 {m['map50_95']:.3f} ({int(m['truth_boxes'])} truth boxes on {int(m['images'])} slices)")
    op = report.operating_point
    if op:
        how = f"FPR {report.fpr['rule']}" if report.fpr else "detector score, no FPR"
        lines.append(f"at the shipped threshold {op['threshold']:.3f} ({how}): sensitivity {op['sensitivity']:.3f} "
                     f"[{op['sensitivity_ci95'][0]:.3f}, {op['sensitivity_ci95'][1]:.3f}], {op['fp_per_scan']:.2f} FP/scan "
                     f"[{op['fp_per_scan_ci95'][0]:.2f}, {op['fp_per_scan_ci95'][1]:.2f}] ({op['nodules']} nodules, {op['scans']} scans)")  # fmt: skip
        for kind, groups in op.get("by_scan", {}).items():
            cells = ", ".join(f"{b} {g['detected']}/{g['nodules']} ({g['scans']} scans, {g['false_positives'] / g['scans']:.2f} FP/scan)"
                              for b, g in groups.items())  # fmt: skip
            lines.append(f"  by {kind:<9} {cells}")
    lines.append(f"target (CPM >= 0.90 and sensitivity >= 0.95 at 4 FP/scan, nodules >= 4 mm): {'met' if report.target_met else 'NOT met'}")
    return "\n".join(lines)

