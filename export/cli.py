"""`ctlesion export`: checkpoint -> fused ONNX (fp32) and, on request, the calibrated INT8 QDQ model.

    ctlesion export --checkpoint models/ctlesion_damoyolo.pt --out work/export/detector.onnx \
        [--int8 --calibration-dir PHANTOMS/train --method percentile|entropy|minmax \
         [--target cpu|tensorrt] [--int8-out work/export/detector_int8.onnx] [--keep-float REGEX ...] [--sensitivity-sweep N] \
         [--compare-dir PHANTOMS/heldout]]

INT8: calibration slices come from the DICOM series under --calibration-dir through preprocess_backend
(the serving code path); see ctlesion_export.quantize for what is kept in float and why.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
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
    return export_onnx(
        model, onnx_path, size=size or int(meta["model_size"]), in_channels=int(meta["in_channels"]), scale=checkpoint_scale(meta)
    )


def checkpoint_scale(meta: dict[str, Any]) -> dict[str, float | None]:
    """The training scale a checkpoint records (``TrainConfig.pixel_mm`` / ``context_mm``); none: native."""
    return {"pixel_mm": meta.get("pixel_mm"), "context_mm": meta.get("context_mm")}


def build_parser() -> argparse.ArgumentParser:
    from ctlesion_export.quantize import DEFAULT_KEEP_FLOAT, METHODS, TARGETS, QuantizeConfig

    parser = argparse.ArgumentParser(prog="ctlesion export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="PyTorch checkpoint (required unless --from-onnx)")
    parser.add_argument("--variant", help="needed for an official DAMO-YOLO checkpoint (T, S, M, L, Ns, Nm, Nl)")
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write (fp32)")
    parser.add_argument("--size", type=int, help="input size (default: the checkpoint's, 512 for CT)")
    parser.add_argument("--from-onnx", action="store_true", help="--out is an existing fp32 ONNX: only quantize it")
    q = parser.add_argument_group("INT8 (QDQ, onnxruntime.quantization)")
    q.add_argument("--int8", action="store_true", help="also write the calibrated INT8 QDQ model")
    q.add_argument("--int8-out", type=Path, help="INT8 file (default: <out stem>_int8.onnx)")
    q.add_argument("--calibration-dir", type=Path, action="append", help="folder(s) of DICOM series (repeatable)")
    q.add_argument("--method", choices=METHODS, default=QuantizeConfig.method)
    q.add_argument("--calibration-slices", type=int, default=16, help="slices per series (evenly spaced)")
    q.add_argument("--keep-float", action="append", metavar="REGEX",
                   help=f"node-name regex kept in float (repeatable; default {list(DEFAULT_KEEP_FLOAT)})")
    q.add_argument("--quantize-head", action="store_true", help="drop the default keep-float patterns")
    q.add_argument("--target", choices=TARGETS, default="cpu",
                   help="cpu: uint8 asymmetric activations (fast in ORT); tensorrt: int8 symmetric, for build-engine")
    q.add_argument("--sensitivity-sweep", type=int, default=0, metavar="N",
                   help="rank layer groups by INT8 sensitivity and keep the N worst in float")
    q.add_argument("--compare-dir", type=Path, action="append", help="held-out DICOM series: report INT8 vs FP32")
    return parser


def quantize_cli(args: argparse.Namespace, fp32: Path) -> Path:
    """The --int8 half of ``main``: calibrate on DICOM, optionally sweep, quantize, compare."""
    from dataclasses import replace

    from ctlesion_export.accuracy import compare_detections
    from ctlesion_export.calibration import DicomCalibrationReader, find_series_dirs
    from ctlesion_export.onnx_export import inspect_onnx
    from ctlesion_export.quantize import DEFAULT_KEEP_FLOAT, QuantizeConfig, quantize_int8, sensitivity_sweep
    from preprocess_backend.types import Options

    if not args.calibration_dir:
        raise ValueError("--int8 needs --calibration-dir (DICOM series drawn through preprocess_backend)")
    info = inspect_onnx(fp32)
    options = Options(model_size=info.height, k=info.channels, **info.scale())
    reader = DicomCalibrationReader(find_series_dirs(args.calibration_dir), options, args.calibration_slices)
    keep = tuple(args.keep_float or ()) + (() if args.quantize_head else DEFAULT_KEEP_FLOAT)
    # One calibration pass serves the sweep and the final model.
    cache = Path(tempfile.mkdtemp(prefix="ctlesion-ranges-")) / "ranges.json"
    config = QuantizeConfig(method=args.method, keep_float=keep, target=args.target,
                            calibration_cache=cache)
    if args.sensitivity_sweep:
        sweep = sensitivity_sweep(fp32, reader, reader.images(), config)
        worst = sweep.most_sensitive(args.sensitivity_sweep)
        print(f"sensitivity (baseline error {sweep.baseline_error:.4f}):")
        for s in sorted(sweep.layers, key=lambda s: -s.gain):
            print(f"  {s.gain:+.5f}  {s.group} ({len(s.nodes)} nodes){'  -> float' if s in worst else ''}")
        config = replace(config, nodes_to_exclude=tuple(n for s in worst for n in s.nodes))
    out = args.int8_out or fp32.with_name(f"{fp32.stem}_int8.onnx")
    result = quantize_int8(fp32, out, reader, config)
    print(f"wrote {out} ({result.method}, {result.calibration_slices} slices, {result.quantized_nodes} quantized nodes, "
          f"{len(result.excluded_nodes)} kept float, {result.seconds:.1f} s)")
    if args.compare_dir:
        report = compare_detections(fp32, out, find_series_dirs(args.compare_dir), options)
        print(f"INT8 vs FP32: {report.to_dict()}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.from_onnx:
            if not args.out.is_file():
                raise FileNotFoundError(f"{args.out} not found (--from-onnx quantizes an existing ONNX file)")
        elif args.checkpoint is None:
            parser.error("--checkpoint is required (or --from-onnx)")
        else:
            export_checkpoint(args.checkpoint, args.out, args.variant, args.size)
            print(f"wrote {args.out}")
        if args.int8:
            quantize_cli(args, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
