"""The model repository builder: configs that Triton's schema accepts, refusals, GPU variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

import damoyolo
from ctlesion_export.build_repo import (
    ENSEMBLE,
    RepoConfig,
    build_repository,
    main,
    parse_count,
    serving_onnx_with_uint8_input,
)
from ctlesion_export.onnx_export import export_onnx, inspect_onnx
from ctlesion_export.repo_check import (
    IOMismatch,
    check_repository,
    onnx_signature,
    tensorrt_missing,
    write_engine_manifest,
)
from ctlesion_export.repo_check import main as check_main
from preprocess_backend.pipeline import FINDING_TENSORS, SLAB_META_TENSORS
from preprocess_backend.types import Limits


def _export(tmp: Path, size: int, channels: int = 3, name: str = "det.onnx") -> Path:
    torch.manual_seed(0)
    model = damoyolo.build_model("Ns", num_classes=2, in_channels=channels)
    model.eval()
    model.fuse()
    return export_onnx(model, tmp / name, size=size, in_channels=channels)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("onnx"), 64)


def _load(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_inspect_reads_the_contract(small_onnx: Path) -> None:
    info = inspect_onnx(small_onnx)
    assert (info.channels, info.height, info.width) == (3, 64, 64)
    assert info.num_classes == 2
    assert info.num_anchors == (64 // 8) ** 2 + (64 // 16) ** 2 + (64 // 32) ** 2
    assert not info.quantized


def test_cpu_repository_layout_and_configs(small_onnx: Path, tmp_path: Path) -> None:
    out = build_repository(small_onnx, tmp_path / "repo", RepoConfig(target="cpu", max_batch_size=16, detector_instances=2))
    for name in ("preprocess", "detector", "postprocess", ENSEMBLE):
        assert (out / name / "config.pbtxt").exists(), name
    assert (out / "detector" / "1" / "model.onnx").exists()
    assert (out / "detector" / "1" / "model.py").exists()
    det = _load(out / "detector" / "config.pbtxt")
    assert det.backend == "python" and det.max_batch_size == 16
    assert det.instance_group[0].count == 2
    assert det.HasField("dynamic_batching")
    assert list(det.input[0].dims) == [3, 64, 64] and det.input[0].data_type == mc.TYPE_UINT8
    assert list(det.output[0].dims) == [inspect_onnx(small_onnx).num_anchors, 2]
    assert det.parameters["mem_pattern"].string_value == "false"  # the soak's 40 % smaller footprint
    assert det.parameters["max_run_batch"].string_value == "8"  # the arena sized for 8 slices, not 32

    pre = _load(out / "preprocess" / "config.pbtxt")
    assert [o.name for o in pre.output] == ["images", *(n for n, _, _ in SLAB_META_TENSORS)]
    assert pre.parameters["model_size"].string_value == "64"

    ens = _load(out / ENSEMBLE / "config.pbtxt")
    assert ens.platform == "ensemble"
    assert [o.name for o in ens.output] == [n for n, _, _ in FINDING_TENSORS]
    assert {i.name for i in ens.input if i.optional} == {"window", "score_threshold", "nms_iou", "min_size_mm", "max_size_mm"}
    steps = [s.model_name for s in ens.ensemble_scheduling.step]
    assert steps == ["preprocess", "detector", "postprocess"]
    # Every tensor a step reads is produced by an earlier step or is an ensemble input.
    available = {i.name for i in ens.input}
    for step in ens.ensemble_scheduling.step:
        assert set(step.input_map.values()) <= available, step.model_name
        available |= set(step.output_map.values())


def test_refuses_inconsistent_models(tmp_path: Path) -> None:
    two_channels = _export(tmp_path, 64, channels=2, name="c2.onnx")
    with pytest.raises(ValueError, match="2.5D context must be 1, 3 or 5"):
        build_repository(two_channels, tmp_path / "r1", RepoConfig())


def test_refuses_unknown_target(small_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown target"):
        build_repository(small_onnx, tmp_path / "r", RepoConfig(target="tpu"))


@pytest.fixture(scope="module")
def uint8_onnx(small_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The serving ONNX of the GPU targets: uint8 input, cast inside the graph (what engines are built from)."""
    dst = tmp_path_factory.mktemp("u8") / "det_uint8.onnx"
    serving_onnx_with_uint8_input(small_onnx, dst)
    return dst


