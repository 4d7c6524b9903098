"""The CPU target's default detector: the calibrated INT8 (QDQ) model, made once per exported ONNX.

Why INT8 by default on CPU: on the committed checkpoint INT8 minmax keeps FP32's accuracy on the
10 held-out series (CPM 0.704 = 0.704, slice mAP 0.751 vs 0.749; models/MODEL_CARD.md) and runs
2.4-2.6x faster in onnxruntime on this CPU (bench/RESULTS.md). The recipe is the model card's:
4 training phantom series (seeds 100000..100003, never evaluation seeds), 16 evenly spaced slices
each through preprocess_backend, minmax calibration, the head kept in float. ``--precision fp32``
of build-repo serves the float model instead.

The INT8 file sits beside the FP32 one with the sha256 of the FP32 bytes and the recipe in a
``.source`` file: it is re-made exactly when either changes, never by modification times.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

CALIBRATION_SEED = 100_000  # training seeds (the model card's calibration set)
CALIBRATION_CASES = 4
SLICES_PER_SERIES = 16
METHOD = "minmax"
RECIPE = f"{METHOD};seed={CALIBRATION_SEED};cases={CALIBRATION_CASES};slices={SLICES_PER_SERIES}"


def calibration_dir(root: Path) -> Path:
    """The calibration phantoms (generated once under ``root``)."""
    from ctlesion_phantoms.generate import generate_dataset

    out = root / f"calibration_{CALIBRATION_SEED}_{CALIBRATION_CASES}"
    if not (out / "manifest.json").exists():
        log.info("generating %d calibration phantom series in %s", CALIBRATION_CASES, out)
        generate_dataset(out, CALIBRATION_CASES, CALIBRATION_SEED)
    return out


def ensure_cpu_int8(fp32: Path, phantom_root: Path) -> Path:
    """``<fp32 stem>_int8.onnx`` beside ``fp32``, quantized now unless it was made from these bytes."""
    from ctlesion_export.calibration import DicomCalibrationReader, find_series_dirs
    from ctlesion_export.onnx_export import inspect_onnx
    from ctlesion_export.quantize import QuantizeConfig, quantize_int8
    from preprocess_backend.types import Options

    out = fp32.with_name(f"{fp32.stem}_int8.onnx")
    source = out.with_name(out.name + ".source")
    stamp = hashlib.sha256(fp32.read_bytes()).hexdigest() + ";" + RECIPE
    if out.exists() and source.exists() and source.read_text() == stamp:
        return out
    info = inspect_onnx(fp32)
    reader = DicomCalibrationReader(
        find_series_dirs(calibration_dir(phantom_root)), Options(model_size=info.height, k=info.channels, **info.scale()), SLICES_PER_SERIES
    )
    result = quantize_int8(fp32, out, reader, QuantizeConfig(method=METHOD))
    log.info("INT8 detector %s (%s, %d calibration slices, %.0f s)", out, result.method, result.calibration_slices, result.seconds)
    source.write_text(stamp)
    return out
