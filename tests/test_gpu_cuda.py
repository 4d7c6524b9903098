"""The detector on a CUDA GPU: the same numbers as on the CPU, fp16 close to fp32, training steps run.

Skipped with a reason where torch sees no CUDA device (CI, the dev machine); run on a GPU node with
``pytest -m gpu``. The committed checkpoint is what a GPU deployment of the torch detector would load.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import damoyolo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]

CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "ctlesion_damoyolo.pt"


def _phantom_like_input(n: int, size: int) -> torch.Tensor:
    """uint8-valued images with lung-window structure (dark lungs, bright blobs), not flat noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 3, size, size), 200.0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        cy, cx = (torch.rand(2, generator=g) * size * 0.5 + size * 0.25).tolist()
        lung = ((yy - cy) ** 2 / (size * 0.3) ** 2 + (xx - cx) ** 2 / (size * 0.2) ** 2) < 1
        x[i, :, lung] = 40.0
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < (size * 0.03) ** 2
        x[i, :, blob] = 180.0
    return (x + torch.randn(x.shape, generator=g) * 5).clamp(0, 255).round()


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    if not CHECKPOINT.exists():
        pytest.skip(f"no trained checkpoint at {CHECKPOINT}")
    from ctlesion_export.cli import load_detector

    model, _ = load_detector(CHECKPOINT)
    return model.fuse().eval()


@torch.no_grad()
def test_cuda_fp32_gives_the_cpu_outputs(trained: torch.nn.Module) -> None:
    x = _phantom_like_input(4, 256)
    cpu_scores, cpu_boxes = trained(x)
    gpu = copy.deepcopy(trained).cuda()
    torch.backends.cudnn.allow_tf32 = False  # compare IEEE fp32 with IEEE fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    scores, boxes = gpu(x.cuda())
    assert (scores.cpu() - cpu_scores).abs().max() < 1e-3
    assert (boxes.cpu() - cpu_boxes).abs().max() < 5e-2  # pixels, after the DFL integral


@torch.no_grad()
def test_cuda_fp16_keeps_the_confident_detections(trained: torch.nn.Module) -> None:
    x = _phantom_like_input(4, 256).cuda()
    model = copy.deepcopy(trained).cuda()
    scores32, boxes32 = model(x)
    scores16, boxes16 = model.half()(x.half())
    assert (scores16.float() - scores32).abs().max() < 2e-2
    # the 20 best-scored boxes of each image (what NMS would report first) move by well under a pixel
    top = scores32[..., 0].topk(20, dim=1).indices
    rows = torch.arange(len(x), device=x.device)[:, None]
    assert (boxes16.float()[rows, top] - boxes32[rows, top]).abs().max() < 1.0


def test_cuda_training_step_computes_the_cpu_loss_and_gradients() -> None:
    """One AlignedOTA + QFL/DFL/GIoU step: the same loss and gradient direction on CUDA as on the CPU."""
    torch.manual_seed(0)
    cpu_model = damoyolo.build_model("T", num_classes=1).train()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    x = _phantom_like_input(4, 128)
    boxes = [[40.0, 40, 72, 72], [20.0, 30, 44, 50], [60.0, 64, 100, 96], [10.0, 80, 40, 118]]
    targets = [torch.tensor([[0.0, *b]]) for b in boxes]

    grads = []
    losses = []
    for model, device in ((cpu_model, "cpu"), (cuda_model, "cuda")):
        loss = model.compute_loss(model(x.to(device)), [t.to(device) for t in targets])
        loss.total.backward()
        losses.append(loss.total.detach().cpu())
        grads.append(
            torch.cat([p.grad.detach().cpu().flatten() for p in model.parameters() if p.grad is not None])
        )
    assert torch.isfinite(losses[1])
    assert torch.allclose(losses[0], losses[1], rtol=1e-3, atol=1e-5), losses
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.999, float(cosine)
