"""The FPR network: four 3D conv stages on a uint8 cube, global pooling, one logit.

Small on purpose (~0.1 M parameters at width 8, ~0.04 GFLOP per cube): it runs on every candidate lesion of
every series, on CPU nodes too. Input uint8 [N, D, H, W] (the codes of ``preprocess_backend.cubes``),
cast and scaled inside the graph so the served ONNX takes what the preprocess step emits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


class FprNet(nn.Module):
    """uint8 / float cube [N, D, H, W] (codes 0..255) -> nodule logit [N]."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        # one conv at full resolution, then pool: the full-resolution 3x3x3 pair cost 2.3x the FLOPs
        self.stem = nn.Sequential(nn.Conv3d(1, w, 3, padding=1, bias=False), nn.BatchNorm3d(w), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList([_block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 4 * w)])
        self.pool = nn.MaxPool3d(2)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w * 2, 1))

    def forward(self, cubes: torch.Tensor) -> torch.Tensor:
        x = cubes.to(torch.float32).unsqueeze(1) * (1.0 / 255.0)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(self.pool(x))
        feat = torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)
        return self.head(feat).squeeze(1)


# Test-time flips of a cube [N, D, H, W] (axis numbers): the logit is the mean over them. A nodule
# is a nodule mirrored; averaging steadies the ranking (validation CPM +0.01, models/MODEL_CARD.md).
TTA_FLIPS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((),),
    4: ((), (3,), (2,), (2, 3)),  # in-plane mirrors
    8: ((), (3,), (2,), (2, 3), (1,), (1, 3), (1, 2), (1, 2, 3)),  # and along z
}


def flips_of(meta: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """The flips a checkpoint's meta declares (none before they existed)."""
    return tuple(tuple(int(a) for a in f) for f in meta.get("tta_flips", [[]])) or ((),)


def tta_logits(net: FprNet, cubes: torch.Tensor, flips: tuple[tuple[int, ...], ...] = ((),)) -> torch.Tensor:
    """Mean logit over the flipped copies (one pass each; no flip: the plain logit)."""
    parts = [net(torch.flip(cubes, dims=f) if f else cubes) for f in flips]
    return parts[0] if len(parts) == 1 else torch.stack(parts).mean(dim=0)


class FprProbability(nn.Module):
    """What is served: sigmoid of the (flip-averaged) logit, input uint8."""

    def __init__(self, net: FprNet, flips: tuple[tuple[int, ...], ...] = ((),)) -> None:
        super().__init__()
        self.net = net
        self.flips = flips

    def forward(self, cubes: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(tta_logits(self.net, cubes, self.flips)).unsqueeze(1)  # [N, 1]: Triton's batched output shape


def save_checkpoint(net: FprNet, path: Path, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save({"model": state, "meta": meta}, path)


def load_checkpoint(path: Path) -> tuple[FprNet, dict[str, Any]]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = dict(ckpt.get("meta", {}))
    net = FprNet(width=int(meta.get("width", 16)))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()})
    return net.eval(), meta


def export_onnx(net: FprNet, path: Path, shape: tuple[int, int, int], meta: dict[str, Any] | None = None) -> Path:
    """ONNX with a dynamic batch: input ``cubes`` uint8 [N, D, H, W] -> ``probability`` float32 [N, 1]."""
    import json

    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    model = FprProbability(net.eval(), flips_of(meta or {}))
    dummy = torch.zeros((2, *shape), dtype=torch.uint8)
    torch.onnx.export(
        model, (dummy,), str(path), input_names=["cubes"], output_names=["probability"],
        dynamic_axes={"cubes": {0: "n"}, "probability": {0: "n"}}, opset_version=17, dynamo=False,
    )
    proto = onnx.load(str(path))
    for key, value in (meta or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), json.dumps(value)
    onnx.save(proto, str(path))
    return path
