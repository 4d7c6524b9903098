"""`ctlesion build-engine`: ONNX detector -> TensorRT 10 engine (FP16, or INT8 from the QDQ model).

    ctlesion build-engine --onnx detector.onnx --cast-uint8-input --precision fp16 --out engines/ \\
        [--min-batch 1 --opt-batch 8 --max-batch 32] [--timing-cache engines/timing.cache] [--check-dir DICOM_DIR]

What it does
- The engine's input is uint8, as every GPU target's detector config declares (the ensemble hands
  the detector uint8 images). It is built from the uint8-input ONNX that casts to float inside the
  graph (the one gpu-onnx serves). A float-input ONNX is refused, unless ``--cast-uint8-input``: then
  that uint8-input ONNX is written beside the plan (``detector_sm90_trt10.5.onnx``) and built from;
  pass it to ``ctlesion build-repo --target gpu-trt --onnx``, which checks it against the config.
- Beside the plan, ``<plan>.json`` records the source ONNX's sha256 and the engine's own I/O tensors
  as TensorRT reports them after the build; build-repo compares both with the config (also where
  TensorRT is not installed).
- Parses the ONNX file with TensorRT's ONNX parser into an explicit-batch network.
- ``fp16``: FP16 kernels allowed. ``int8``: the input must be the INT8 QDQ model from
  ``ctlesion export --int8 --target tensorrt --int8-out work/export/detector_int8_trt.onnx`` (symmetric
  int8 Q/DQ; the default cpu-target file has uint8 zero-points and is refused) (explicit quantization: the Q/DQ scales come from our calibration on
  DICOM slices); no implicit calibrator is used (deprecated in TensorRT 10.1, removed in 11). FP16 is
  also allowed so the layers kept in float (the head / decode) do not fall back to FP32.
- One optimization profile for the dynamic batch axis: min / opt / max batch; C, H, W from the model.
- A timing cache file, read before and written after the build (it speeds up rebuilds; it is tied to
  GPU, CUDA, TensorRT version and flags, like the engine itself).
- The engine is named ``detector_sm<major><minor>_trt<major>.<minor>.plan`` (for example
  ``detector_sm90_trt10.3.plan``): engines do not move between GPU architectures or TensorRT versions,
  and ``ctlesion build-repo --target gpu-trt`` maps the compute capability in the name to
  ``cc_model_filenames``.
- Check: the engine runs a few slices (from ``--check-dir`` DICOM series through preprocess_backend,
  else seeded random images) and is compared with onnxruntime CPU on the same ONNX file: raw output
  differences and detection agreement after threshold + NMS. Non-zero exit when detections disagree
  beyond ``--min-f1`` (default 0.9 fp16, 0.8 int8).

Where it runs
It needs an NVIDIA GPU, the CUDA driver and the ``tensorrt`` Python package (10.x); device buffers come
from torch CUDA tensors, else from cuda-python. Without them it exits with status 3 and says what is
missing (``tensorrt`` is imported lazily, so the rest of the package works without it).

On a GPU node, with the NGC image whose TensorRT matches the Triton server that will serve the plan
(e.g. Triton 24.08 <-> nvcr.io/nvidia/tensorrt:24.08-py3, TensorRT 10.3; check NGC's support matrix):

    docker run --rm --gpus all -v $PWD:/work -w /work nvcr.io/nvidia/tensorrt:24.08-py3 bash -c \\
      'pip install -e . --no-deps && pip install numpy==1.26.4 pydicom==3.0.2 scipy onnx onnxruntime tqdm && \\
       python -m ctlesion_export.tensorrt_engine --onnx work/export/detector_int8_trt.onnx --cast-uint8-input \\
         --precision int8 --out work/engines --timing-cache work/engines/timing.cache --check-dir work/phantoms/heldout'

Verified where: nothing in this module has run on a GPU or with TensorRT (none was at hand); the
source preparation (uint8 input, Q/DQ checks), engine naming and manifests are tested on the CPU
(tests/test_export_tensorrt.py, tests/test_build_repo.py).

In Kubernetes, run the same command as an init container of the Triton pod (same node, same GPU
model, same image tag family as the server) writing into the model repository volume, so the engine
is built on the GPU that serves it; give the pod's startup probe a window longer than the build.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXIT_NO_GPU = 3
PRECISIONS = ("fp16", "int8")


class TensorRTUnavailable(RuntimeError):
    """TensorRT, CUDA or a GPU is missing; the message says which."""


@dataclass(frozen=True)
class BuildConfig:
    onnx: Path
    precision: str
    out_dir: Path
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    timing_cache: Path | None = None
    workspace_gib: float = 4.0
    cast_uint8_input: bool = False  # build from a uint8-input copy of a float-input ONNX (written beside the plan)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {PRECISIONS}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}")


@dataclass
class BuildResult:
    engine: Path
    compute_capability: tuple[int, int]
    tensorrt_version: str
    precision: str
    seconds: float
    source_onnx: Path | None = None  # what the engine was built from (uint8 input): build-repo's --onnx


def engine_name(compute_capability: tuple[int, int], trt_version: str) -> str:
    """detector_sm<major><minor>_trt<major>.<minor>.plan (the form build_repo parses)."""
    major_minor = ".".join(trt_version.split(".")[:2])
    return f"detector_sm{compute_capability[0]}{compute_capability[1]}_trt{major_minor}.plan"


def require_tensorrt() -> Any:
    """Import tensorrt and check a CUDA GPU is visible; raise ``TensorRTUnavailable`` saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"the tensorrt Python package is not installed ({exc}); build engines on a GPU node with the NGC "
            "TensorRT image (see `python -m ctlesion_export.tensorrt_engine --help`)"
        ) from None
    compute_capability()  # raises when no GPU / CUDA runtime
    return trt


