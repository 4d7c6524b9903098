"""Write a runnable Triton model repository for one deployment target.

Targets
  cpu       the embedded default: detector = Python model running onnxruntime in-process (fp32 or int8)
  gpu-onnx  detector = Triton's onnxruntime backend on the GPU (optionally TensorRT EP, fp16 / int8)
  gpu-trt   detector = tensorrt_plan engine(s), one per GPU compute capability

Every config.pbtxt is built as Triton's own ``ModelConfig`` protobuf (from tritonclient), so a
config that does not fit Triton's schema cannot be written. Tensor shapes come from the ONNX model
and from ``preprocess_backend`` (the meta tensors that cross from preprocess to postprocess), and
the builder refuses a model whose input does not match the preprocess configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ctlesion_export.onnx_export import OnnxModelInfo, inspect_onnx
from preprocess_backend.contract import ModelContract
from preprocess_backend.types import Limits

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = REPO_ROOT / "model_repository"
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "ctlesion_damoyolo.pt"
TARGETS = ("cpu", "gpu-onnx", "gpu-trt")
ENSEMBLE = "lesion_detection"

_DTYPES = {
    "uint8": mc.TYPE_UINT8,
    "int16": mc.TYPE_INT16,
    "int32": mc.TYPE_INT32,
    "float16": mc.TYPE_FP16,
    "float32": mc.TYPE_FP32,
    "bytes": mc.TYPE_STRING,
}


@dataclass
class RepoConfig:
    """Everything that shapes the repository; its hash decides whether a rebuild is needed."""

    target: str = "cpu"
    max_batch_size: int = 32
    queue_delay_us: int = 2000
    detector_instances: int = 1
    preprocess_instances: int = 2
    postprocess_instances: int = 1
    intra_op_threads: int = 0
    # onnxruntime's memory pattern caches one planned block per input shape on top of the arena: with
    # the batcher's varying batch sizes it held 1.77 GiB vs 1.04 GiB at the same speed (docs/reliability.md)
    ort_mem_pattern: bool = False
    # the arena grows to the largest single run: batches the batcher merges (up to max_batch_size) run
    # in pieces of at most this many slices, 434 vs 1035 MiB at the same speed (bench_ort_memory); 0 = whole
    ort_max_run_batch: int = 8
    window: str = "lung"
    score_threshold: float = 0.3
    nms_iou: float = 0.2
    min_size_mm: float = 3.0
    max_size_mm: float = 30.0
    max_detections: int = 100
    trt_precision: str = "fp16"  # gpu-onnx with TensorRT EP: fp16 | int8 | none
    # request refusal thresholds, written as the preprocess model's limit_* parameters
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False


# Optional request options of the ensemble; the defaults live in the step models' parameters.
OPTION_INPUTS = (
    TensorSpec("window", "bytes", (1,), optional=True),
    TensorSpec("score_threshold", "float32", (1,), optional=True),
    TensorSpec("nms_iou", "float32", (1,), optional=True),
    TensorSpec("min_size_mm", "float32", (1,), optional=True),
    TensorSpec("max_size_mm", "float32", (1,), optional=True),
)
PREPROCESS_OPTIONS = ("window",)
POSTPROCESS_OPTIONS = ("score_threshold", "nms_iou", "min_size_mm", "max_size_mm")

def finding_specs() -> tuple[TensorSpec, ...]:
    """The ensemble's per-detection outputs (defined by preprocess_backend, docs/contracts.md)."""
    from preprocess_backend.pipeline import FINDING_TENSORS

    return tuple(TensorSpec(name, dtype, tuple(dims)) for name, dtype, dims in FINDING_TENSORS)


def slab_meta_specs() -> tuple[TensorSpec, ...]:
    """The small per-slice tensors that preprocess hands to postprocess (defined by preprocess_backend)."""
    from preprocess_backend.pipeline import SLAB_META_TENSORS

    return tuple(TensorSpec(name, dtype, tuple(dims)) for name, dtype, dims in SLAB_META_TENSORS)


def _add_io(container: object, specs: tuple[TensorSpec, ...] | list[TensorSpec]) -> None:
    for spec in specs:
        tensor = container.add(name=spec.name, data_type=_DTYPES[spec.dtype], dims=list(spec.dims))  # type: ignore[attr-defined]
        if spec.optional:
            tensor.optional = True


def _params(config: mc.ModelConfig, values: dict[str, object]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def _instance(config: mc.ModelConfig, count: int, gpu: bool) -> None:
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=count)


