"""`ctlesion export`: checkpoint -> fused ONNX (fp32) and, on request, the calibrated INT8 QDQ model."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ctlesion_export.onnx_export import export_onnx

log = logging.getLogger(__name__)


def load_detector(checkpoint: Path, variant: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Build the model a checkpoint describes (ours, or an official one with ``variant``) and load it strictly."""
    import torch

    import damoyolo

    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    # weights_only: a checkpoint is data; never unpickle arbitrary objects from it.
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    meta: dict[str, Any] = dict(state.get("meta", {}))
    variant = variant or meta.get("variant")
    if variant is None:
        raise ValueError(f"{checkpoint} carries no variant (an official checkpoint?): pass --variant")
    weights = state["model"]
    num_classes = meta.get("num_classes") or _classes_from_weights(weights)
    in_channels = int(meta.get("in_channels", 3))  # official checkpoints are RGB
    model = damoyolo.build_model(variant, num_classes=num_classes, in_channels=in_channels)
    model.load_state_dict(weights, strict=True)
    model.eval()
    meta.update(variant=variant, num_classes=num_classes, in_channels=in_channels)
    meta.setdefault("model_size", 512)
    return model, meta


def _classes_from_weights(weights: dict[str, Any]) -> int:
    cls = [v for k, v in weights.items() if k.startswith("head.gfl_cls.0.") and k.endswith("weight")]
    if not cls:
        raise ValueError("cannot infer the class count from the checkpoint")
    return int(cls[0].shape[0])


def export_checkpoint(checkpoint: Path, onnx_path: Path, variant: str | None = None, size: int | None = None) -> Path:
    model, meta = load_detector(checkpoint, variant)
    model.fuse()
    return export_onnx(model, onnx_path, size=size or int(meta["model_size"]), in_channels=int(meta["in_channels"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctlesion export", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--variant", help="needed for an official DAMO-YOLO checkpoint (T, S, M, L, Ns, Nm, Nl)")
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--size", type=int, help="input size (default: the checkpoint's, 512 for CT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        export_checkpoint(args.checkpoint, args.out, args.variant, args.size)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0