def compute_capability() -> tuple[int, int]:
    """(major, minor) of GPU 0 via torch CUDA or cuda-python."""
    try:
        import torch

        if torch.cuda.is_available():
            return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError:
            raise TensorRTUnavailable("no CUDA GPU visible (torch.cuda unavailable and cuda-python not installed)") from None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise TensorRTUnavailable(f"no CUDA GPU visible (cudaGetDeviceProperties: {err})")
    return int(props.major), int(props.minor)


def check_symmetric_qdq(onnx_path: Path) -> None:
    """TensorRT takes only int8 Q/DQ with zero-point 0; the CPU-target model (uint8) is refused."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    init = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in init:
            zp = numpy_helper.to_array(init[node.input[2]])
            if zp.dtype != np.int8 or np.any(zp != 0):
                raise ValueError(f"{onnx_path}: {node.name} has a {zp.dtype} zero-point {zp.ravel()[:1]}; TensorRT needs "
                                 "symmetric int8 Q/DQ: export with `ctlesion export --int8 --target tensorrt`")


def prepare_source(config: BuildConfig, stem: str) -> Path:
    """The ONNX the engine is built from: uint8 input (what the detector config declares), checked.

    A float-input ONNX is refused unless ``cast_uint8_input``; then ``<out_dir>/<stem>.onnx`` is written
    (input cast to float inside the graph, as gpu-onnx serves it) and returned. Needs no TensorRT.
    """
    from ctlesion_export.build_repo import serving_onnx_with_uint8_input
    from ctlesion_export.onnx_export import inspect_onnx
    from ctlesion_export.repo_check import onnx_signature

    info = inspect_onnx(config.onnx)
    if config.precision == "int8" and not info.quantized:
        raise ValueError(f"{config.onnx} has no Q/DQ nodes: int8 needs the QDQ model from `ctlesion export --int8 --target tensorrt`")
    if config.precision == "int8":
        check_symmetric_qdq(config.onnx)
    (image,) = onnx_signature(config.onnx).inputs
    if image.dtype == "UINT8":
        return config.onnx
    if image.dtype != "FP32":
        raise ValueError(f"{config.onnx}: input {image.name!r} is {image.dtype}; the detector takes UINT8 images")
    if not config.cast_uint8_input:
        raise ValueError(f"{config.onnx}: input {image.name!r} is FP32, but the detector config of every GPU target "
                         "declares UINT8 (Triton would refuse the engine): build from the uint8-input ONNX, or pass "
                         "--cast-uint8-input to write one beside the engine and build from it")  # fmt: skip
    config.out_dir.mkdir(parents=True, exist_ok=True)
    source = config.out_dir / f"{stem}.onnx"
    serving_onnx_with_uint8_input(config.onnx, source)
    log.info("input cast to uint8 inside the graph: building from %s", source)
    return source


def build_engine(config: BuildConfig) -> BuildResult:
    import time

    from ctlesion_export.onnx_export import INPUT_NAME, inspect_onnx
    from ctlesion_export.repo_check import engine_signature, write_engine_manifest

    trt = require_tensorrt()
    start = time.perf_counter()
    cc = compute_capability()
    name = engine_name(cc, trt.__version__)
    source = prepare_source(config, name.removesuffix(".plan"))
    info = inspect_onnx(source)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {source}: {errors}")

    bconf = builder.create_builder_config()
    bconf.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    bconf.set_flag(trt.BuilderFlag.FP16)
    if config.precision == "int8":
        bconf.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales from the Q/DQ nodes

    chw = (info.channels, info.height, info.width)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (config.min_batch, *chw), (config.opt_batch, *chw), (config.max_batch, *chw))
    bconf.add_optimization_profile(profile)

    cache_blob = config.timing_cache.read_bytes() if config.timing_cache and config.timing_cache.is_file() else b""
    cache = bconf.create_timing_cache(cache_blob)
    bconf.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, bconf)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    engine = config.out_dir / name
    engine.write_bytes(bytes(serialized))
    built = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    write_engine_manifest(engine, source, engine_signature(built), precision=config.precision,
                          tensorrt=trt.__version__, compute_capability=list(cc))  # fmt: skip
    if config.timing_cache:
        config.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        config.timing_cache.write_bytes(bytes(bconf.get_timing_cache().serialize()))
    return BuildResult(engine, cc, trt.__version__, config.precision, time.perf_counter() - start, source)


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # type: ignore[no-redef]
    return cudart


class EngineRunner:
    """Runs a deserialised engine on host float32 batches.

    Device buffers: torch CUDA tensors when torch has CUDA, else cuda-python (``pip install
    cuda-python``; the NGC TensorRT image has no torch).
    """

    def __init__(self, engine_path: Path) -> None:
        trt = require_tensorrt()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: cannot deserialise (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        try:
            import torch

            self.torch = torch if torch.cuda.is_available() else None
        except ImportError:
            self.torch = None

    def _np_dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        host_in = {n: np.ascontiguousarray(images, dtype=self._np_dtype(n)) for n in self.inputs}
        for n, a in host_in.items():
            self.context.set_input_shape(n, a.shape)
        shapes = {n: tuple(self.context.get_tensor_shape(n)) for n in self.outputs}
        runner = self._run_torch if self.torch is not None else self._run_cudart
        return {n: a.astype(np.float32) for n, a in runner(host_in, shapes).items()}

    def _run_torch(self, host_in: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        torch = self.torch
        bufs = {n: torch.from_numpy(a).cuda() for n, a in host_in.items()}
        for n, shape in shapes.items():
            bufs[n] = torch.from_numpy(np.empty(shape, self._np_dtype(n))).cuda()
        for n, b in bufs.items():
            self.context.set_tensor_address(n, b.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {n: bufs[n].cpu().numpy() for n in shapes}

    def _run_cudart(self, host_in: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        cudart = _cudart()
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host = dict(host_in) | {n: np.empty(s, self._np_dtype(n)) for n, s in shapes.items()}
        ptrs: dict[str, int] = {}
        try:
            for n, a in host.items():
                err, ptrs[n] = cudart.cudaMalloc(a.nbytes)
                _ok(err, "cudaMalloc")
                self.context.set_tensor_address(n, int(ptrs[n]))
            for n, a in host_in.items():
                _ok(cudart.cudaMemcpy(ptrs[n], a.ctypes.data, a.nbytes, h2d)[0], "cudaMemcpy")
            if not self.context.execute_async_v3(0):  # default stream; synchronised right after
                raise RuntimeError("TensorRT execution failed")
            _ok(cudart.cudaDeviceSynchronize()[0], "cudaDeviceSynchronize")
            for n in shapes:
                _ok(cudart.cudaMemcpy(host[n].ctypes.data, ptrs[n], host[n].nbytes, d2h)[0], "cudaMemcpy")
        finally:
            for p in ptrs.values():
                cudart.cudaFree(p)
        return {n: host[n] for n in shapes}


def _ok(err: Any, what: str) -> None:
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")


def check_engine(engine: Path, onnx_path: Path, images: np.ndarray, options: Any = None) -> Any:
    """Engine vs onnxruntime CPU on the same images: ``DetectionAgreement`` (accuracy module)."""
    from ctlesion_export.accuracy import agreement, run, session

    runner = EngineRunner(engine)
    outs = [runner(images[i : i + 4]) for i in range(0, len(images), 4)]
    test = (np.concatenate([o["scores"] for o in outs]), np.concatenate([o["boxes"] for o in outs]))
    sess = session(onnx_path)
    if sess.get_inputs()[0].type == "tensor(uint8)":  # the uint8-input source: same values, its own dtype
        parts = [sess.run(["scores", "boxes"], {sess.get_inputs()[0].name: images[i : i + 8].astype(np.uint8)})
                 for i in range(0, len(images), 8)]  # fmt: skip
        ref = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    else:
        ref = run(sess, images)
    return agreement(ref, test, options)


def _check_images(onnx_path: Path, check_dir: Path | None, count: int) -> np.ndarray:
    from ctlesion_export.onnx_export import inspect_onnx

    info = inspect_onnx(onnx_path)
    if check_dir is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (count, info.channels, info.height, info.width)).astype(np.float32)
    from ctlesion_export.calibration import find_series_dirs, load_images
    from preprocess_backend.types import Options

    dirs = find_series_dirs(check_dir)
    return load_images(dirs, Options(model_size=info.height, k=info.channels, **info.scale()), max(1, count // max(len(dirs), 1)))[:count]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctlesion build-engine", description=__doc__.split("\n\n")[0],
                                epilog="Needs an NVIDIA GPU and TensorRT 10; see the module docstring for the NGC recipe.")
    p.add_argument("--onnx", type=Path, required=True, help="FP32 ONNX (fp16) or INT8 QDQ ONNX (int8)")
    p.add_argument("--precision", choices=PRECISIONS, required=True)
    p.add_argument("--cast-uint8-input", action="store_true",
                   help="--onnx takes float input: write its uint8-input copy beside the engine and build from it")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="folder for detector_sm<cc>_trt<ver>.plan")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--timing-cache", type=Path, help="timing cache file (read if present, written after the build)")
    p.add_argument("--workspace-gib", type=float, default=4.0)
    p.add_argument("--check-dir", type=Path, help="DICOM series for the engine-vs-onnxruntime check (default: random images)")
    p.add_argument("--check-slices", type=int, default=8)
    p.add_argument("--min-f1", type=float, help="detection agreement required (default 0.9 fp16, 0.8 int8)")
    p.add_argument("--no-check", action="store_true", help="skip the engine-vs-onnxruntime check")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        config = BuildConfig(args.onnx, args.precision, args.out, args.min_batch, args.opt_batch, args.max_batch,
                             args.timing_cache, args.workspace_gib, args.cast_uint8_input)
        if not args.onnx.is_file():
            raise FileNotFoundError(f"{args.onnx} not found")
        require_tensorrt()
    except TensorRTUnavailable as exc:
        print(f"error: cannot build a TensorRT engine here: {exc}", file=sys.stderr)
        return EXIT_NO_GPU
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = build_engine(config)
    print(f"wrote {result.engine} (sm{result.compute_capability[0]}{result.compute_capability[1]}, "
          f"TensorRT {result.tensorrt_version}, {result.precision}, {result.seconds:.0f} s) from {result.source_onnx}")
    if args.no_check:
        return 0
    images = _check_images(args.onnx, args.check_dir, args.check_slices)
    report = check_engine(result.engine, args.onnx, images)
    print({k: v for k, v in asdict(report).items()})
    min_f1 = args.min_f1 if args.min_f1 is not None else (0.9 if args.precision == "fp16" else 0.8)
    if report.f1 < min_f1:
        print(f"error: engine detections agree with onnxruntime at F1 {report.f1:.3f} < {min_f1}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
