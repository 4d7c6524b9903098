"""Score the FPR model on mined held-out cases: LUNA16 FROC / CPM with and without it, breakdowns,
the shipped operating point, a FROC picture.

The candidates are those ``ctlesion_fpr.mining`` recorded from the serving pipeline
(``run_detector_on_case`` at the evaluation's low threshold), so sweeping FPR models and rules needs
no detector run; candidates below the model's declared candidate threshold are dropped, as the
client's per-slice threshold would. ``ctlesion evaluate`` runs the same stage on the cases from
scratch; tests/test_fpr_serving.py checks the served path gives the same lesions.

    python -m ctlesion_fpr.evaluate_mined --mined work/fpr/mined_test30 --cases work/phantoms/test30 \\
        --fpr-onnx work/onnx/ctlesion_fpr.onnx --out work/eval/fpr_test30
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ctlesion_fpr.data import load_eval
from ctlesion_fpr.predict import FprPredictor
from preprocess_backend.lesion_filters import LesionFilter, filter_lesions
from preprocess_backend.rescoring import apply_fpr


def main(argv: list[str] | None = None) -> int:
    from ctlesion_phantoms.truth import CaseTruth
    from damoyolo.eval.evaluation import operating_point_stats
    from damoyolo.eval.froc import TARGET_MIN_DIAMETER_MM, case_result, froc
    from damoyolo.eval.plots import plot_froc

    p = argparse.ArgumentParser(prog="python -m ctlesion_fpr.evaluate_mined", description=__doc__.splitlines()[0])
    p.add_argument("--mined", type=Path, required=True)
    p.add_argument("--cases", type=Path, required=True, help="the phantom cases (truth.json)")
    p.add_argument("--fpr-onnx", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bootstrap", type=int, default=1000)
    a = p.parse_args(argv)
    predictor = FprPredictor(a.fpr_onnx)
    info = predictor.info
    cases = load_eval(a.mined, a.cases)
    size_rule = LesionFilter(3.0, 30.0, 0.0)
    det_results, fpr_results = [], []
    for c in cases:
        truth = CaseTruth.load(c.truth_path)
        keep = [i for i, les in enumerate(c.lesions) if les.max_score >= info.candidate_threshold]
        lesions = [c.lesions[i] for i in keep]
        det_results.append(case_result(filter_lesions(lesions, size_rule), truth))
        probs = c.vetoed(predictor(c.cubes[keep]), keep) if keep else []
        fpr_results.append(case_result(filter_lesions(apply_fpr(lesions, probs, info.rule, info.coefficients), size_rule), truth))
    report: dict[str, object] = {"cases": len(cases), "fpr": {"onnx": str(a.fpr_onnx), "rule": info.rule,
                                 "operating_threshold": info.operating_threshold, "candidate_threshold": info.candidate_threshold}}  # fmt: skip
    curves = {}
    lines = [f"{len(cases)} scans from {a.mined}; candidates >= {info.candidate_threshold:g}, FPR rule {info.rule}"]
    for name, results, thr in (("detector alone", det_results, 0.3), ("with 3D FPR", fpr_results, info.operating_threshold)):
        all_n = froc(results, 0.0, bootstrap=a.bootstrap)
        target = froc(results, TARGET_MIN_DIAMETER_MM, bootstrap=a.bootstrap)
        op = operating_point_stats(results, thr)
        report[name] = {"froc_all": all_n.to_dict(), "froc_4mm": target.to_dict(), "operating_point": op}
        curves[f"{name} (CPM {all_n.cpm:.3f})"] = all_n
        ci = "" if all_n.cpm_ci is None else f" [{all_n.cpm_ci[0]:.3f}, {all_n.cpm_ci[1]:.3f}]"
        lines.append(f"{name}: CPM {all_n.cpm:.3f}{ci} (all {all_n.nodules} nodules >= 3 mm), {target.cpm:.3f} (>= 4 mm); "
                     f"sensitivity at 1/8..8 FP/scan " + " ".join(f"{s:.3f}" for s in all_n.sensitivities))  # fmt: skip
        lines.append(f"  at threshold {thr:.3f}: sensitivity {op['sensitivity']:.3f} {op['sensitivity_ci95']}, "
                     f"{op['fp_per_scan']:.2f} FP/scan {op['fp_per_scan_ci95']}")  # fmt: skip
        for key, groups in all_n.breakdown.items():
            lines.append(f"  at 4 FP/scan by {key}: " + ", ".join(f"{g} {s.detected}/{s.nodules}" for g, s in groups.items()))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "metrics.json").write_text(json.dumps(report, indent=1, default=lambda v: None))
    plot_froc(curves, a.out / "froc.png", title=f"{a.mined.name}: detector vs detector + 3D FPR")
    print("\n".join(lines))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
