"""The gpu-torch detector's CUDA path: fp16 CUDA graphs per batch bucket give the eager outputs.

Skipped with a reason where torch sees no CUDA device (this project's CI and dev machines); run on a
GPU node with ``pytest -m gpu tests/test_gpu_target_cuda.py`` (passed on the H200 on 2026-12-04,
bench/gpu_node_check.sh).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_gpu_target_torch import fpr_cubes, lung_window_slices

from ctlesion_export.torch_serving import TorchDetector, TorchServingConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "ctlesion_damoyolo.pt"


@pytest.fixture(scope="module")
def detectors() -> tuple[TorchDetector, TorchDetector, TorchDetector]:
    if not CHECKPOINT.exists():
        pytest.skip(f"no trained checkpoint at {CHECKPOINT}")
    graphs = TorchDetector(CHECKPOINT, TorchServingConfig(device="cuda", buckets=(1, 2, 4, 8)))
    graphs.warmup()
    eager16 = TorchDetector(CHECKPOINT, TorchServingConfig(device="cuda", cuda_graphs=False))
    cpu32 = TorchDetector(CHECKPOINT, TorchServingConfig(device="cpu"))
    return graphs, eager16, cpu32


def test_graphs_are_captured_per_bucket(detectors: tuple[TorchDetector, ...]) -> None:
    graphs, _, _ = detectors
    assert graphs.fp16 and graphs.uses_graphs
    assert sorted(graphs.graphs) == [1, 2, 4, 8]


def test_graph_replay_equals_eager_fp16_for_every_bucket_and_odd_sizes(detectors: tuple[TorchDetector, ...]) -> None:
    graphs, eager16, _ = detectors
    images = lung_window_slices(19, graphs.size, seed=1)
    for n in (1, 3, 5, 8, 19):  # 3 and 5 pad into buckets 4 and 8; 19 runs as 8 + 8 + 3
        before = dict(graphs.bucket_counts)
        scores, boxes = graphs(images[:n])
        ref_scores, ref_boxes = eager16(images[:n])
        assert scores.shape == ref_scores.shape and scores.dtype == np.float32
        np.testing.assert_allclose(scores, ref_scores, atol=2e-3)
        np.testing.assert_allclose(boxes, ref_boxes, atol=0.5)
        assert sum(graphs.bucket_counts.values()) > sum(before.values())
    # padding rows never leak into the answer: a batch of 3 after a batch of 8 gives the batch-of-3 result
    graphs(images[8:16])
    again, _ = graphs(images[:3])
    np.testing.assert_allclose(again, graphs(images[:3])[0], atol=0)


def test_fp16_graphs_keep_the_fp32_cpu_detections(detectors: tuple[TorchDetector, ...]) -> None:
    graphs, _, cpu32 = detectors
    images = lung_window_slices(4, graphs.size, seed=1)
    scores16, boxes16 = graphs(images)
    scores32, boxes32 = cpu32(images)
    assert np.abs(scores16 - scores32).max() < 2e-2
    top = np.argsort(-scores32[..., 0], axis=1)[:, :20]  # the boxes NMS would report first
    rows = np.arange(len(images))[:, None]
    assert np.abs(boxes16[rows, top] - boxes32[rows, top]).max() < 1.0


def test_torch_fpr_classifier_on_cuda_equals_onnxruntime(fpr_onnx: Path) -> None:
    from ctlesion_export.fpr_repo import DEFAULT_FPR_CHECKPOINT
    from ctlesion_fpr.predict import FprPredictor, TorchFprPredictor

    cubes = fpr_cubes(fpr_onnx, 70, seed=3)
    np.testing.assert_allclose(TorchFprPredictor(DEFAULT_FPR_CHECKPOINT, device="cuda")(cubes),
                               FprPredictor(fpr_onnx)(cubes), atol=1e-4)  # fmt: skip
