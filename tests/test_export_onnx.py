"""ONNX export of the detector: checker + shape inference, opset, parity with PyTorch on preprocessed
phantom slices, identical detections after threshold + NMS, a batch axis that really is dynamic.

Uses models/ctlesion_damoyolo.pt when it exists, else a seeded untrained Ns model whose head is
rescaled so scores vary (ctlesion_export.demo_model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ctlesion_export.accuracy import agreement
from ctlesion_export.calibration import SliceRef, find_series_dirs, load_images, order_series, slice_image
from ctlesion_export.demo_model import detector_for_tests
from ctlesion_export.onnx_export import compare_with_torch, export_onnx, inspect_onnx
from ctlesion_phantoms import PhantomConfig, generate_dataset
from preprocess_backend.pipeline import preprocess_slab
from preprocess_backend.types import Options

PHANTOM = PhantomConfig(matrix=128, slices_max=12, max_vessel_segments=300)


@pytest.fixture(scope="module")
def series_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("phantoms")
    generate_dataset(out, 2, 300, PHANTOM)
    return find_series_dirs(out)


@pytest.fixture(scope="module")
def exported(series_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, np.ndarray, Options]:
    sample = load_images(series_dirs, Options(model_size=128), 2)
    model, size = detector_for_tests(sample=sample, size=128)
    options = Options(model_size=size)
    images = load_images(series_dirs, options, 4)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "detector.onnx", size=size)
    return model, path, images, options


def test_calibration_slice_equals_whole_series_slab(series_dirs: list[Path]) -> None:
    # The haloed 3-slice slab must give exactly what the whole series gives (edges included).
    options = Options(model_size=128)
    files = order_series(series_dirs[0])
    whole = preprocess_slab([f.read_bytes() for f in files], options).images
    for i in (0, 1, len(files) // 2, len(files) - 1):
        np.testing.assert_array_equal(slice_image(SliceRef(files, i), options), whole[i])


def test_checker_shape_inference_opset(exported: tuple) -> None:
    _, path, _, options = exported
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch.HasField("dim_value") and batch.dim_param  # symbolic, not frozen at 1
    info = inspect_onnx(path)
    assert (info.channels, info.height, info.width) == (3, options.model_size, options.model_size)
    s = options.model_size
    assert info.num_anchors == (s // 8) ** 2 + (s // 16) ** 2 + (s // 32) ** 2
    assert not info.quantized


def test_parity_with_torch_on_phantom_slices(exported: tuple) -> None:
    model, path, images, _ = exported
    assert images.shape[0] >= 8 and images.max() > 100  # real windowed slices, not blanks
    score_diff, box_diff = compare_with_torch(model, path, images)
    assert score_diff <= 1e-4
    assert box_diff <= 1e-2


def test_identical_detections_after_nms(exported: tuple) -> None:
    model, path, images, options = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = tuple(sess.run(["scores", "boxes"], {"images": images}))
    with torch.no_grad():
        torch_out = tuple(t.numpy() for t in model(torch.from_numpy(images)))
    report = agreement(torch_out, onnx_out, options)  # type: ignore[arg-type]
    assert report.reference_detections > 0, "no detections at all: the comparison would be vacuous"
    assert report.identical, report


def test_dynamic_batch_1_and_3(exported: tuple) -> None:
    _, path, images, _ = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    s3, b3 = sess.run(["scores", "boxes"], {"images": images[:3]})
    assert s3.shape[0] == 3 and b3.shape == (3, s3.shape[1], 4)
    for i in range(3):
        s1, b1 = sess.run(["scores", "boxes"], {"images": images[i : i + 1]})
        assert s1.shape == (1, *s3.shape[1:])
        np.testing.assert_allclose(s1[0], s3[i], atol=1e-5)
        np.testing.assert_allclose(b1[0], b3[i], atol=1e-3)


def test_cli_exports_a_checkpoint(tmp_path: Path) -> None:
    import damoyolo
    from ctlesion_export.cli import main

    torch.manual_seed(1)
    model = damoyolo.build_model("Ns", num_classes=1, in_channels=3)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "meta": {"variant": "Ns", "num_classes": 1, "in_channels": 3, "model_size": 128}}, ckpt)
    out = tmp_path / "d.onnx"
    assert main(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert inspect_onnx(out).height == 128


def test_cli_refuses_int8_without_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctlesion_export.cli import main

    fake = tmp_path / "missing.onnx"
    assert main(["--out", str(fake), "--from-onnx", "--int8"]) == 2
    assert "not found" in capsys.readouterr().err