def preprocess_config(info: OnnxModelInfo, cfg: RepoConfig) -> mc.ModelConfig:
    config = mc.ModelConfig(name="preprocess", backend="python", max_batch_size=0)
    _add_io(config.input, [TensorSpec("dicom", "bytes", (-1,)), *(s for s in OPTION_INPUTS if s.name in PREPROCESS_OPTIONS)])
    _add_io(config.output, [TensorSpec("images", "uint8", (-1, info.channels, info.height, info.width)), *slab_meta_specs()])
    _instance(config, cfg.preprocess_instances, gpu=False)
    _params(config, {"model_size": info.height, "context_slices": info.channels, "window": cfg.window})
    # Every limit is written, defaults included, so the deployed config shows what is enforced.
    _params(config, {f"limit_{key}": value for key, value in asdict(cfg.limits).items()})
    # The model's input contract (preprocess_backend.contract): what it reads, enforced per item.
    _params(config, ModelContract(window=cfg.window).to_params())
    return config


def detector_config(info: OnnxModelInfo, cfg: RepoConfig) -> mc.ModelConfig:
    anchors, classes = info.num_anchors, info.num_classes
    if cfg.target == "cpu":
        config = mc.ModelConfig(name="detector", backend="python", max_batch_size=cfg.max_batch_size)
        _params(config, {"onnx_file": "model.onnx", "intra_op_threads": cfg.intra_op_threads,
                         "mem_pattern": str(cfg.ort_mem_pattern).lower(),
                         "max_run_batch": cfg.ort_max_run_batch})  # fmt: skip
    elif cfg.target == "gpu-onnx":
        config = mc.ModelConfig(name="detector", platform="onnxruntime_onnx", max_batch_size=cfg.max_batch_size)
        if cfg.trt_precision != "none":
            accel = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            accel.parameters["precision_mode"] = "INT8" if cfg.trt_precision == "int8" else "FP16"
            accel.parameters["max_workspace_size_bytes"] = str(2 << 30)
            accel.parameters["trt_engine_cache_enable"] = "1"
            accel.parameters["trt_engine_cache_path"] = "/tmp/trt_cache"
    else:
        config = mc.ModelConfig(name="detector", platform="tensorrt_plan", max_batch_size=cfg.max_batch_size)
    _add_io(config.input, [TensorSpec("images", "uint8", (info.channels, info.height, info.width))])
    _add_io(config.output, [TensorSpec("scores", "float32", (anchors, classes)), TensorSpec("boxes", "float32", (anchors, 4))])
    config.dynamic_batching.max_queue_delay_microseconds = cfg.queue_delay_us
    _instance(config, cfg.detector_instances, gpu=cfg.target != "cpu")
    return config


def postprocess_config(info: OnnxModelInfo, cfg: RepoConfig) -> mc.ModelConfig:
    config = mc.ModelConfig(name="postprocess", backend="python", max_batch_size=0)
    _add_io(
        config.input,
        [
            TensorSpec("scores", "float32", (-1, info.num_anchors, info.num_classes)),
            TensorSpec("boxes", "float32", (-1, info.num_anchors, 4)),
            *slab_meta_specs(),
            *(s for s in OPTION_INPUTS if s.name in POSTPROCESS_OPTIONS),
        ],
    )
    _add_io(config.output, finding_specs())
    _instance(config, cfg.postprocess_instances, gpu=False)
    _params(
        config,
        {
            "score_threshold": cfg.score_threshold,
            "nms_iou": cfg.nms_iou,
            "min_size_mm": cfg.min_size_mm,
            "max_size_mm": cfg.max_size_mm,
            "max_detections": cfg.max_detections,
        },
    )
    return config


def ensemble_config(info: OnnxModelInfo) -> mc.ModelConfig:
    config = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=0)
    _add_io(config.input, [TensorSpec("dicom", "bytes", (-1,)), *OPTION_INPUTS])
    _add_io(config.output, finding_specs())
    meta = [s.name for s in slab_meta_specs()]
    steps = config.ensemble_scheduling.step
    pre = steps.add(model_name="preprocess", model_version=-1)
    pre.input_map["dicom"] = "dicom"
    for name in PREPROCESS_OPTIONS:
        pre.input_map[name] = name
    pre.output_map["images"] = "images"
    for name in meta:
        pre.output_map[name] = name
    det = steps.add(model_name="detector", model_version=-1)
    det.input_map["images"] = "images"
    det.output_map["scores"] = "raw_scores"
    det.output_map["boxes"] = "raw_boxes"
    post = steps.add(model_name="postprocess", model_version=-1)
    post.input_map["scores"] = "raw_scores"
    post.input_map["boxes"] = "raw_boxes"
    for name in [*meta, *POSTPROCESS_OPTIONS]:
        post.input_map[name] = name
    for spec in finding_specs():
        post.output_map[spec.name] = spec.name
    return config


