"""A seeded, untrained detector whose outputs vary with the image, for tests and benchmarks.

A freshly built DAMO-YOLO scores every anchor at the prior (0.01) with near-zero regression logits,
so parity, INT8 and NMS checks on it would compare constants. ``seeded_detector`` rescales only the
head's final convolutions so that, on sample images, class logits spread around -3 (a few anchors
above 0.3) and the DFL logits are no longer flat. Everything else keeps its seeded random init.
The real checkpoint (models/ctlesion_damoyolo.pt) replaces it wherever it exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

REAL_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "ctlesion_damoyolo.pt"

# Targets of the head's pre-activation outputs on the sample images (mean, std).
CLS_LOGIT = (-3.0, 1.5)
REG_LOGIT = (0.0, 2.0)


def seeded_detector(
    variant: str = "Ns",
    seed: int = 0,
    num_classes: int = 1,
    in_channels: int = 3,
    sample: np.ndarray | None = None,
    size: int = 128,
) -> Any:
    """Fused eval-mode model; ``sample`` float32 [N, C, S, S] 0..255 (default: seeded noise at ``size``)."""
    import torch

    import damoyolo

    torch.manual_seed(seed)
    model = damoyolo.build_model(variant, num_classes=num_classes, in_channels=in_channels).eval()
    model.fuse()
    if sample is None:
        rng = np.random.default_rng(seed)
        sample = rng.integers(0, 256, (2, in_channels, size, size)).astype(np.float32)
    _spread_head(model, torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)))
    return model


def _spread_head(model: Any, images: Any) -> None:
    import torch

    head = model.head
    convs = [(c, CLS_LOGIT) for c in head.gfl_cls] + [(c, REG_LOGIT) for c in head.gfl_reg]
    seen: dict[int, torch.Tensor] = {}
    hooks = [c.register_forward_hook(lambda m, _i, out: seen.__setitem__(id(m), out.detach())) for c, _ in convs]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for conv, (mean, std) in convs:
            # out = W x + b; set W' = a W, b' = c so that out' has the target mean / std.
            wx = seen[id(conv)] - conv.bias.view(1, -1, 1, 1)
            a = std / max(float(wx.std()), 1e-8)
            conv.weight.mul_(a)
            conv.bias.copy_(mean - a * wx.mean(dim=(0, 2, 3)))


def detector_for_tests(sample: np.ndarray | None = None, size: int = 128) -> tuple[Any, int]:
    """(fused model, input size): the real checkpoint when present, else the seeded Ns model."""
    if REAL_CHECKPOINT.exists():
        from ctlesion_export.cli import load_detector

        model, meta = load_detector(REAL_CHECKPOINT)
        model.fuse()
        return model, int(meta["model_size"])
    return seeded_detector(sample=sample, size=size), size