def _plan(tmp: Path) -> Path:
    # No TensorRT here: the plan's bytes are a placeholder. What is under test is the ONNX the engine is
    # built from and the manifest build-engine writes beside it, both read for real.
    engine = tmp / "detector_sm90_trt10.3.plan"
    engine.write_bytes(b"plan bytes")
    return engine


def test_gpu_trt_refuses_engines_built_from_the_float_onnx(small_onnx: Path, tmp_path: Path) -> None:
    """Yesterday's pairing: config declares UINT8 images, the engine came from the float32 ONNX."""
    out = tmp_path / "r"
    with pytest.raises(IOMismatch) as err:
        build_repository(small_onnx, out, RepoConfig(target="gpu-trt"), engines=[_plan(tmp_path)])
    message = str(err.value)
    assert "detector: input 'images' is UINT8 in config.pbtxt but FP32 in det.onnx" in message
    assert "--cast-uint8-input" in message
    assert not out.exists()  # nothing left behind for Triton to load


def test_gpu_trt_needs_an_engine_and_maps_compute_capability(uint8_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --engine"):
        build_repository(uint8_onnx, tmp_path / "r", RepoConfig(target="gpu-trt"))
    engine = _plan(tmp_path)
    out = build_repository(uint8_onnx, tmp_path / "r2", RepoConfig(target="gpu-trt"), engines=[engine])
    det = _load(out / "detector" / "config.pbtxt")
    assert det.platform == "tensorrt_plan"
    assert det.cc_model_filenames["9.0"] == engine.name
    assert det.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    io_check = json.loads((out / "BUILD.json").read_text())["io_check"]
    assert any("det_uint8.onnx, the engines' source ONNX" in line for line in io_check["checked"])
    if tensorrt_missing():
        assert any(engine.name in line and "TensorRT is not installed" in line for line in io_check["skipped"])


def test_gpu_trt_checks_the_engine_manifest(uint8_onnx: Path, small_onnx: Path, tmp_path: Path) -> None:
    """build-engine's manifest names the source ONNX by sha256 and records the engine's tensors."""
    engine = _plan(tmp_path)
    write_engine_manifest(engine, small_onnx, onnx_signature(small_onnx), precision="fp16")
    with pytest.raises(IOMismatch) as err:
        build_repository(uint8_onnx, tmp_path / "r", RepoConfig(target="gpu-trt"), engines=[engine])
    message = str(err.value)
    assert "detector: input 'images' is UINT8 in config.pbtxt but FP32 in detector_sm90_trt10.3.plan's build manifest" in message
    assert "was built from det.onnx" in message and "not from det_uint8.onnx" in message
    write_engine_manifest(engine, uint8_onnx, onnx_signature(uint8_onnx), precision="fp16")
    out = build_repository(uint8_onnx, tmp_path / "r2", RepoConfig(target="gpu-trt"), engines=[engine])
    assert (out / "detector" / "1" / (engine.name + ".json")).is_file()


def test_gpu_onnx_with_the_float_onnx_is_refused(small_onnx: Path, tmp_path: Path) -> None:
    out = build_repository(small_onnx, tmp_path / "r", RepoConfig(target="gpu-onnx"))
    shutil.copy2(small_onnx, out / "detector" / "1" / "model.onnx")  # the float file where uint8 is declared
    with pytest.raises(IOMismatch, match="detector: input 'images' is UINT8 in config.pbtxt but FP32 in model.onnx"):
        check_repository(out)


def test_cpu_detector_onnx_of_another_size_is_refused(small_onnx: Path, tmp_path: Path) -> None:
    out = build_repository(small_onnx, tmp_path / "r", RepoConfig(target="cpu"))
    _export(tmp_path, 96, name="m96.onnx")
    shutil.copy2(tmp_path / "m96.onnx", out / "detector" / "1" / "model.onnx")
    with pytest.raises(IOMismatch) as err:
        check_repository(out)
    assert "detector: input 'images' has shape [-1, 3, 64, 64] in config.pbtxt but [-1, 3, 96, 96]" in str(err.value)
    assert "detector: output 'boxes' has shape [-1, 84, 4] in config.pbtxt but [-1, 189, 4]" in str(err.value)


def test_python_models_are_checked_against_the_tensors_they_produce(small_onnx: Path, tmp_path: Path) -> None:
    """A postprocess config whose meta tensor drifted from SLAB_META_TENSORS, and the wiring it breaks."""
    out = build_repository(small_onnx, tmp_path / "r", RepoConfig(target="cpu"))
    path = out / "postprocess" / "config.pbtxt"
    config = _load(path)
    name, dtype, _ = SLAB_META_TENSORS[0]
    tensor = next(t for t in config.input if t.name == name)
    tensor.data_type = mc.TYPE_FP32
    path.write_text(text_format.MessageToString(config))
    with pytest.raises(IOMismatch) as err:
        check_repository(out)
    want = {"int32": "INT32", "float32": "FP32", "int16": "INT16", "uint8": "UINT8"}.get(dtype, dtype)
    assert f"postprocess: input {name!r} is FP32 in config.pbtxt but {want} in SLAB_META_TENSORS" in str(err.value)
    assert f"postprocess: input {name!r} is FP32 [-1, " in str(err.value)  # the ensemble step's producer
    assert "preprocess's output" in str(err.value)


def test_a_correct_repository_passes_the_check(small_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = build_repository(small_onnx, tmp_path / "r", RepoConfig(target="gpu-onnx"))
    report = check_repository(out)
    assert {line.split(":")[0] for line in report.checked} >= {"detector", "preprocess", "postprocess", ENSEMBLE}
    assert not report.skipped
    assert check_main([str(out)]) == 0 and "checked  detector: config.pbtxt vs model.onnx" in capsys.readouterr().out
    shutil.copy2(small_onnx, out / "detector" / "1" / "model.onnx")  # the float file where UINT8 is declared
    assert check_main([str(out)]) == 1 and "is UINT8 in config.pbtxt but FP32" in capsys.readouterr().err


def test_gpu_onnx_uint8_input_gives_the_same_outputs(small_onnx: Path, tmp_path: Path) -> None:
    out = build_repository(small_onnx, tmp_path / "r", RepoConfig(target="gpu-onnx", trt_precision="fp16"))
    det = _load(out / "detector" / "config.pbtxt")
    assert det.platform == "onnxruntime_onnx"
    accel = det.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(2, 3, 64, 64), dtype=np.uint8)
    ref = ort.InferenceSession(str(small_onnx)).run(None, {"images": image.astype(np.float32)})
    served = ort.InferenceSession(str(out / "detector" / "1" / "model.onnx")).run(None, {"images": image})
    for a, b in zip(ref, served, strict=True):
        np.testing.assert_array_equal(a, b)


def test_uint8_wrapper_is_standalone(small_onnx: Path, tmp_path: Path) -> None:
    dst = tmp_path / "u8.onnx"
    serving_onnx_with_uint8_input(small_onnx, dst)
    session = ort.InferenceSession(str(dst))
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert [o.name for o in session.get_outputs()] == ["scores", "boxes"]


def _limits_in(config: mc.ModelConfig) -> Limits:
    """Read back the way model_repository/preprocess/1/model.py reads them."""
    params = {k: v.string_value for k, v in config.parameters.items()}
    return Limits.from_dict({k[len("limit_") :]: int(v) for k, v in params.items() if k.startswith("limit_")})


def test_limits_are_written_for_the_preprocess_model(small_onnx: Path, tmp_path: Path) -> None:
    default = build_repository(small_onnx, tmp_path / "d", RepoConfig())
    assert _limits_in(_load(default / "preprocess" / "config.pbtxt")) == Limits()  # defaults spelled out
    small = Limits(max_request_bytes=4 << 20, max_slices=64, max_pixels_per_slice=1024 * 1024, max_frames=16)
    out = build_repository(small_onnx, tmp_path / "s", RepoConfig(limits=small))
    assert _limits_in(_load(out / "preprocess" / "config.pbtxt")) == small


def test_build_repo_cli_takes_limits_with_units(small_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = ["--onnx", str(small_onnx), "--out", str(out), "--limit-max-slices", "256",
            "--limit-max-request-bytes", "64MiB", "--limit-max-pixels-per-slice", "2048x2048"]
    assert main(argv) == 0
    limits = _limits_in(_load(out / "preprocess" / "config.pbtxt"))
    assert (limits.max_slices, limits.max_request_bytes, limits.max_pixels_per_slice) == (256, 64 << 20, 2048 * 2048)
    assert limits.max_frames == Limits().max_frames
    # a changed limit makes --if-stale rebuild; the same one does not
    assert main([*argv, "--if-stale"]) == 0
    stamp = (out / ".fingerprint").read_text()
    assert main([*argv[:-1], "4096x4096", "--if-stale"]) == 0
    assert (out / ".fingerprint").read_text() != stamp


def test_build_repo_cli_can_turn_the_memory_pattern_back_on(small_onnx: Path, tmp_path: Path) -> None:
    assert main(["--onnx", str(small_onnx), "--out", str(tmp_path / "r"), "--ort-mem-pattern"]) == 0
    det = _load(tmp_path / "r" / "detector" / "config.pbtxt")
    assert det.parameters["mem_pattern"].string_value == "true"


def test_build_repo_cli_sets_the_detector_run_size(small_onnx: Path, tmp_path: Path) -> None:
    assert main(["--onnx", str(small_onnx), "--out", str(tmp_path / "r"), "--ort-max-run-batch", "0"]) == 0
    det = _load(tmp_path / "r" / "detector" / "config.pbtxt")
    assert det.parameters["max_run_batch"].string_value == "0"


@pytest.mark.parametrize(
    ("text", "value"),
    [("2048", 2048), ("64k", 64_000), ("512MiB", 512 << 20), ("1GiB", 1 << 30), ("2gb", 2_000_000_000),
     ("8192x8192", 8192 * 8192)],
)
def test_parse_count(text: str, value: int) -> None:
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "-5", "0", "lots", "1.5GiB", "12 slices"])
def test_parse_count_refuses(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_count(text)


@pytest.mark.slow
def test_a_replaced_checkpoint_is_re_exported_whatever_its_mtime(tmp_path: Path) -> None:
    """build-repo's ONNX cache follows the checkpoint's bytes: a new checkpoint with an old mtime is exported."""
    import os
    import shutil

    from ctlesion_export.build_repo import DEFAULT_CHECKPOINT, export_if_changed
    from ctlesion_export.cli import export_checkpoint

    if not DEFAULT_CHECKPOINT.exists():
        pytest.skip(f"no trained checkpoint at {DEFAULT_CHECKPOINT}")
    checkpoint, onnx_path = tmp_path / "detector.pt", tmp_path / "detector.onnx"
    shutil.copyfile(DEFAULT_CHECKPOINT, checkpoint)
    assert export_if_changed(checkpoint, onnx_path, export_checkpoint)
    first = onnx_path.read_bytes()
    assert not export_if_changed(checkpoint, onnx_path, export_checkpoint)  # same bytes: kept

    state = torch.load(checkpoint, weights_only=True)
    key = next(k for k in state["model"] if k.endswith("gfl_cls.0.bias"))
    state["model"][key] += 1.0
    torch.save(state, checkpoint)
    old = onnx_path.stat().st_mtime - 3600
    os.utime(checkpoint, (old, old))  # older than the ONNX, as after `cp` or `git checkout` of an old commit
    assert export_if_changed(checkpoint, onnx_path, export_checkpoint)
    assert onnx_path.read_bytes() != first


def test_the_served_scale_is_the_detectors_own(tmp_path: Path) -> None:
    """A detector trained at physical scale carries it in its ONNX metadata; the repository serves it
    (preprocess parameters), the client plans its halo from it, and INT8 keeps it."""
    from ctlesion_client.slabs import RequestShape
    from ctlesion_export.onnx_export import copy_scale_metadata

    model = damoyolo.build_model("T", num_classes=1, in_channels=3)
    model.fuse()
    path = export_onnx(model, tmp_path / "phys.onnx", size=64, scale={"pixel_mm": 0.75, "context_mm": 1.25})
    info = inspect_onnx(path)
    assert (info.pixel_mm, info.context_mm) == (0.75, 1.25)
    repo = build_repository(path, tmp_path / "repo", RepoConfig(target="cpu"))
    params = {k: v.string_value for k, v in _load(repo / "preprocess" / "config.pbtxt").parameters.items()}
    assert (params["pixel_mm"], params["context_mm"]) == ("0.75", "1.25")
    assert RequestShape.from_repository(repo).context_mm == 1.25
    native = build_repository(path, tmp_path / "native", RepoConfig(target="cpu", pixel_mm=None, context_mm=None))
    params = {k: v.string_value for k, v in _load(native / "preprocess" / "config.pbtxt").parameters.items()}
    assert (params["pixel_mm"], params["context_mm"]) == ("none", "none")  # an explicit experiment wins
    old = _export(tmp_path, 64, name="old.onnx")  # an export without the metadata: native pixels
    assert (inspect_onnx(old).pixel_mm, inspect_onnx(old).context_mm) == (None, None)
    copy_scale_metadata(path, old)  # what quantize_int8 does to the INT8 model it writes
    assert inspect_onnx(old).scale() == {"pixel_mm": 0.75, "context_mm": 1.25}


def test_cpu_fpr_classifier_runs_one_thread_without_spinning_by_default(small_onnx: Path, fpr_onnx: Path, tmp_path: Path) -> None:
    from ctlesion_fpr.predict import FprPredictor

    assert main(["--onnx", str(small_onnx), "--out", str(tmp_path / "a"), "--fpr-onnx", str(fpr_onnx)]) == 0
    cls = _load(tmp_path / "a" / "fpr_classifier" / "config.pbtxt")
    assert cls.parameters["intra_op_threads"].string_value == "1"
    assert cls.parameters["allow_spinning"].string_value == "0"
    assert main(["--onnx", str(small_onnx), "--out", str(tmp_path / "b"), "--fpr-onnx", str(fpr_onnx),
                 "--fpr-intra-op-threads", "0"]) == 0  # fmt: skip
    assert _load(tmp_path / "b" / "fpr_classifier" / "config.pbtxt").parameters["intra_op_threads"].string_value == "0"
    # the predictor the served model builds takes both settings into its onnxruntime session
    served = FprPredictor(fpr_onnx, threads=1, spinning=False).session.get_session_options()
    assert served.intra_op_num_threads == 1
    assert served.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert FprPredictor(fpr_onnx).session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_fpr_classifier_runs_in_the_python_backend_where_the_pytriton_server_serves(fpr_onnx: Path, tmp_path: Path) -> None:
    """cpu and gpu-torch are served by the tritonserver of the pytriton wheel, which has no onnxruntime
    backend: their classifier must be the Python-backend model; the NGC targets keep onnxruntime_onnx."""
    from ctlesion_export.fpr_repo import add_fpr_models

    for target in ("cpu", "gpu-torch", "gpu-onnx", "gpu-trt"):
        add_fpr_models(tmp_path / target, fpr_onnx, target, Limits())
        cls = _load(tmp_path / target / "fpr_classifier" / "config.pbtxt")
        python = target in ("cpu", "gpu-torch")
        assert (cls.backend, cls.platform) == (("python", "") if python else ("", "onnxruntime_onnx")), target
        assert (tmp_path / target / "fpr_classifier" / "1" / "model.py").exists() == python, target
        kind = mc.ModelInstanceGroup.KIND_CPU if python else mc.ModelInstanceGroup.KIND_GPU
        assert cls.instance_group[0].kind == kind, target
        assert (tmp_path / target / "fpr_classifier" / "1" / "model.onnx").read_bytes() == fpr_onnx.read_bytes()
