"""Compatibility module: the evaluation lives in ``damoyolo.eval`` (one job per module).

    ctlesion evaluate --checkpoint models/ctlesion_damoyolo.pt --cases 20 --seed TEST_SEED --out work/eval

``from damoyolo.evaluate import ...`` keeps working for every public name it had; new code imports
from the module that owns the job (``damoyolo.eval.froc``, ``.slice_map``, ``.truth_geometry``,
``.runner``, ``.evaluation``, ``.plots``, ``.cli``).
"""

from __future__ import annotations

from damoyolo.eval.cli import build_parser, main
from damoyolo.eval.evaluation import EvaluationReport, ensure_cases, evaluate, format_report
from damoyolo.eval.froc import (
    FP_RATES,
    MAX_CANDIDATES_PER_SCAN,
    SIZE_BINS_MM,
    TARGET_FP_RATE,
    TARGET_MIN_DIAMETER_MM,
    CaseResult,
    FrocResult,
    GroupSensitivity,
    case_result,
    froc,
)
from damoyolo.eval.plots import plot_froc
from damoyolo.eval.runner import (
    EVAL_SCORE_THRESHOLD,
    ModelInfo,
    PredictFn,
    eval_options,
    onnx_predictor,
    order_series,
    run_detector_on_case,
    torch_predictor,
)
from damoyolo.eval.slice_map import slice_map, slice_map_inputs
from damoyolo.eval.truth_geometry import SliceBoxes, truth_slice_boxes, truth_slice_nodules
from preprocess_backend.matching import MatchResult, match_lesions

__all__ = [
    "EVAL_SCORE_THRESHOLD",
    "FP_RATES",
    "MAX_CANDIDATES_PER_SCAN",
    "SIZE_BINS_MM",
    "TARGET_FP_RATE",
    "TARGET_MIN_DIAMETER_MM",
    "CaseResult",
    "EvaluationReport",
    "FrocResult",
    "GroupSensitivity",
    "MatchResult",
    "ModelInfo",
    "PredictFn",
    "SliceBoxes",
    "build_parser",
    "case_result",
    "ensure_cases",
    "eval_options",
    "evaluate",
    "format_report",
    "froc",
    "main",
    "match_lesions",
    "onnx_predictor",
    "order_series",
    "plot_froc",
    "run_detector_on_case",
    "slice_map",
    "slice_map_inputs",
    "torch_predictor",
    "truth_slice_boxes",
    "truth_slice_nodules",
]

if __name__ == "__main__":
    raise SystemExit(main())
