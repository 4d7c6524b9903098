"""The gpu-torch target on this CPU machine: the torch detector, its repository, and the real server.

No GPU here: the detector runs fp32 on the CPU (the fallback); the CUDA-graph path is covered by
tests/test_gpu_target_cuda.py (gpu-marked, skipped without CUDA). The end-to-end test serves the
committed checkpoint through the gpu-torch repository and compares the client's detections with the
cpu target's (onnxruntime) on the same series.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import CHECKPOINT
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ctlesion_export.build_repo import RepoConfig, build_repository, scale_pre_post
from ctlesion_export.torch_serving import (
    TorchDetector,
    TorchServingConfig,
    bucket_for,
    buckets_up_to,
    run_merged,
)


def _load(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def lung_window_slices(n: int, size: int = 512, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 images with lung-window structure (dark lungs, a bright blob), not flat noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.full((n, channels, size, size), 200.0)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        out[i, :, ((yy - cy) / (0.3 * size)) ** 2 + ((xx - cx) / (0.2 * size)) ** 2 < 1] = 40
        out[i, :, (yy - cy) ** 2 + (xx - cx) ** 2 < (0.03 * size) ** 2] = 180
    return (out + rng.normal(0, 5, out.shape)).clip(0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    if not CHECKPOINT.exists():
        pytest.skip(f"no trained checkpoint at {CHECKPOINT}")
    return CHECKPOINT


@pytest.fixture(scope="module")
def cpu_detector(checkpoint: Path) -> TorchDetector:
    return TorchDetector(checkpoint, TorchServingConfig(device="cpu"))


def test_buckets() -> None:
    assert buckets_up_to(32) == (1, 2, 4, 8, 16, 32)
    assert buckets_up_to(24) == (1, 2, 4, 8, 16, 24)
    assert buckets_up_to(1) == (1,)
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="exceed"):
        bucket_for(9, (1, 2, 4, 8))
    with pytest.raises(ValueError, match="increasing"):
        TorchServingConfig(buckets=(4, 2))


def test_pre_post_instances_follow_the_cores() -> None:
    assert scale_pre_post(16) == (11, 4)  # 15 cores for the Python steps, split 3 : 1 by their cost
    assert scale_pre_post(2) == (1, 1)
    assert scale_pre_post(1) == (1, 1)
    assert sum(scale_pre_post(64)) == 63


@pytest.mark.slow
def test_cpu_fallback_equals_onnxruntime(cpu_detector: TorchDetector, detector_onnx: Path) -> None:
    """The torch detector (fp32, CPU) gives the ONNX detector's outputs on the same uint8 slices."""
    images = lung_window_slices(3)
    scores, boxes = cpu_detector(images)
    assert cpu_detector.fp16 is False and not cpu_detector.graphs
    ref_scores, ref_boxes = ort.InferenceSession(str(detector_onnx)).run(None, {"images": images.astype(np.float32)})
    assert scores.dtype == np.float32 and scores.shape == ref_scores.shape
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    np.testing.assert_allclose(boxes, ref_boxes, atol=2e-2)


@pytest.mark.slow
def test_merged_requests_are_split_back(cpu_detector: TorchDetector) -> None:
    images = lung_window_slices(3)
    merged = run_merged(cpu_detector, [images[:1], images[1:]])
    assert [len(s) for s, _ in merged] == [1, 2]
    alone_scores, alone_boxes = cpu_detector(images[1:])
    np.testing.assert_allclose(merged[1][0], alone_scores, atol=1e-5)
    np.testing.assert_allclose(merged[1][1], alone_boxes, atol=1e-3)
    with pytest.raises(ValueError, match="images must be"):
        cpu_detector(images[:, :1])


@pytest.mark.slow
def test_gpu_torch_repository(checkpoint: Path, tmp_path: Path) -> None:
    out = build_repository(None, tmp_path / "r", RepoConfig(target="gpu-torch", max_batch_size=24, cores=16),
                           checkpoint=checkpoint)  # fmt: skip
    det = _load(out / "detector" / "config.pbtxt")
    assert det.backend == "python" and det.max_batch_size == 24
    assert det.parameters["buckets"].string_value == "1,2,4,8,16,24"
    assert (out / "detector" / "1" / "model.pt").read_bytes() == checkpoint.read_bytes()
    assert (out / "detector" / "1" / "model.py").exists()
    import torch

    kind = mc.ModelInstanceGroup.KIND_GPU if torch.cuda.is_available() else mc.ModelInstanceGroup.KIND_CPU
    assert det.instance_group[0].kind == kind
    pre, post = (_load(out / m / "config.pbtxt").instance_group[0].count for m in ("preprocess", "postprocess"))
    assert (pre, post) == scale_pre_post(16)
    with pytest.raises(ValueError, match="needs the checkpoint"):
        build_repository(None, tmp_path / "r2", RepoConfig(target="gpu-torch"))


