"""FP32 ONNX detector -> calibrated INT8 QDQ ONNX (onnxruntime.quantization), the input of both ORT CPU
and TensorRT's explicit INT8 (TensorRT 10 deprecates implicit calibrators).

Steps: ``quant_pre_process`` (symbolic shape inference + ORT graph optimisation, as ORT advises),
calibration on DICOM slices through preprocess_backend (``DicomCalibrationReader``), then
``quantize_static`` in QDQ format with per-channel symmetric int8 weights. Activations depend on the target:
``cpu`` (default): asymmetric uint8, the fast path of ORT's x86 kernels; ``tensorrt``: symmetric int8
(zero-point 0, the only form TensorRT takes). Measured on the 2-core x86 dev machine (ORT 1.32, seeded
Ns at 256 px, 1 thread, min-max): u8 QDQ 8.2 ms vs FP32 9.3 ms, while s8 QDQ took 31.8 ms (3.4x
slower than FP32), so one INT8 file does not serve both: export one per target.

Keeping sensitive layers in float: ``keep_float`` regex patterns over node names (default: the head,
i.e. the final gfl_cls / gfl_reg convs and the decode: sigmoid, DFL softmax / integral, box
arithmetic, whose outputs are the served scores and pixel coordinates), explicit node names, or
``sensitivity_sweep``: quantize with one group of layers kept float at a time (calibration cached and
reused) and rank groups by how much error keeping them float removes.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

METHODS = ("entropy", "percentile", "minmax")
TARGETS = ("cpu", "tensorrt")
DEFAULT_KEEP_FLOAT: tuple[str, ...] = (r"^/head/",)
QUANTIZABLE_WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass
class QuantizeConfig:
    # minmax: on 10 held-out phantom series (trained T, 64 calibration slices) INT8 CPM 0.581 / slice
    # mAP 0.693 vs FP32 0.576 / 0.691; percentile 0.537 / 0.677, entropy 0.443 / 0.527 (stage-1
    # checkpoint); the GPU-fine-tuned one: minmax 0.704 / 0.751 vs FP32 0.704 / 0.749
    method: str = "minmax"
    per_channel: bool = True
    target: str = "cpu"  # "cpu": uint8 asymmetric activations; "tensorrt": int8 symmetric (zero-point 0)
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT  # regexes over node names (after pre-processing)
    nodes_to_exclude: tuple[str, ...] = ()  # exact node names, added to the pattern matches
    percentile: float = 99.999
    op_types: tuple[str, ...] | None = None  # None: every op type ORT can quantize
    histogram_bins: int = 2048  # percentile histogram
    entropy_bins: int = 512  # entropy histogram (TensorRT uses 2048; ORT's search is O(bins) Python per tensor)
    calibration_cache: Path | None = None  # JSON of tensor ranges; reused when it exists

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"quantization target {self.target!r}: choose one of {', '.join(TARGETS)}")
        if self.method not in METHODS:
            raise ValueError(f"calibration method {self.method!r}: choose one of {', '.join(METHODS)}")

    @property
    def symmetric_activations(self) -> bool:
        return self.target == "tensorrt"


@dataclass
class QuantizeResult:
    path: Path
    method: str
    calibration_slices: int
    excluded_nodes: list[str]
    quantized_nodes: int  # nodes fed by a DequantizeLinear
    seconds: float


@dataclass
class LayerSensitivity:
    group: str  # node-name prefix
    nodes: list[str]
    error_kept_float: float  # output error of the INT8 model with this group in float
    gain: float  # error(all quantized) - error_kept_float; larger = more sensitive


@dataclass
class SweepResult:
    baseline_error: float  # every candidate quantized
    fp32_size: int
    layers: list[LayerSensitivity] = field(default_factory=list)

    def most_sensitive(self, n: int) -> list[LayerSensitivity]:
        return [s for s in sorted(self.layers, key=lambda s: -s.gain) if s.gain > 0][:n]


def preprocess_model(fp32_onnx: Path, out_path: Path) -> Path:
    """ORT's recommended pre-processing (shape inference + optimisation) before quantisation."""
    from onnxruntime.quantization import quant_pre_process

    try:
        # auto_merge: the anchor grid is computed from the input's shape, and the symbolic
        # inference needs to merge the dims it derives there with the graph's own.
        quant_pre_process(str(fp32_onnx), str(out_path), skip_optimization=False, auto_merge=True)
    except Exception as exc:  # symbolic inference is best effort; ONNX's own inference suffices here
        log.warning("symbolic shape inference failed (%s); using ONNX shape inference only", exc)
        quant_pre_process(str(fp32_onnx), str(out_path), skip_optimization=False, skip_symbolic_shape=True)
    return out_path


def nodes_matching(onnx_path: Path, patterns: Sequence[str]) -> list[str]:
    import onnx

    regexes = [re.compile(p) for p in patterns]
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [n.name for n in graph.node if any(r.search(n.name) for r in regexes)]


def _calibration_method(name: str) -> object:
    from onnxruntime.quantization import CalibrationMethod

    return {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile, "minmax": CalibrationMethod.MinMax}[name]


def _op_types() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))


