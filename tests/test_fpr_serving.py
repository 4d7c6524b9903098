"""The served two-pass path: the ensemble's candidates, linked by the client, re-scored by the real
tritonserver's ``lesion_fpr`` models; and ``ctlesion evaluate``'s in-process pipeline gives the same
lesions for the same series (one implementation of every step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctlesion_client import DetectOptions, LesionClient
from ctlesion_fpr.predict import read_meta
from preprocess_backend.lesion_filters import LesionFilter

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_served_fpr_rescoring_equals_the_evaluation_pipeline(triton: object, phantom_case: Path, detector_onnx: Path, fpr_onnx: Path) -> None:
    from damoyolo.eval.fpr_stage import FprStage, second_stage
    from damoyolo.eval.runner import onnx_predictor, run_detector_on_case

    info = read_meta(fpr_onnx)
    with LesionClient(triton.grpc_url) as client:  # type: ignore[attr-defined]
        served = client.detect_series(phantom_case / "series")
    assert served.options["fpr"] == {"rule": info.rule, "operating_threshold": info.operating_threshold,
                                     "candidate_threshold": info.candidate_threshold}  # fmt: skip
    assert served.candidates >= len(served.lesions) > 0
    assert all(les.fpr_probability is not None and les.detector_score is not None for les in served.lesions)
    assert all(les.max_score >= info.operating_threshold for les in served.lesions)

    predict, model = onnx_predictor(detector_onnx)
    options = model.options(score_threshold=info.candidate_threshold)  # the served model's window, size, k and scale
    _, candidates = run_detector_on_case(predict, phantom_case, options)
    local = second_stage(phantom_case, candidates, FprStage(fpr_onnx), LesionFilter(3.0, 30.0, info.operating_threshold))
    assert len(local) == len(served.lesions)
    for a, b in zip(sorted(local, key=lambda x: x.centre_mm), sorted(served.lesions, key=lambda x: x.centre_mm), strict=True):
        np.testing.assert_allclose(a.centre_mm, b.centre_mm, atol=0.05)
        assert a.slices == b.slices and a.kind == b.kind
        assert a.max_score == pytest.approx(b.max_score, abs=2e-3)


def test_fpr_can_be_switched_off_per_request(triton: object, phantom_case: Path) -> None:
    with LesionClient(triton.grpc_url) as client:  # type: ignore[attr-defined]
        plain = client.detect_series(phantom_case / "series", detect_options=DetectOptions(fpr=False))
    assert plain.options["fpr"] is None
    assert all(les.fpr_probability is None and les.max_score >= 0.3 for les in plain.lesions)
