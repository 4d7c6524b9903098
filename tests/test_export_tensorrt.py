"""TensorRT engine builder: naming, argument checks, and the clear refusal where TensorRT / a GPU is
missing. The build itself runs only where both exist (pytest.mark.gpu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctlesion_export import tensorrt_engine as te
from ctlesion_export.build_repo import _compute_capability_from_name


def _missing() -> str | None:
    try:
        te.require_tensorrt()
    except te.TensorRTUnavailable as exc:
        return str(exc)
    return None


MISSING = _missing()


def test_engine_name_encodes_gpu_and_version() -> None:
    name = te.engine_name((9, 0), "10.3.0.26")
    assert name == "detector_sm90_trt10.3.plan"
    assert _compute_capability_from_name(name) == "9.0"  # what build-repo reads back
    assert _compute_capability_from_name(te.engine_name((12, 0), "10.13.2")) == "12.0"


def test_build_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        te.BuildConfig(tmp_path / "a.onnx", "int4", tmp_path)
    with pytest.raises(ValueError, match="min_batch"):
        te.BuildConfig(tmp_path / "a.onnx", "fp16", tmp_path, min_batch=4, opt_batch=2, max_batch=8)


def test_docstring_says_how_to_run_on_a_gpu_node() -> None:
    doc = te.__doc__ or ""
    assert "nvcr.io/nvidia/tensorrt" in doc and "--precision int8" in doc and "init container" in doc


@pytest.mark.skipif(MISSING is None, reason="TensorRT and a GPU are present: the refusal path does not apply")
def test_cli_exits_with_clear_message_without_tensorrt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx_file = tmp_path / "d.onnx"
    onnx_file.write_bytes(b"not used")
    rc = te.main(["--onnx", str(onnx_file), "--precision", "fp16", "--out", str(tmp_path)])
    assert rc == te.EXIT_NO_GPU
    err = capsys.readouterr().err
    assert "cannot build a TensorRT engine here" in err and ("tensorrt" in err or "GPU" in err)
    assert not list(tmp_path.glob("*.plan"))


@pytest.mark.gpu
@pytest.mark.skipif(MISSING is not None, reason=f"needs TensorRT 10 and an NVIDIA GPU: {MISSING}")
def test_fp16_engine_matches_onnxruntime(tmp_path: Path) -> None:  # pragma: no cover - GPU nodes only
    from ctlesion_export.demo_model import seeded_detector
    from ctlesion_export.onnx_export import export_onnx

    onnx_path = export_onnx(seeded_detector(size=128), tmp_path / "d.onnx", size=128)
    result = te.build_engine(te.BuildConfig(onnx_path, "fp16", tmp_path, 1, 2, 4, tmp_path / "timing.cache"))
    assert result.engine.name == te.engine_name(result.compute_capability, result.tensorrt_version)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 128, 128)).astype(np.float32)
    report = te.check_engine(result.engine, onnx_path, images)
    assert report.output.score_max_abs < 2e-2 and report.f1 >= 0.9
