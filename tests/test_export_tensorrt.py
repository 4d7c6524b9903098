"""TensorRT engine builder: naming, argument checks, the uint8-input source the engine is built from,
the Q/DQ checks, and the clear refusal where TensorRT / a GPU is missing. The build itself runs only
where both exist (pytest.mark.gpu); it has never run in this project (no GPU with TensorRT at hand)."""

from __future__ import annotations

import re
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


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    import damoyolo
    from ctlesion_export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = damoyolo.build_model("Ns", num_classes=1).eval()
    model.fuse()
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "det.onnx", size=64)


def test_documented_commands_parse() -> None:
    """Every build-engine command line in the module's documentation is accepted by its parser."""
    doc = (te.__doc__ or "").replace("\\\n", " ")
    lines = [line.split("tensorrt_engine", 1)[1] if "tensorrt_engine" in line else line.split("build-engine", 1)[1]
             for line in doc.splitlines() if "python -m ctlesion_export.tensorrt_engine --" in line
             or line.strip().startswith("ctlesion build-engine --")]  # fmt: skip
    assert len(lines) >= 2
    for args in lines:
        argv = re.sub(r"\[[^\]]*\]", " ", args).replace("'", " ").split()  # optional [groups] dropped
        te.build_parser().parse_args(argv)  # SystemExit (a test error) on a flag that does not exist


def test_a_float_input_onnx_is_refused_without_the_cast(float_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input 'images' is FP32, but the detector config of every GPU target declares UINT8"):
        te.prepare_source(te.BuildConfig(float_onnx, "fp16", tmp_path), "detector_sm90_trt10.5")
    assert not list(tmp_path.iterdir())


def test_the_cast_source_is_what_build_repo_accepts(float_onnx: Path, tmp_path: Path) -> None:
    """--cast-uint8-input writes the uint8-input ONNX; build-repo gpu-trt takes it (and refuses the float one)."""
    import onnxruntime as ort

    from ctlesion_export.build_repo import RepoConfig, build_repository
    from ctlesion_export.repo_check import IOMismatch

    source = te.prepare_source(te.BuildConfig(float_onnx, "fp16", tmp_path, cast_uint8_input=True), "detector_sm90_trt10.5")
    assert source == tmp_path / "detector_sm90_trt10.5.onnx"
    assert te.prepare_source(te.BuildConfig(source, "fp16", tmp_path / "again"), "x") == source  # uint8: used as is
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    ref = ort.InferenceSession(str(float_onnx)).run(None, {"images": images.astype(np.float32)})
    got = ort.InferenceSession(str(source)).run(None, {"images": images})
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(a, b)
    plan = tmp_path / "detector_sm90_trt10.5.plan"
    plan.write_bytes(b"placeholder: no TensorRT here")
    build_repository(source, tmp_path / "repo", RepoConfig(target="gpu-trt"), engines=[plan])
    with pytest.raises(IOMismatch):
        build_repository(float_onnx, tmp_path / "repo2", RepoConfig(target="gpu-trt"), engines=[plan])


def _qdq_model(path: Path, zero_point: np.ndarray) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q0"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq0")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(zero_point, "zp")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_int8_needs_symmetric_int8_qdq(tmp_path: Path, float_onnx: Path) -> None:
    te.check_symmetric_qdq(_qdq_model(tmp_path / "sym.onnx", np.array(0, np.int8)))
    with pytest.raises(ValueError, match="uint8 zero-point"):
        te.check_symmetric_qdq(_qdq_model(tmp_path / "u8.onnx", np.array(128, np.uint8)))
    with pytest.raises(ValueError, match="int8 zero-point"):
        te.check_symmetric_qdq(_qdq_model(tmp_path / "asym.onnx", np.array(3, np.int8)))
    with pytest.raises(ValueError, match="no Q/DQ nodes"):
        te.prepare_source(te.BuildConfig(float_onnx, "int8", tmp_path, cast_uint8_input=True), "x")


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
    result = te.build_engine(te.BuildConfig(onnx_path, "fp16", tmp_path, 1, 2, 4, tmp_path / "timing.cache",
                                            cast_uint8_input=True))  # fmt: skip
    assert result.engine.name == te.engine_name(result.compute_capability, result.tensorrt_version)
    from ctlesion_export.repo_check import plan_signature

    assert [t.dtype for t in plan_signature(result.engine).inputs] == ["UINT8"]  # what the config declares
    assert result.engine.with_name(result.engine.name + ".json").is_file()
    assert (tmp_path / "timing.cache").stat().st_size > 0
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 128, 128)).astype(np.float32)
    report = te.check_engine(result.engine, onnx_path, images)
    assert report.output.score_max_abs < 2e-2 and report.f1 >= 0.9
