"""The learned (logistic) rescoring rule and the FPR model's test-time flips: fitted on validation
candidates, carried in the model's metadata and served config, applied the same everywhere."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from preprocess_backend.rescoring import LOGISTIC, apply_fpr, check_coefficients, combine, logit
from preprocess_backend.types import Lesion


def _lesion(i: int, centre: tuple[float, float, float], score: float, diameter: float = 8.0) -> Lesion:
    return Lesion(lesion_id=i, class_id=0, centre_mm=centre, diameter_mm=diameter, z_extent_mm=5.0, slices=[0],
                  sop_instance_uids=["1"], max_score=score, mean_score=score, mean_hu=0.0, characteristic="solid",
                  side="left", lobe="upper")  # fmt: skip


COEF = {"features": ["detector_logit", "fpr_logit", "log_diameter_mm"], "mean": [0.0, -1.0, 2.0], "scale": [1.0, 2.0, 0.5],
        "weights": [1.5, 1.0, -0.5], "bias": -2.0}  # fmt: skip


def test_logistic_rule_is_the_formula_and_needs_its_coefficients() -> None:
    d, p, diam = 0.6, 0.3, 12.0
    z = 1.5 * logit(d) + 1.0 * (logit(p) + 1.0) / 2.0 - 0.5 * (np.log(diam) - 2.0) / 0.5 - 2.0
    assert float(combine(d, p, LOGISTIC, COEF, diam)) == pytest.approx(1.0 / (1.0 + np.exp(-z)))
    with pytest.raises(ValueError, match="coefficients"):
        combine(d, p, LOGISTIC)
    check_coefficients(COEF)
    with pytest.raises(ValueError):
        check_coefficients({**COEF, "weights": [1.0]})
    with pytest.raises(ValueError, match="unknown"):
        check_coefficients({**COEF, "features": ["detector_logit", "fpr_logit", "colour"]})


def test_apply_fpr_logistic_ranks_and_survives_unknown_sizes() -> None:
    lesions = [_lesion(1, (0, 0, 0), 0.9, diameter=25.0), _lesion(2, (0, 0, 10), 0.5, diameter=6.0),
               _lesion(3, (0, 0, 20), 0.5, diameter=float("nan"))]  # fmt: skip
    out = apply_fpr(lesions, [0.05, 0.8, 0.8], LOGISTIC, COEF)
    assert [les.detector_score for les in out][-1] == 0.9  # a large low-FPR candidate drops to the end
    assert all(0.0 <= les.max_score <= 1.0 and np.isfinite(les.max_score) for les in out)
    by_id = {les.centre_mm[2]: les for les in out}
    # an unknown diameter counts as the validation mean of the feature (its standardised value 0)
    expected = combine(0.5, 0.8, LOGISTIC, COEF, np.exp(2.0))
    assert by_id[20].max_score == pytest.approx(float(expected))
    # a NaN probability (no FPR answer for that lesion) keeps the detector's score
    kept = apply_fpr(lesions[:1], [float("nan")], LOGISTIC, COEF)
    assert kept[0].max_score == pytest.approx(0.9)


def test_fit_logistic_learns_which_side_is_a_nodule() -> None:
    from ctlesion_fpr.rescoring_fit import DEFAULT_FEATURES, candidate_samples, fit_logistic

    rng = np.random.default_rng(0)
    lesions, probs, truths = [], [], []
    for case in range(6):  # nodules: high FPR probability; false positives: low, whatever the detector says
        les, p, nodules = [], [], []
        for j in range(40):
            hit = j < 4
            les.append(_lesion(j, (case * 100.0, 0.0, j * 20.0), float(rng.uniform(0.3, 0.9)), diameter=float(rng.uniform(4, 20))))
            p.append(float(rng.uniform(0.5, 0.99) if hit else rng.uniform(0.01, 0.6)))
            if hit:
                nodules.append(SimpleNamespace(nodule_id=len(nodules) + 1, centre_mm=les[-1].centre_mm, diameter_mm=10.0))
        lesions.append(les), probs.append(np.array(p)), truths.append(SimpleNamespace(nodules=nodules, irrelevant=()))
    x, y = candidate_samples(lesions, probs, truths, DEFAULT_FEATURES)
    assert x.shape == (240, 3) and int(y.sum()) == 24
    coef = fit_logistic(x, y, DEFAULT_FEATURES)
    check_coefficients(coef)
    assert coef["weights"][1] > 1.0 and abs(coef["weights"][0]) < coef["weights"][1]  # the FPR side carries it
    assert coef["samples"] == 240 and coef["nodules"] == 24
    json.dumps(coef)  # travels as JSON (ONNX metadata, Triton parameter)
    with pytest.raises(ValueError, match="both"):
        fit_logistic(x[y == 0], y[y == 0], DEFAULT_FEATURES)


def test_tta_flips_average_logits_and_survive_onnx_export(tmp_path: Path) -> None:
    import torch

    from ctlesion_fpr.model import TTA_FLIPS, FprNet, FprProbability, export_onnx, flips_of, tta_logits

    torch.manual_seed(0)
    net = FprNet(width=4).eval()
    cubes = torch.randint(0, 256, (3, 16, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        mean = torch.stack([net(torch.flip(cubes, dims=f) if f else cubes) for f in TTA_FLIPS[4]]).mean(0)
        assert torch.allclose(tta_logits(net, cubes, TTA_FLIPS[4]), mean)
        assert torch.allclose(tta_logits(net, cubes), net(cubes))
        served = FprProbability(net, TTA_FLIPS[4])(cubes)[:, 0]
    assert flips_of({}) == ((),) and flips_of({"tta_flips": [[], [3]]}) == ((), (3,))
    meta = {"cube": {"shape": [16, 32, 32]}, "rule": LOGISTIC, "rescoring": COEF, "tta_flips": [list(f) for f in TTA_FLIPS[4]]}
    path = export_onnx(net, tmp_path / "fpr.onnx", (16, 32, 32), meta)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs = session.run(["probability"], {"cubes": cubes.numpy()})[0][:, 0]
    np.testing.assert_allclose(probs, torch.sigmoid(mean).numpy(), atol=1e-5)
    np.testing.assert_allclose(probs, served.numpy(), atol=1e-6)
    proto_meta = {k: json.loads(v) for k, v in _metadata(path).items()}
    assert proto_meta["rescoring"] == COEF and proto_meta["tta_flips"] == [list(f) for f in TTA_FLIPS[4]]


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_served_config_carries_the_logistic_coefficients(tmp_path: Path) -> None:
    """build-repo writes them as the classifier's ``rescoring`` parameter; the client reads them back."""
    import torch

    from ctlesion_client.fpr import finalize, serving_from_config
    from ctlesion_export.fpr_repo import fpr_configs
    from ctlesion_fpr.model import FprNet, export_onnx
    from preprocess_backend.cubes import DEFAULT_CUBE
    from preprocess_backend.dicom_io import DEFAULT_LIMITS
    from preprocess_backend.lesion_filters import LesionFilter

    torch.manual_seed(0)
    cube = DEFAULT_CUBE.to_dict()
    meta = {"cube": cube, "rule": LOGISTIC, "rescoring": COEF, "operating_threshold": 0.15, "candidate_threshold": 0.25}
    path = export_onnx(FprNet(width=4), tmp_path / "fpr.onnx", tuple(cube["shape"]), meta)
    configs = fpr_configs(path, "cpu", DEFAULT_LIMITS, cube_instances=3)
    assert configs["fpr_preprocess"].instance_group[0].count == 3  # scaled with the node's DICOM decoders
    cls = configs["fpr_classifier"]
    params = {k: v.string_value for k, v in cls.parameters.items()}
    assert json.loads(params["rescoring"]) == COEF and params["rule"] == LOGISTIC
    serving = serving_from_config({"config": {"parameters": {k: {"string_value": v} for k, v in params.items()}}})
    assert serving.rule == LOGISTIC and serving.coefficients == COEF
    without = {k: {"string_value": v} for k, v in params.items() if k != "rescoring"}
    with pytest.raises(ValueError, match="coefficients"):
        serving_from_config({"config": {"parameters": without}})
    lesions = [_lesion(1, (0, 0, 0), 0.9, diameter=25.0), _lesion(2, (0, 0, 10), 0.5, diameter=6.0)]
    out = finalize(lesions, np.array([0.05, 0.8]), serving, LesionFilter(3.0, 30.0, 0.0))
    assert [les.fpr_probability for les in out] == pytest.approx([0.8, 0.05])
    assert out[0].max_score == pytest.approx(float(combine(0.5, 0.8, LOGISTIC, COEF, 6.0)))
