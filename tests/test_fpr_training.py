"""The FPR model's own pipeline on a small phantom: mining through the serving pipeline, training,
calibration of the operating point on validation series, release as the served ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctlesion_phantoms.config import PhantomConfig
    from ctlesion_phantoms.generate import generate_case

    out = tmp_path_factory.mktemp("fpr_phantom")
    config = PhantomConfig(slices_max=40, nodules_min=2, nodules_max=3, p_no_nodules=0.0, diameter_mm=(8.0, 16.0))
    truth = generate_case(20_005, out, config)
    return out / truth.case_id


def test_mine_train_calibrate_release(small_case: Path, detector_onnx: Path, tmp_path: Path) -> None:
    from ctlesion_fpr.data import load_eval, load_training
    from ctlesion_fpr.mining import LABEL_NODULE, SOURCE_TRUTH, Augment, mine_case
    from ctlesion_fpr.predict import FprPredictor, read_meta
    from ctlesion_fpr.train import main as train_main
    from damoyolo.eval.runner import eval_options, onnx_predictor

    predict, info = onnx_predictor(detector_onnx)
    options = eval_options(window=info.window, model_size=info.model_size, k=info.in_channels)
    stats = mine_case(predict, small_case, tmp_path / "train" / f"{small_case.name}.npz", options, Augment(), seed=0)
    mine_case(predict, small_case, tmp_path / "val" / f"{small_case.name}.npz", options, None, seed=0)
    train = load_training(tmp_path / "train")
    # every truth nodule contributes its augmented cubes; candidates are labelled by LUNA16 matching
    nodules = [n for n in json.loads((small_case / "truth.json").read_text())["nodules"] if n["diameter_mm"] >= 3]
    assert int(np.sum((train.label == LABEL_NODULE) & (train.source == SOURCE_TRUTH))) == Augment().truth_copies * len(nodules)
    assert stats["lesions"] == len(load_eval(tmp_path / "val", small_case.parent)[0].lesions) > 0
    release = tmp_path / "fpr.pt"
    rc = train_main(["--train", str(tmp_path / "train"), "--val", f"{tmp_path / 'val'}:{small_case.parent}",
                     "--out", str(tmp_path / "run"), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8",
                     "--release", str(release)])  # fmt: skip
    assert rc == 0 and release.exists()
    meta = read_meta(release.with_suffix(".onnx"))
    assert meta.rule in ("fpr", "geometric", "product", "logistic") and 0.0 <= meta.operating_threshold <= 1.0
    assert meta.candidate_threshold >= 0.05 and meta.spec.shape == (16, 32, 32)
    probs = FprPredictor(release.with_suffix(".onnx"))(train.cubes[:5])
    assert probs.shape == (5,) and np.all((probs >= 0) & (probs <= 1))
    # calibrating the released checkpoint again on the same validation gives the same operating point
    # (recalibration for another detector needs only its mined validation cubes: no --train)
    rc = train_main(["--val", f"{tmp_path / 'val'}:{small_case.parent}",
                     "--out", str(tmp_path / "cal"), "--epochs", "0", "--init", str(release), "--release", str(tmp_path / "again.pt")])  # fmt: skip
    assert rc == 0
    again = read_meta(tmp_path / "again.onnx")
    assert again.rule == meta.rule and again.operating_threshold == pytest.approx(meta.operating_threshold)
    if meta.coefficients is None:
        assert again.coefficients is None
    else:  # the logistic rule refitted on the same candidates (weights stored in fp16: near, not equal)
        assert again.coefficients["features"] == meta.coefficients["features"]
        assert again.coefficients["weights"] == pytest.approx(meta.coefficients["weights"], abs=0.05)