def _match(cpu: list, torch_dets: list, threshold: float) -> None:
    """Each detection has its twin on the same slice (box within 1 px, score within 0.01); one without a
    twin is allowed only where its score sits at the threshold (fp32 rounding can flip it)."""
    unmatched = list(torch_dets)
    for d in cpu:
        twin = next((t for t in unmatched if t.sop_instance_uid == d.sop_instance_uid
                     and np.abs(np.subtract(t.box_px, d.box_px)).max() < 1.0), None)  # fmt: skip
        if twin is None:
            assert abs(d.score - threshold) < 0.01, f"cpu detection without a torch twin: {d}"
            continue
        assert abs(twin.score - d.score) < 0.01, (d, twin)
        unmatched.remove(twin)
    for t in unmatched:
        assert abs(t.score - threshold) < 0.01, f"torch detection without a cpu twin: {t}"


@pytest.mark.triton
@pytest.mark.slow
def test_gpu_torch_target_serves_the_cpu_targets_detections(
    triton: object, checkpoint: Path, detector_onnx: Path, phantom_case: Path, tmp_path: Path
) -> None:
    """The real tritonserver serving the gpu-torch repository (torch fp32 on this CPU) through the client."""
    from ctlesion_client import LesionClient
    from ctlesion_client.server import TritonServer
    from ctlesion_phantoms.truth import CaseTruth

    truth = CaseTruth.load(phantom_case / "truth.json")
    files = sorted((phantom_case / "series").glob("*.dcm"))
    centre = int(round(truth.nodules[0].centre_voxel[0]))
    start = max(0, min(len(files) - 16, centre - 8))
    series = tmp_path / "series"
    series.mkdir()
    for f in files[start : start + 16]:  # one short series: one slab around a known nodule
        shutil.copy2(f, series / f.name)

    def detect(url: str) -> Any:
        with LesionClient(url) as client:
            client.wait_ready(60)
            return client.detect_series(series)

    def served_by(repo: Path, name: str) -> Any:
        server = TritonServer(repo, log_path=tmp_path / f"{name}.log").start(timeout_s=240)
        try:
            return detect(server.grpc_url)
        finally:
            server.stop()

    # The reference is the cpu target serving the same checkpoint in fp32: the session's server when
    # it serves fp32, else one built here (an INT8 default would differ by quantization, not by torch).
    fixture_build = json.loads((Path(triton.model_repository) / "BUILD.json").read_text())  # type: ignore[attr-defined]
    if fixture_build["model"]["quantized"]:
        cpu = served_by(build_repository(detector_onnx, tmp_path / "cpu", RepoConfig(target="cpu")), "cpu")
    else:
        cpu = detect(triton.grpc_url)  # type: ignore[attr-defined]
    repo = build_repository(None, tmp_path / "gpu-torch", RepoConfig(target="gpu-torch", cores=2, torch_threads=1),
                            checkpoint=checkpoint)  # fmt: skip
    served = served_by(repo, "gpu-torch")
    assert served.num_slices == cpu.num_slices == 16
    assert cpu.detections, "the cpu target finds nothing near a known nodule: the comparison would be empty"
    # Each side sends its own per-slice threshold (the FPR model's candidate threshold where one is
    # served, else the article's 0.3): compare at the higher of the two.
    threshold = max(cpu.options["candidate_threshold"], served.options["candidate_threshold"])
    cpu_dets = [d for d in cpu.detections if d.score >= threshold]
    served_dets = [d for d in served.detections if d.score >= threshold]
    assert cpu_dets, "no cpu detection at the common threshold: the comparison would be empty"
    _match(cpu_dets, served_dets, threshold=threshold)
    assert len(served_dets) >= len(cpu_dets) - 1


@pytest.mark.slow
def test_gpu_torch_cli_defaults_follow_the_node_and_explicit_values_win(checkpoint: Path, fpr_onnx: Path, tmp_path: Path) -> None:
    """Two detector instances and a quarter of the cores for the FPR classifier on gpu-torch (measured on
    the H200, bench/RESULTS.md § GPU); the cpu target keeps one of each; a value given on the command line wins."""
    from ctlesion_export.build_repo import main

    base = ["--checkpoint", str(checkpoint), "--fpr-onnx", str(fpr_onnx), "--cores", "16"]
    assert main(["--target", "gpu-torch", "--out", str(tmp_path / "d"), *base]) == 0
    assert _load(tmp_path / "d" / "detector" / "config.pbtxt").instance_group[0].count == 2
    cls = _load(tmp_path / "d" / "fpr_classifier" / "config.pbtxt")
    assert cls.backend == "python" and cls.parameters["intra_op_threads"].string_value == "4"
    assert main(["--target", "gpu-torch", "--out", str(tmp_path / "e"), *base,
                 "--detector-instances", "1", "--fpr-intra-op-threads", "2"]) == 0  # fmt: skip
    assert _load(tmp_path / "e" / "detector" / "config.pbtxt").instance_group[0].count == 1
    assert _load(tmp_path / "e" / "fpr_classifier" / "config.pbtxt").parameters["intra_op_threads"].string_value == "2"