def check_consistency(info: OnnxModelInfo, cfg: RepoConfig) -> None:
    """Refuse combinations that would load but answer wrongly."""
    if cfg.target not in TARGETS:
        raise ValueError(f"unknown target {cfg.target!r}; choose one of {', '.join(TARGETS)}")
    if info.height != info.width:
        raise ValueError(f"{info.path}: input must be square (the letterbox is square), got {info.height}x{info.width}")
    if info.height % 32:
        raise ValueError(f"{info.path}: input size {info.height} is not a multiple of 32")
    if info.channels not in (1, 3, 5):
        raise ValueError(f"{info.path}: {info.channels} input channels; 2.5D context must be 1, 3 or 5 slices")
    if info.num_anchors <= 0 or info.num_classes <= 0:
        raise ValueError(f"{info.path}: outputs need static anchor and class dims, got scores [N, {info.num_anchors}, {info.num_classes}]")
    if cfg.max_batch_size < 1:
        raise ValueError("max batch size must be at least 1")


def _write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))


def _copy_python_model(name: str, out: Path) -> None:
    source = SOURCES / name / "1" / "model.py"
    target = out / "1" / "model.py"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def serving_onnx_with_uint8_input(src: Path, dst: Path) -> None:
    """Copy of the detector whose input is uint8, cast to float inside the graph (GPU targets)."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(src))
    graph = proto.graph
    old = graph.input[0]
    float_name = f"{old.name}_float"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old.name:
                node.input[i] = float_name
    old.type.tensor_type.elem_type = TensorProto.UINT8
    graph.node.insert(0, helper.make_node("Cast", [old.name], [float_name], to=TensorProto.FLOAT, name="cast_uint8_input"))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dst))


def build_repository(onnx_path: Path, out: Path, cfg: RepoConfig, engines: list[Path] | None = None) -> Path:
    info = inspect_onnx(onnx_path)
    check_consistency(info, cfg)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _write_config(out / "preprocess", preprocess_config(info, cfg))
    _copy_python_model("preprocess", out / "preprocess")
    _write_config(out / "postprocess", postprocess_config(info, cfg))
    _copy_python_model("postprocess", out / "postprocess")
    det_dir = out / "detector"
    config = detector_config(info, cfg)
    (det_dir / "1").mkdir(parents=True)
    if cfg.target == "cpu":
        _copy_python_model("detector_onnxruntime", det_dir)
        shutil.copy2(onnx_path, det_dir / "1" / "model.onnx")
    elif cfg.target == "gpu-onnx":
        serving_onnx_with_uint8_input(onnx_path, det_dir / "1" / "model.onnx")
    else:
        if not engines:
            raise ValueError("target gpu-trt needs --engine (built with `ctlesion build-engine` on the serving GPU)")
        for engine in engines:
            shutil.copy2(engine, det_dir / "1" / engine.name)
            cc = _compute_capability_from_name(engine.name)
            if cc:
                config.cc_model_filenames[cc] = engine.name
        config.default_model_filename = engines[0].name
    _write_config(det_dir, config)
    _write_config(out / ENSEMBLE, ensemble_config(info))
    (out / ENSEMBLE / "1").mkdir(exist_ok=True)
    (out / "BUILD.json").write_text(
        json.dumps({"onnx": str(onnx_path), "model": asdict_info(info), "config": asdict(cfg)}, indent=2)
    )
    return out


def asdict_info(info: OnnxModelInfo) -> dict[str, object]:
    data = asdict(info)
    data["path"] = str(info.path)
    return data


def _compute_capability_from_name(name: str) -> str | None:
    # Engines are named detector_sm<major><minor>_trt<version>.plan by ctlesion build-engine.
    for part in name.split("_"):
        if part.startswith("sm") and part[2:].isdigit() and len(part) >= 4:
            return f"{part[2:-1]}.{part[-1]}"
    return None


def export_if_changed(checkpoint: Path, onnx_path: Path, export: Callable[[Path, Path], object]) -> bool:
    """Export ``checkpoint`` to ``onnx_path`` unless that ONNX was made from these very bytes.

    Decided by content (sha256 kept beside the ONNX), not by modification times: a checkpoint
    replaced by ``cp``, ``git checkout`` or a download can carry any mtime. True when it exported.
    """
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    source = onnx_path.with_name(onnx_path.name + ".source")
    if onnx_path.exists() and source.exists() and source.read_text() == digest:
        return False
    export(checkpoint, onnx_path)
    source.write_text(digest)
    return True


def fingerprint(paths: list[Path], cfg: RepoConfig) -> str:
    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


_SIZE_UNITS = {"k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def parse_count(text: str) -> int:
    """A positive integer, optionally with a unit: 4096, 512MiB, 2GiB, 64k, 8192x8192."""
    raw = text.strip().lower().removesuffix("b")
    if "x" in raw:  # rows x columns for pixel limits
        parts = [parse_count(part) for part in raw.split("x")]
        value = 1
        for part in parts:
            value *= part
        return value
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if raw.endswith(unit) and raw[: -len(unit)].strip().isdigit():
            value = int(raw[: -len(unit)]) * _SIZE_UNITS[unit]
            break
    else:
        if not raw.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 2048, 512MiB, 8192x8192)")
        value = int(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctlesion build-repo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=TARGETS, default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced)")
    parser.add_argument("--onnx", type=Path, help="detector ONNX (default: exported from --checkpoint)")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="used when --onnx is not given")
    parser.add_argument("--engine", type=Path, action="append", help="TensorRT plan(s) for gpu-trt")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument("--detector-instances", type=int, default=1)
    parser.add_argument("--preprocess-instances", type=int, default=2)
    parser.add_argument("--postprocess-instances", type=int, default=1)
    parser.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads (cpu target; 0 = all cores)")
    parser.add_argument("--ort-mem-pattern", action="store_true",
                        help="cpu target: enable onnxruntime's memory pattern (more memory, no faster here)")  # fmt: skip
    parser.add_argument("--ort-max-run-batch", type=int, default=8, metavar="N",
                        help="cpu target: run merged batches in pieces of at most N slices, bounding "
                             "onnxruntime's arena (0 = whole batch; default %(default)s)")  # fmt: skip
    parser.add_argument("--trt-precision", choices=("fp16", "int8", "none"), default="fp16")
    parser.add_argument("--window", default="lung")
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--nms-iou", type=float, default=0.2)
    parser.add_argument("--if-stale", action="store_true", help="skip when inputs and settings are unchanged")
    limits = parser.add_argument_group(
        "request limits",
        "a request over a limit is refused with INVALID_ARGUMENT before any pixel is decoded; "
        "N takes units and products: 512MiB, 2GiB, 4096x4096",
    )
    for spec in fields(Limits):
        limits.add_argument(
            f"--limit-{spec.name.replace('_', '-')}", dest=f"limit_{spec.name}", type=parse_count,
            default=getattr(Limits(), spec.name), metavar="N", help="default %(default)s",
        )
    args = parser.parse_args(argv)
    if args.ort_max_run_batch < 0:
        parser.error("--ort-max-run-batch must be >= 0 (0 runs each merged batch whole)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg = RepoConfig(
        target=args.target,
        max_batch_size=args.max_batch_size,
        queue_delay_us=args.queue_delay_us,
        detector_instances=args.detector_instances,
        preprocess_instances=args.preprocess_instances,
        postprocess_instances=args.postprocess_instances,
        intra_op_threads=args.intra_op_threads,
        ort_mem_pattern=args.ort_mem_pattern,
        ort_max_run_batch=args.ort_max_run_batch,
        trt_precision=args.trt_precision,
        window=args.window,
        score_threshold=args.score_threshold,
        nms_iou=args.nms_iou,
        limits=Limits(**{spec.name: getattr(args, f"limit_{spec.name}") for spec in fields(Limits)}),
    )
    try:
        onnx_path = args.onnx
        sources = sorted(SOURCES.glob("*/1/model.py")) + [Path(__file__)]
        if onnx_path is None:
            from ctlesion_export.cli import export_checkpoint

            onnx_path = REPO_ROOT / "work" / "onnx" / (args.checkpoint.stem + ".onnx")
            export_if_changed(args.checkpoint, onnx_path, export_checkpoint)
        stamp = args.out / ".fingerprint"
        fp = fingerprint([onnx_path, *sources, *(args.engine or [])], cfg)
        if args.if_stale and stamp.exists() and stamp.read_text() == fp:
            print(f"model repository {args.out} is up to date")
            return 0
        build_repository(onnx_path, args.out, cfg, args.engine)
        stamp.write_text(fp)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.target} model repository to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
