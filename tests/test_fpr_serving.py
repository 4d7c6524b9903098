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
                                     "candidate_threshold": info.candidate_threshold,
                                     "airway_vetoed": 0, "airway_followups": 0}  # fmt: skip
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


def test_served_airway_veto_equals_the_evaluation_pipeline(triton: object, tmp_path: Path, detector_onnx: Path, fpr_onnx: Path) -> None:
    """A trachea-like tube runs the length of the series: the detector takes it for a 27 mm nodule on
    every slice and the classifier agrees; its cube request answers with an air run that reaches the
    slices sent, the client asks again with the probe's window, and the tube is vetoed. The closed
    lesions beside it (a 24 mm cavitary nodule, a solid one) stay, as in ``ctlesion evaluate``."""
    from dicom_factory import airway_phantom, series_bytes

    from damoyolo.eval.fpr_stage import FprStage, second_stage
    from damoyolo.eval.runner import onnx_predictor, run_detector_on_case

    ph = airway_phantom(z=80, size=256)
    series = tmp_path / "airway" / "series"
    series.mkdir(parents=True)
    for i, item in enumerate(series_bytes(ph.volume, spacing=ph.spacing, slice_spacing=ph.slice_spacing, z0=ph.z0, shuffle_seed=2)):
        (series / f"{i:03d}.dcm").write_bytes(item)
    info = read_meta(fpr_onnx)
    predict, model = onnx_predictor(detector_onnx)
    _, candidates = run_detector_on_case(predict, series.parent, model.options(score_threshold=info.candidate_threshold))
    stage = FprStage(fpr_onnx)
    probs = dict(zip((les.lesion_id for les in candidates), stage.probabilities(series.parent, candidates), strict=True))
    tube_centre = np.asarray(ph.structures["tube"][0])
    tubes = [les for les in candidates if len(les.slices) >= 40 and np.hypot(*(np.asarray(les.centre_mm) - tube_centre)[:2]) < 5]
    assert tubes, "the detector no longer takes the tube for a nodule: this test checks nothing"
    assert all(probs[les.lesion_id] == 0.0 for les in tubes)  # vetoed
    local = second_stage(series.parent, candidates, stage, LesionFilter(3.0, 30.0, info.operating_threshold))
    with LesionClient(triton.grpc_url) as client:  # type: ignore[attr-defined]
        served = client.detect_series(series)
    assert served.options["fpr"]["airway_vetoed"] == len(tubes) and served.options["fpr"]["airway_followups"] >= 1
    assert len(served.lesions) == len(local) >= 2
    for a, b in zip(sorted(local, key=lambda x: x.centre_mm), sorted(served.lesions, key=lambda x: x.centre_mm), strict=True):
        np.testing.assert_allclose(a.centre_mm, b.centre_mm, atol=0.05)
        assert a.max_score == pytest.approx(b.max_score, abs=2e-3)
    for les in served.lesions:  # no finding on the tube; the cavitary and solid nodules found
        assert np.hypot(*(np.asarray(les.centre_mm) - tube_centre)[:2]) > 10
    found = {name for name, (c, _) in ph.structures.items() if any(np.linalg.norm(np.asarray(les.centre_mm) - c) < 5 for les in served.lesions)}
    assert {"cavity", "solid"} <= found, found
