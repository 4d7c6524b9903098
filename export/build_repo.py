"""Write a runnable Triton model repository for one deployment target.

Targets
  cpu       the embedded default: detector = Python model running onnxruntime in-process (fp32 or int8)
  gpu-onnx  detector = Triton's onnxruntime backend on the GPU (optionally TensorRT EP, fp16 / int8)
  gpu-trt   detector = tensorrt_plan engine(s), one per GPU compute capability, built from the
            uint8-input ONNX the config declares (``--onnx`` is that ONNX: ``ctlesion build-engine
            --cast-uint8-input`` writes it beside the plan)
  gpu-torch detector = Python model running the checkpoint in torch (fp16 CUDA graphs per batch
            bucket; fp32 on the CPU where no CUDA is seen): served by the pytriton wheel's
            tritonserver on a GPU node without the NGC image; pre / post instances from ``--cores``

Every config.pbtxt is built as Triton's own ``ModelConfig`` protobuf (from tritonclient), so a
config that does not fit Triton's schema cannot be written. Tensor shapes come from the ONNX model
and from ``preprocess_backend`` (the meta tensors that cross from preprocess to postprocess), and
the builder refuses a model whose input does not match the preprocess configuration. After writing,
every model's tensors are compared with its config (``ctlesion_export.repo_check``); a repository
that Triton would refuse to load is removed and the build fails with the mismatches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ctlesion_export.onnx_export import OnnxModelInfo, inspect_onnx
from ctlesion_export.repo_check import MANIFEST_SUFFIX, CheckReport, IOMismatch, check_repository
from preprocess_backend.contract import ModelContract
from preprocess_backend.types import Limits, mm_or_none

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = REPO_ROOT / "model_repository"
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "ctlesion_damoyolo.pt"
TARGETS = ("cpu", "gpu-onnx", "gpu-trt", "gpu-torch")
ENSEMBLE = "lesion_detection"

_DTYPES = {
    "uint8": mc.TYPE_UINT8,
    "int16": mc.TYPE_INT16,
    "int32": mc.TYPE_INT32,
    "float16": mc.TYPE_FP16,
    "float32": mc.TYPE_FP32,
    "bytes": mc.TYPE_STRING,
}


MODEL_SCALE = "model"  # RepoConfig.pixel_mm / context_mm: take the detector's own training scale


def scale_arg(text: str) -> float | str | None:
    """--pixel-mm / --context-mm: a length in mm, "none", or "model" (the detector's training scale)."""
    return MODEL_SCALE if text.strip().lower() == MODEL_SCALE else mm_or_none(text)


def resolve_scale(cfg: RepoConfig, info: OnnxModelInfo) -> RepoConfig:
    """``cfg`` with "model" replaced by the detector's training scale; a different explicit scale is
    allowed (an experiment) but logged, since the detector then sees another scale than it learned."""
    out = replace(
        cfg,
        pixel_mm=info.pixel_mm if cfg.pixel_mm == MODEL_SCALE else cfg.pixel_mm,
        context_mm=info.context_mm if cfg.context_mm == MODEL_SCALE else cfg.context_mm,
    )
    if (out.pixel_mm, out.context_mm) != (info.pixel_mm, info.context_mm):
        log.warning("serving at pixel_mm=%s, context_mm=%s; the detector was trained at %s, %s",
                    out.pixel_mm, out.context_mm, info.pixel_mm, info.context_mm)  # fmt: skip
    return out


@dataclass
class RepoConfig:
    """Everything that shapes the repository; its hash decides whether a rebuild is needed."""

    target: str = "cpu"
    max_batch_size: int = 64  # two client slabs (30 owned + 2 halo, client.slabs.RequestShape) merge into one batch
    queue_delay_us: int = 2000
    detector_instances: int = 1
    preprocess_instances: int = 2
    postprocess_instances: int = 1
    intra_op_threads: int = 0
    fpr_intra_op_threads: int = 1  # the CPU FPR classifier's onnxruntime threads (ctlesion_export.fpr_repo)
    # onnxruntime's memory pattern caches one planned block per input shape on top of the arena: with
    # the batcher's varying batch sizes it held 1.77 GiB vs 1.04 GiB at the same speed (docs/reliability.md)
    ort_mem_pattern: bool = False
    # the arena grows to the largest single run: batches the batcher merges (up to max_batch_size) run
    # in pieces of at most this many slices, 434 vs 1035 MiB at the same speed (bench_ort_memory); 0 = whole
    ort_max_run_batch: int = 8
    window: str = "lung"
    # physical scale of the detector's input (preprocess_backend Options.pixel_mm / context_mm): one
    # pixel size in mm and the 2.5D plane offset in mm; None: letterbox the matrix / neighbour slices;
    # "model": the scale the detector was trained at (its ONNX metadata / checkpoint meta)
    pixel_mm: float | str | None = MODEL_SCALE
    context_mm: float | str | None = MODEL_SCALE
    score_threshold: float = 0.3
    nms_iou: float = 0.2
    min_size_mm: float = 1.5  # per-slice box bounds; the 3-30 mm rule is on 3D lesions (client)
    max_size_mm: float = 100.0
    max_detections: int = 100
    trt_precision: str = "fp16"  # gpu-onnx with TensorRT EP: fp16 | int8 | none
    # gpu-torch: where the torch detector runs, its precision, CUDA graphs, and the node's cores that
    # the preprocess / postprocess instances are scaled to (0: keep the *_instances counts above)
    torch_device: str = "auto"  # auto | cuda | cpu
    torch_fp16: str = "auto"  # auto (fp16 on CUDA) | true | false
    torch_cuda_graphs: bool = True
    torch_threads: int = 0  # CPU fallback: torch intra-op threads (0 = torch's default)
    # Triton instance kind of the torch detector: auto = GPU when it runs on CUDA; cpu keeps a CPU
    # instance whose torch still uses CUDA (device), should a server refuse GPU Python instances
    torch_instance_kind: str = "auto"  # auto | gpu | cpu
    cores: int = 0
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


def _mm_text(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _instance(config: mc.ModelConfig, count: int, gpu: bool) -> None:
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=count)


def preprocess_config(info: OnnxModelInfo, cfg: RepoConfig) -> mc.ModelConfig:
    config = mc.ModelConfig(name="preprocess", backend="python", max_batch_size=0)
    _add_io(config.input, [TensorSpec("dicom", "bytes", (-1,)), *(s for s in OPTION_INPUTS if s.name in PREPROCESS_OPTIONS)])
    _add_io(config.output, [TensorSpec("images", "uint8", (-1, info.channels, info.height, info.width)), *slab_meta_specs()])
    _instance(config, cfg.preprocess_instances, gpu=False)
    _params(config, {"model_size": info.height, "context_slices": info.channels, "window": cfg.window})
    _params(config, {"pixel_mm": _mm_text(cfg.pixel_mm), "context_mm": _mm_text(cfg.context_mm)})
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
    elif cfg.target == "gpu-torch":
        from ctlesion_export.torch_serving import buckets_up_to

        config = mc.ModelConfig(name="detector", backend="python", max_batch_size=cfg.max_batch_size)
        _params(config, {"checkpoint": TORCH_CHECKPOINT, "device": cfg.torch_device, "fp16": cfg.torch_fp16,
                         "cuda_graphs": str(cfg.torch_cuda_graphs).lower(), "threads": cfg.torch_threads,
                         "buckets": ",".join(str(b) for b in buckets_up_to(cfg.max_batch_size))})  # fmt: skip
    else:
        config = mc.ModelConfig(name="detector", platform="tensorrt_plan", max_batch_size=cfg.max_batch_size)
    _add_io(config.input, [TensorSpec("images", "uint8", (info.channels, info.height, info.width))])
    _add_io(config.output, [TensorSpec("scores", "float32", (anchors, classes)), TensorSpec("boxes", "float32", (anchors, 4))])
    config.dynamic_batching.max_queue_delay_microseconds = cfg.queue_delay_us
    gpu = torch_on_cuda(cfg) if cfg.target == "gpu-torch" else cfg.target != "cpu"
    _instance(config, cfg.detector_instances, gpu=gpu)
    return config


TORCH_CHECKPOINT = "model.pt"
# Per-slice CPU cost of preprocess : postprocess, which the node's cores are split by (issue 16's
# targets, 1.5 ms and 0.5 ms a slice; `python -m ctlesion_bench.bench_preprocess` prints both).
PRE_POST_COST = (3, 1)


def torch_on_cuda(cfg: RepoConfig) -> bool:
    """gpu-torch: a GPU instance when the torch detector runs on CUDA (auto: torch sees a GPU here)."""
    if cfg.torch_instance_kind != "auto":
        return cfg.torch_instance_kind == "gpu"
    if cfg.torch_device == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return cfg.torch_device.startswith("cuda")


def scale_pre_post(cores: int) -> tuple[int, int]:
    """(preprocess, postprocess) instances for a node's cores: one core is left to the server and the
    detector's stub (the GPU does the detector's work), the rest split by ``PRE_POST_COST``."""
    usable = max(2, cores - 1)
    pre = min(usable - 1, max(1, round(usable * PRE_POST_COST[0] / sum(PRE_POST_COST))))
    return pre, usable - pre


def gpu_torch_defaults(cores: int) -> dict[str, int]:
    """gpu-torch's instance defaults for a node of ``cores`` cores, measured on the H200 node
    (bench/RESULTS.md § GPU, 2026-12-04): two detector instances let one copy its 50 MB batch through
    the Python backend's shared memory while the other runs (locust 765 -> 1559 slices/s), and the
    FPR classifier, where it runs on the CPU (onnxruntime, or torch without CUDA), gets a quarter of
    the cores (its queue was the series' last step)."""
    return {"detector_instances": 2, "fpr_intra_op_threads": max(1, cores // 4)}


def effective_config(cfg: RepoConfig) -> RepoConfig:
    """``cfg`` with gpu-torch's pre / post instances scaled to ``cfg.cores`` (when > 0)."""
    if cfg.target != "gpu-torch" or cfg.cores <= 0:
        return cfg
    pre, post = scale_pre_post(cfg.cores)
    return replace(cfg, preprocess_instances=pre, postprocess_instances=post)


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


def build_repository(
    onnx_path: Path | None, out: Path, cfg: RepoConfig, engines: list[Path] | None = None, fpr_onnx: Path | None = None,
    checkpoint: Path | None = None,
) -> Path:
    """Write the repository; ``fpr_onnx`` adds the 3D false-positive-reduction models (export/fpr_repo.py).

    gpu-trt: ``onnx_path`` is the (uint8-input) ONNX the ``engines`` were built from. gpu-torch:
    ``checkpoint`` is what the detector serves (its shapes from ``onnx_path`` when given, else from a
    probe run of the checkpoint: a GPU node needs no ONNX exporter for this target).
    """
    cfg = effective_config(cfg)
    if cfg.target == "gpu-torch" and (checkpoint is None or not Path(checkpoint).is_file()):
        raise ValueError(f"target gpu-torch needs the checkpoint it serves (--checkpoint), got {checkpoint}")
    if onnx_path is None:
        if cfg.target != "gpu-torch":
            raise ValueError(f"target {cfg.target} needs the detector ONNX")
        from ctlesion_export.torch_serving import model_info

        info = model_info(Path(checkpoint))  # type: ignore[arg-type]
    else:
        info = inspect_onnx(onnx_path)
    check_consistency(info, cfg)
    cfg = resolve_scale(cfg, info)
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
    elif cfg.target == "gpu-torch":
        _copy_python_model("detector_torch", det_dir)
        shutil.copy2(checkpoint, det_dir / "1" / TORCH_CHECKPOINT)  # type: ignore[arg-type]
    else:
        if not engines:
            raise ValueError("target gpu-trt needs --engine (built with `ctlesion build-engine` on the serving GPU)")
        for engine in engines:
            shutil.copy2(engine, det_dir / "1" / engine.name)
            manifest = engine.with_name(engine.name + MANIFEST_SUFFIX)  # build-engine's record of its tensors
            if manifest.is_file():
                shutil.copy2(manifest, det_dir / "1" / manifest.name)
            cc = _compute_capability_from_name(engine.name)
            if cc:
                config.cc_model_filenames[cc] = engine.name
        config.default_model_filename = engines[0].name
    _write_config(det_dir, config)
    _write_config(out / ENSEMBLE, ensemble_config(info))
    (out / ENSEMBLE / "1").mkdir(exist_ok=True)
    if fpr_onnx is not None:
        from ctlesion_export.fpr_repo import add_fpr_models, checkpoint_of

        # gpu-torch: the classifier in torch beside the detector, when the FPR ONNX's checkpoint is known
        torch_fpr = checkpoint_of(Path(fpr_onnx)) if cfg.target == "gpu-torch" else None
        if cfg.target == "gpu-torch" and torch_fpr is None:
            log.warning("FPR ONNX %s is not the export of the committed checkpoint: its classifier runs in onnxruntime on the CPU", fpr_onnx)
        add_fpr_models(out, Path(fpr_onnx), cfg.target, cfg.limits, cube_instances=cfg.preprocess_instances,
                       classifier_threads=cfg.fpr_intra_op_threads, torch_checkpoint=torch_fpr,
                       torch_kind="gpu" if torch_on_cuda(cfg) else "cpu")
    report = check_io(out, cfg, onnx_path)
    (out / "BUILD.json").write_text(
        json.dumps({"onnx": str(onnx_path), "fpr_onnx": None if fpr_onnx is None else str(fpr_onnx), "model": asdict_info(info), "config": asdict(cfg),
                    "io_check": asdict(report)}, indent=2)  # fmt: skip
    )
    return out


def check_io(out: Path, cfg: RepoConfig, onnx_path: Path | None) -> CheckReport:
    """Every model's tensors against its config; a repository Triton would refuse is removed."""
    from ctlesion_export.torch_serving import probe_signature

    try:
        report = check_repository(out, engine_source_onnx=onnx_path if cfg.target == "gpu-trt" else None,
                                  torch_probe=probe_signature)  # fmt: skip
    except IOMismatch as exc:
        shutil.rmtree(out, ignore_errors=True)
        if cfg.target != "gpu-trt":
            raise
        raise IOMismatch([*exc.problems, "gpu-trt: build the engines from the uint8-input ONNX the config declares "
                          "(`ctlesion build-engine --cast-uint8-input`) and pass that ONNX as --onnx"]) from None  # fmt: skip
    for line in report.skipped:
        log.warning("I/O check skipped: %s", line)
    return report


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
    parser.add_argument("--max-batch-size", type=int, default=64,
                        help="detector batch; the client sizes slabs so two requests merge into one (default %(default)s)")
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument("--detector-instances", type=int, default=None,
                        help="detector instances (default: 1; gpu-torch: 2, see gpu_torch_defaults)")
    parser.add_argument("--preprocess-instances", type=int, default=2)
    parser.add_argument("--postprocess-instances", type=int, default=1)
    parser.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads (cpu target; 0 = all cores)")
    parser.add_argument("--fpr-intra-op-threads", type=int, default=None,
                        help="onnxruntime threads of the FPR classifier (cpu and gpu-torch targets; 0 = all "
                             "cores; default: 1, on gpu-torch a quarter of --cores)")
    parser.add_argument("--ort-mem-pattern", action="store_true",
                        help="cpu target: enable onnxruntime's memory pattern (more memory, no faster here)")  # fmt: skip
    parser.add_argument("--ort-max-run-batch", type=int, default=8, metavar="N",
                        help="cpu target: run merged batches in pieces of at most N slices, bounding "
                             "onnxruntime's arena (0 = whole batch; default %(default)s)")  # fmt: skip
    parser.add_argument("--trt-precision", choices=("fp16", "int8", "none"), default="fp16")
    parser.add_argument("--precision", choices=("int8", "fp32"), default="int8",
                        help="cpu target, detector exported from --checkpoint: the calibrated INT8 model (default; "
                             "FP32's accuracy at 2.4x its speed, models/MODEL_CARD.md) or FP32; --onnx is served as given")  # fmt: skip
    torch_group = parser.add_argument_group("gpu-torch (the detector in torch inside tritonserver's Python backend)")
    torch_group.add_argument("--cores", type=int, default=None, metavar="N",
                             help="the node's cores the preprocess / postprocess instances are scaled to "
                                  "(default: os.cpu_count() here; 0: use --preprocess/--postprocess-instances)")  # fmt: skip
    torch_group.add_argument("--torch-device", default="auto", help="auto (CUDA when torch sees it) | cuda | cpu")
    torch_group.add_argument("--torch-fp16", choices=("auto", "true", "false"), default="auto",
                             help="auto: fp16 on CUDA, fp32 on the CPU")  # fmt: skip
    torch_group.add_argument("--no-cuda-graphs", action="store_true", help="run eagerly on CUDA (no graph capture)")
    torch_group.add_argument("--torch-threads", type=int, default=0, help="CPU fallback: torch threads (0 = default)")
    torch_group.add_argument("--torch-instance-kind", choices=("auto", "gpu", "cpu"), default="auto",
                             help="Triton instance kind of the torch detector (auto: gpu when it runs on CUDA)")  # fmt: skip
    parser.add_argument("--window", default="lung")
    parser.add_argument("--pixel-mm", type=scale_arg, default=MODEL_SCALE,
                        help="detector pixel size in mm, 'none' to letterbox the matrix (default: the detector's training scale)")
    parser.add_argument("--context-mm", type=scale_arg, default=MODEL_SCALE,
                        help="2.5D plane offset in mm, 'none' for neighbouring slices (default: the detector's training scale)")
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--nms-iou", type=float, default=0.2)
    parser.add_argument("--if-stale", action="store_true", help="skip when inputs and settings are unchanged")
    parser.add_argument("--fpr-onnx", type=Path, default=None,
                        help="3D false-positive-reduction ONNX served as lesion_fpr (default: exported from models/ctlesion_fpr.pt)")  # fmt: skip
    parser.add_argument("--no-fpr", action="store_true", help="serve the detector ensemble without the FPR models")
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
    cores = (os.cpu_count() or 1) if args.cores is None else args.cores
    target_defaults = gpu_torch_defaults(cores) if args.target == "gpu-torch" else {}
    for name in ("detector_instances", "fpr_intra_op_threads"):
        if getattr(args, name) is None:
            setattr(args, name, target_defaults.get(name, 1))
    cfg = RepoConfig(
        target=args.target,
        max_batch_size=args.max_batch_size,
        queue_delay_us=args.queue_delay_us,
        detector_instances=args.detector_instances,
        preprocess_instances=args.preprocess_instances,
        postprocess_instances=args.postprocess_instances,
        intra_op_threads=args.intra_op_threads,
        fpr_intra_op_threads=args.fpr_intra_op_threads,
        ort_mem_pattern=args.ort_mem_pattern,
        ort_max_run_batch=args.ort_max_run_batch,
        trt_precision=args.trt_precision,
        window=args.window,
        pixel_mm=args.pixel_mm,
        context_mm=args.context_mm,
        score_threshold=args.score_threshold,
        nms_iou=args.nms_iou,
        limits=Limits(**{spec.name: getattr(args, f"limit_{spec.name}") for spec in fields(Limits)}),
        torch_device=args.torch_device,
        torch_fp16=args.torch_fp16,
        torch_cuda_graphs=not args.no_cuda_graphs,
        torch_threads=args.torch_threads,
        torch_instance_kind=args.torch_instance_kind,
        cores=cores,
    )
    gpu_torch = args.target == "gpu-torch"
    try:
        onnx_path = args.onnx
        sources = sorted(SOURCES.glob("*/1/model.py")) + [Path(__file__)]
        if gpu_torch:  # the checkpoint itself is served; its bytes decide staleness
            sources.append(args.checkpoint)
        if onnx_path is None and not gpu_torch:
            from ctlesion_export.cli import export_checkpoint

            onnx_path = REPO_ROOT / "work" / "onnx" / (args.checkpoint.stem + ".onnx")
            export_if_changed(args.checkpoint, onnx_path, export_checkpoint)
            if args.target == "cpu" and args.precision == "int8":  # the CPU default: export/int8_default.py says why
                from ctlesion_export.int8_default import ensure_cpu_int8

                onnx_path = ensure_cpu_int8(onnx_path, REPO_ROOT / "work" / "phantoms")
        from ctlesion_export.fpr_repo import default_fpr_onnx

        fpr_onnx = None if args.no_fpr else (args.fpr_onnx or default_fpr_onnx())
        if fpr_onnx is not None and not fpr_onnx.exists():
            raise FileNotFoundError(f"FPR model {fpr_onnx} not found (train one with python -m ctlesion_fpr.train, or --no-fpr)")
        stamp = args.out / ".fingerprint"
        fp = fingerprint([*([onnx_path] if onnx_path else []), *sources, *(args.engine or []), *([fpr_onnx] if fpr_onnx else [])], cfg)
        if args.if_stale and stamp.exists() and stamp.read_text() == fp:
            print(f"model repository {args.out} is up to date")
            return 0
        build_repository(onnx_path, args.out, cfg, args.engine, fpr_onnx=fpr_onnx, checkpoint=args.checkpoint if gpu_torch else None)
        stamp.write_text(fp)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.target} model repository to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