def fpr_cubes(fpr_onnx: Path, n: int, seed: int = 0) -> np.ndarray:
    """Cubes the classifier tells apart: lung-like noise (-850 HU) round a solid sphere (0 HU) of 0-9
    voxels radius; pure noise would give one near-zero probability for all."""
    from ctlesion_fpr.predict import read_meta

    shape = read_meta(fpr_onnx).spec.shape
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*(np.arange(k) - (k - 1) / 2 for k in shape), indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    hu = rng.normal(-850, 60, (n, *shape))
    for i, radius in enumerate(rng.uniform(0, 9, n)):
        hu[i][r <= radius] = rng.normal(0, 40, int((r <= radius).sum()))
    return np.clip((hu + 1000) / 1400 * 255, 0, 255).astype(np.uint8)  # the cube's HU -1000..400 window


def test_torch_fpr_classifier_equals_the_onnxruntime_one(fpr_onnx: Path) -> None:
    """gpu-torch's classifier runs the checkpoint in torch: the same probabilities as the served ONNX
    (70 cubes: more than one run of MAX_RUN_BATCH; none at all gives an empty answer)."""
    from ctlesion_export.fpr_repo import DEFAULT_FPR_CHECKPOINT
    from ctlesion_fpr.predict import FprPredictor, TorchFprPredictor

    cubes = fpr_cubes(fpr_onnx, 70)
    torch_cpu = TorchFprPredictor(DEFAULT_FPR_CHECKPOINT, device="cpu")
    reference = FprPredictor(fpr_onnx)(cubes)
    np.testing.assert_allclose(torch_cpu(cubes), reference, atol=1e-5)
    assert torch_cpu(cubes[:0]).shape == (0,)
    assert reference.std() > 0.01  # random cubes do not all give one probability: the comparison means something


@pytest.mark.slow
def test_gpu_torch_serves_the_fpr_checkpoint_in_torch_when_its_onnx_is_its_export(fpr_onnx: Path, checkpoint: Path, tmp_path: Path) -> None:
    import hashlib

    from ctlesion_export.fpr_repo import DEFAULT_FPR_CHECKPOINT

    known = tmp_path / "fpr.onnx"
    shutil.copy2(fpr_onnx, known)
    known.with_name("fpr.onnx.source").write_text(hashlib.sha256(DEFAULT_FPR_CHECKPOINT.read_bytes()).hexdigest())
    cfg = RepoConfig(target="gpu-torch", cores=16, torch_instance_kind="cpu")
    out = build_repository(None, tmp_path / "r", cfg, checkpoint=checkpoint, fpr_onnx=known)  # checks every model's tensors
    cls = _load(out / "fpr_classifier" / "config.pbtxt")
    assert cls.backend == "python" and cls.parameters["fpr_checkpoint"].string_value == "model.pt"
    assert cls.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU  # as the detector's, here CPU
    assert (out / "fpr_classifier" / "1" / "model.pt").read_bytes() == DEFAULT_FPR_CHECKPOINT.read_bytes()
    assert "TorchFprPredictor" in (out / "fpr_classifier" / "1" / "model.py").read_text()
    io_check = json.loads((out / "BUILD.json").read_text())["io_check"]
    assert any(line.startswith("fpr_classifier:") and "exported from model.pt" in line for line in io_check["checked"])
    # an ONNX of unknown origin keeps onnxruntime: torch must not serve a different model
    stray = build_repository(None, tmp_path / "s", cfg, checkpoint=checkpoint, fpr_onnx=fpr_onnx)
    cls = _load(stray / "fpr_classifier" / "config.pbtxt")
    assert "fpr_checkpoint" not in cls.parameters and cls.parameters["fpr_onnx_file"].string_value == "model.onnx"
    assert not (stray / "fpr_classifier" / "1" / "model.pt").exists()


def test_merged_cube_requests_are_split_back(fpr_onnx: Path) -> None:
    """What both served classifiers return per request: its own cubes' probabilities, [n, 1], empty ones kept."""
    from ctlesion_fpr.predict import FprPredictor, probabilities_per_request

    predict = FprPredictor(fpr_onnx)
    cubes = fpr_cubes(fpr_onnx, 5, seed=2)
    parts = probabilities_per_request(predict, [cubes[:2], cubes[2:2], cubes[2:]])
    assert [p.shape for p in parts] == [(2, 1), (0, 1), (3, 1)]
    np.testing.assert_allclose(np.concatenate(parts).ravel(), predict(cubes), atol=1e-6)