def calibrate(pre: Path, reader: object, config: QuantizeConfig, cache: Path) -> Path:
    """Tensor ranges of ``pre`` on the reader's data, written to ``cache`` (ORT's JSON format).

    Why not let quantize_static calibrate: it passes no histogram size to the entropy calibrator,
    whose default (128 bins, 128 quantized bins) leaves a single candidate threshold, so "entropy"
    silently equals min-max. Here the bins are set, and the sensitivity sweep reuses the ranges.
    """
    from onnxruntime.quantization import create_calibrator, save_tensors_data

    extra: dict[str, object] = {"symmetric": config.symmetric_activations}
    if config.method == "entropy":
        extra.update(num_bins=config.entropy_bins, num_quantized_bins=128)
    elif config.method == "percentile":
        extra.update(num_bins=config.histogram_bins, percentile=config.percentile)
    with tempfile.TemporaryDirectory(prefix="ctlesion-calib-") as tmp:
        calibrator = create_calibrator(
            pre,
            _op_types(),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=_calibration_method(config.method),
            extra_options=extra,
        )
        if hasattr(reader, "rewind"):  # a reader used before (sweep, images()) starts over
            reader.rewind()
        calibrator.collect_data(reader)  # type: ignore[arg-type]
        ranges = calibrator.compute_data()
        del calibrator
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_data(ranges, cache)
    return cache


def _quantize(pre: Path, out: Path, cache: Path, config: QuantizeConfig, exclude: Sequence[str]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(pre),
        str(out),
        calibration_data_reader=None,  # ranges come from the cache written by ``calibrate``
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(config.op_types) if config.op_types else _op_types(),
        per_channel=config.per_channel,
        activation_type=QuantType.QInt8 if config.symmetric_activations else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude),
        calibrate_method=_calibration_method(config.method),
        extra_options={
            "ActivationSymmetric": config.symmetric_activations,
            "WeightSymmetric": True,
            # TensorRT wants float biases (it folds them itself); int32 bias DQ is an ORT CPU form.
            "QuantizeBias": config.target == "cpu",
        },
        calibration_cache_path=str(cache),
    )


def _ranges(pre: Path, reader: object, config: QuantizeConfig, tmp: Path) -> Path:
    if config.calibration_cache is not None and Path(config.calibration_cache).is_file():
        log.info("reusing calibration ranges from %s", config.calibration_cache)
        return Path(config.calibration_cache)
    return calibrate(pre, reader, config, Path(config.calibration_cache or tmp / "ranges.json"))


def _count_quantized(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path)).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_out for i in n.input))


def quantize_int8(fp32_onnx: Path, out_path: Path, reader: object, config: QuantizeConfig | None = None) -> QuantizeResult:
    """Write the INT8 QDQ model; ``reader`` is a CalibrationDataReader (``DicomCalibrationReader``)."""
    config = config or QuantizeConfig()
    start = time.perf_counter()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ctlesion-quant-") as tmp:
        pre = preprocess_model(Path(fp32_onnx), Path(tmp) / "pre.onnx")
        exclude = sorted(set(nodes_matching(pre, config.keep_float)) | set(config.nodes_to_exclude))
        log.info("quantizing %s (%s calibration), %d nodes kept in float", fp32_onnx, config.method, len(exclude))
        _quantize(pre, out_path, _ranges(pre, reader, config, Path(tmp)), config, exclude)
    from ctlesion_export.onnx_export import copy_scale_metadata

    copy_scale_metadata(Path(fp32_onnx), out_path)  # the INT8 model preprocesses at the same scale
    return QuantizeResult(
        path=out_path,
        method=config.method,
        calibration_slices=len(reader) if hasattr(reader, "__len__") else -1,  # type: ignore[arg-type]
        excluded_nodes=exclude,
        quantized_nodes=_count_quantized(out_path),
        seconds=time.perf_counter() - start,
    )


def layer_groups(onnx_path: Path, depth: int = 3, exclude: Sequence[str] = ()) -> dict[str, list[str]]:
    """Weighted (quantizable) nodes grouped by the first ``depth`` parts of their name (module path)."""
    import onnx

    skip = set(exclude)
    groups: dict[str, list[str]] = {}
    for n in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        if n.op_type in QUANTIZABLE_WEIGHTED and n.name not in skip:
            key = "/".join(n.name.split("/")[: depth + 1]) or n.name
            groups.setdefault(key, []).append(n.name)
    return groups


def sensitivity_sweep(
    fp32_onnx: Path,
    reader: object,
    eval_images: np.ndarray,
    config: QuantizeConfig | None = None,
    depth: int = 3,
    max_groups: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Rank layer groups by the output error removed when that group alone stays float.

    Calibration runs once (tensor ranges cached in a JSON file) and every variant reuses it, so the
    cost is one quantize + one evaluation per group.
    """
    from tqdm import tqdm

    from ctlesion_export.accuracy import output_error, run, session

    config = config or QuantizeConfig()
    size = int(eval_images.shape[-1])
    with tempfile.TemporaryDirectory(prefix="ctlesion-sweep-") as tmp:
        tmpd = Path(tmp)
        pre = preprocess_model(Path(fp32_onnx), tmpd / "pre.onnx")
        cache = _ranges(pre, reader, config, tmpd)
        base_exclude = sorted(set(nodes_matching(pre, config.keep_float)) | set(config.nodes_to_exclude))
        ref = run(session(pre), eval_images)

        def error(exclude: Sequence[str]) -> float:
            out = tmpd / "q.onnx"
            _quantize(pre, out, cache, config, exclude)
            return output_error(ref, run(session(out), eval_images)).scalar(size)

        result = SweepResult(baseline_error=error(base_exclude), fp32_size=size)
        groups = list(layer_groups(pre, depth, base_exclude).items())[: max_groups or None]
        for name, nodes in tqdm(groups, desc="sensitivity", unit="group", disable=not progress):
            err = error(base_exclude + nodes)
            result.layers.append(LayerSensitivity(name, nodes, err, result.baseline_error - err))
    return result
