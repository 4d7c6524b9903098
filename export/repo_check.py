"""Check a built model repository: every model's inputs and outputs against its config.pbtxt.

    python -m ctlesion_export.repo_check DIR [--engine-source-onnx X.onnx]

Triton loads a model only when its file's tensors match the config (names, datatypes, shapes), and
an ensemble only when each step's tensors match the step that produces them; a mismatch found at
load time on a GPU node costs a start-up. This reads the files themselves, here:

- ONNX files (gpu-onnx; the cpu detector's in-process ONNX) with ``onnx``;
- TensorRT plans with TensorRT where it is installed (else skipped with the reason, and the ONNX the
  engines were built from is checked instead: ``engine_source_onnx``; plus the manifest that
  ``ctlesion build-engine`` writes beside each plan, which records the engine's own tensors);
- Python models against the tensors they are declared to produce (``preprocess_backend``'s
  ``SLAB_META_TENSORS`` / ``FINDING_TENSORS``; the torch detector by one probe run of its model);
- the ensemble's wiring: each step input against the tensor the earlier step (or the request) gives.

Shapes are compared with the batch dimension included (``-1`` when ``max_batch_size`` > 0); ``-1``
on either side matches any size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

MANIFEST_SUFFIX = ".json"  # detector_sm90_trt10.5.plan -> detector_sm90_trt10.5.plan.json


@dataclass(frozen=True)
class TensorSig:
    """One tensor as Triton names its type (``UINT8``, ``FP32``, ``BYTES`` ...); shape with batch."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Signature:
    inputs: list[TensorSig]
    outputs: list[TensorSig]

    def to_dict(self) -> dict[str, list[dict[str, object]]]:
        return {side: [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in getattr(self, side)]
                for side in ("inputs", "outputs")}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, list[dict[str, object]]]) -> Signature:
        def sigs(side: str) -> list[TensorSig]:
            return [TensorSig(str(t["name"]), str(t["dtype"]), tuple(int(d) for d in t["shape"])) for t in data[side]]  # type: ignore[union-attr]

        return cls(sigs("inputs"), sigs("outputs"))


@dataclass
class CheckReport:
    """What was compared (one line each) and what could not be, with the reason."""

    checked: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class IOMismatch(ValueError):
    """A model's file, or a producing step, disagrees with a config.pbtxt; one line per disagreement."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("model I/O does not match config.pbtxt:\n  " + "\n  ".join(problems))
        self.problems = problems


# Triton's names for datatypes, from each source's own enum.
_CONFIG_TYPES = {v: k.removeprefix("TYPE_") for k, v in mc.DataType.items()} | {mc.TYPE_STRING: "BYTES"}
_ONNX_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "BYTES",
               9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64", 16: "BF16"}  # fmt: skip
_NUMPY_TYPES = {"uint8": "UINT8", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
                "float16": "FP16", "float32": "FP32", "float64": "FP64", "bool": "BOOL", "bytes": "BYTES",
                "object": "BYTES"}  # fmt: skip


def triton_dtype(numpy_name: str) -> str:
    """``preprocess_backend``'s dtype names (numpy's, plus ``bytes``) as Triton names them."""
    return _NUMPY_TYPES[numpy_name]


def load_config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def config_signature(config: mc.ModelConfig) -> Signature:
    batch = (-1,) if config.max_batch_size > 0 else ()

    def sigs(tensors: Iterable[mc.ModelInput | mc.ModelOutput]) -> list[TensorSig]:
        return [TensorSig(t.name, _CONFIG_TYPES[t.data_type], batch + tuple(t.dims)) for t in tensors]

    return Signature(sigs(config.input), sigs(config.output))


def onnx_signature(path: Path) -> Signature:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def sigs(values: Iterable[onnx.ValueInfoProto]) -> list[TensorSig]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            out.append(TensorSig(v.name, _ONNX_TYPES.get(tt.elem_type, f"onnx:{tt.elem_type}"), dims))
        return out

    return Signature(sigs(i for i in graph.input if i.name not in initializers), sigs(graph.output))


def tensorrt_missing() -> str | None:
    """Why a plan cannot be read here, or None when TensorRT is importable."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT is not installed here ({exc})"
    return None


def plan_signature(path: Path) -> Signature:
    """The engine's own I/O tensors (needs TensorRT and a GPU that can deserialise the plan)."""
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise RuntimeError(f"{path}: TensorRT cannot deserialise this plan (another GPU or TensorRT version?)")
    return engine_signature(engine)


def engine_signature(engine: object) -> Signature:
    import tensorrt as trt

    names = {trt.DataType.FLOAT: "FP32", trt.DataType.HALF: "FP16", trt.DataType.INT8: "INT8",
             trt.DataType.INT32: "INT32", trt.DataType.UINT8: "UINT8", trt.DataType.BOOL: "BOOL"}  # fmt: skip
    if hasattr(trt.DataType, "INT64"):
        names[trt.DataType.INT64] = "INT64"
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):  # type: ignore[attr-defined]
        name = engine.get_tensor_name(i)  # type: ignore[attr-defined]
        sig = TensorSig(name, names.get(engine.get_tensor_dtype(name), str(engine.get_tensor_dtype(name))),  # type: ignore[attr-defined]
                        tuple(int(d) for d in engine.get_tensor_shape(name)))  # type: ignore[attr-defined]
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT  # type: ignore[attr-defined]
        (inputs if is_input else outputs).append(sig)
    return Signature(inputs, outputs)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_engine_manifest(engine: Path, source_onnx: Path, signature: Signature, **facts: object) -> Path:
    """Beside a plan: the ONNX it was built from (sha256) and the engine's tensors (``build-engine``)."""
    manifest = engine.with_name(engine.name + MANIFEST_SUFFIX)
    data = {"source_onnx": source_onnx.name, "source_onnx_sha256": sha256_file(source_onnx),
            "io": signature.to_dict(), **facts}  # fmt: skip
    manifest.write_text(json.dumps(data, indent=2))
    return manifest


def compare(model: str, declared: Signature, actual: Signature, where: str) -> list[str]:
    """Disagreements between a config (``declared``) and a file or producer (``actual``)."""
    problems: list[str] = []
    for side in ("inputs", "outputs"):
        have = {t.name: t for t in getattr(actual, side)}
        want = {t.name: t for t in getattr(declared, side)}
        noun = side[:-1]
        for name, spec in want.items():
            got = have.get(name)
            if got is None:
                problems.append(f"{model}: {noun} {name!r} is declared in config.pbtxt but {where} has no such "
                                f"{noun} (it has {sorted(have)})")  # fmt: skip
                continue
            if got.dtype != spec.dtype:
                problems.append(f"{model}: {noun} {name!r} is {spec.dtype} in config.pbtxt but {got.dtype} in {where}")
            if not shapes_match(spec.shape, got.shape):
                problems.append(f"{model}: {noun} {name!r} has shape {list(spec.shape)} in config.pbtxt but "
                                f"{list(got.shape)} in {where}")  # fmt: skip
        for name in sorted(set(have) - set(want)):
            if side == "inputs":  # an output nobody asks for is harmless; an input nobody feeds is not
                problems.append(f"{model}: {where} has input {name!r} that config.pbtxt does not declare")
    return problems


def shapes_match(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x < 0 or y < 0 for x, y in zip(a, b, strict=True))


def python_model_signature(name: str, config: mc.ModelConfig, model_dir: Path,
                           torch_probe: Callable[[Path, mc.ModelConfig], Signature] | None) -> tuple[Signature, str] | None:  # fmt: skip
    """What a Python model produces and reads, from the code it runs; None when nothing is known."""
    from preprocess_backend.pipeline import FINDING_TENSORS, SLAB_META_TENSORS

    declared = config_signature(config)
    meta = [TensorSig(n, triton_dtype(d), tuple(s)) for n, d, s in SLAB_META_TENSORS]
    findings = [TensorSig(n, triton_dtype(d), tuple(s)) for n, d, s in FINDING_TENSORS]
    params = {k: v.string_value for k, v in config.parameters.items()}
    if name == "preprocess":
        images = next((t for t in declared.outputs if t.name == "images"), TensorSig("images", "UINT8", (-1, -1, -1, -1)))
        return Signature(declared.inputs, [TensorSig("images", "UINT8", (-1, *images.shape[1:])), *meta]), \
            "SLAB_META_TENSORS (what preprocess emits)"  # fmt: skip
    if name == "postprocess":
        extra = [t for t in declared.inputs if t.name not in {m.name for m in meta}]
        return Signature([*extra, *meta], findings), "SLAB_META_TENSORS / FINDING_TENSORS (what postprocess reads / emits)"
    if "onnx_file" in params:  # the cpu detector: uint8 in, cast to float32, the ONNX's outputs out
        onnx_file = model_dir / "1" / params["onnx_file"]
        sig = onnx_signature(onnx_file)
        fed = [TensorSig(t.name, "UINT8" if t.dtype == "FP32" else f"{t.dtype} (model.py casts uint8 to FP32)", t.shape)
               for t in sig.inputs]  # fmt: skip
        return Signature(fed, sig.outputs), f"{onnx_file.name} (run by model.py after its uint8 -> FP32 cast)"
    if name == "fpr_preprocess":  # preprocess_backend.airways.cubes_and_probes: cubes of the declared geometry + probes
        import json

        from preprocess_backend.airways import PROBE
        from preprocess_backend.cubes import CubeSpec

        spec = CubeSpec.from_dict(json.loads(params["cube"]))
        inputs = [TensorSig("dicom", "BYTES", (-1,)), TensorSig("centres_mm", "FP32", (-1, 3))]
        outputs = [TensorSig("cubes", "UINT8", (-1, *spec.shape)), TensorSig("airway_hu", "FP32", (-1, PROBE.shape[0]))]
        return Signature(inputs, outputs), "cubes_and_probes (what fpr_preprocess emits)"
    if "fpr_onnx_file" in params:  # fpr_classifier: model.py feeds the ONNX the tensors Triton gives it, as they are
        onnx_file = model_dir / "1" / params["fpr_onnx_file"]
        return onnx_signature(onnx_file), f"{onnx_file.name} (run by model.py as it is)"
    if "fpr_checkpoint" in params:  # gpu-torch's torch classifier: the module its ONNX beside it was traced from
        onnx_file = model_dir / "1" / "model.onnx"
        return onnx_signature(onnx_file), f"{onnx_file.name} (exported from {params['fpr_checkpoint']}, which model.py runs in torch)"
    if "checkpoint" in params and torch_probe is not None:
        return torch_probe(model_dir / "1" / params["checkpoint"], config), f"a probe run of {params['checkpoint']} in torch"
    return None


def check_repository(
    repo: Path,
    engine_source_onnx: Path | None = None,
    torch_probe: Callable[[Path, mc.ModelConfig], Signature] | None = None,
) -> CheckReport:
    """Compare every model in ``repo`` with its config; ``IOMismatch`` lists all disagreements."""
    report = CheckReport()
    problems: list[str] = []
    configs = {d.name: load_config(d) for d in sorted(Path(repo).iterdir()) if (d / "config.pbtxt").is_file()}
    for name, config in configs.items():
        model_dir = Path(repo) / name
        declared = config_signature(config)
        if config.platform == "onnxruntime_onnx":
            onnx_file = model_dir / "1" / (config.default_model_filename or "model.onnx")
            problems += compare(name, declared, onnx_signature(onnx_file), onnx_file.name)
            report.checked.append(f"{name}: config.pbtxt vs {onnx_file.name} (read with onnx)")
        elif config.platform == "tensorrt_plan":
            problems += _check_plans(name, config, declared, model_dir, engine_source_onnx, report)
        elif config.backend == "python":
            known = python_model_signature(name, config, model_dir, torch_probe)
            if known is None:
                report.skipped.append(f"{name}: Python model with no declared tensors to compare")
            else:
                sig, where = known
                problems += compare(name, declared, sig, where)
                report.checked.append(f"{name}: config.pbtxt vs {where}")
    ensemble = [c for c in configs.values() if c.platform == "ensemble"]
    for config in ensemble:
        problems += _check_ensemble(config, configs)
        report.checked.append(f"{config.name}: each step's tensors vs the step or request that provides them")
    if problems:
        raise IOMismatch(problems)
    return report


def _check_plans(name: str, config: mc.ModelConfig, declared: Signature, model_dir: Path,
                 source_onnx: Path | None, report: CheckReport) -> list[str]:  # fmt: skip
    problems: list[str] = []
    plans = sorted((model_dir / "1").glob("*.plan"))
    if source_onnx is not None:
        where = f"{source_onnx.name} (the ONNX the TensorRT engines are built from)"
        problems += compare(name, declared, onnx_signature(source_onnx), where)
        report.checked.append(f"{name}: config.pbtxt vs {source_onnx.name}, the engines' source ONNX (read with onnx)")
    missing = tensorrt_missing()
    for plan in plans:
        manifest = plan.with_name(plan.name + MANIFEST_SUFFIX)
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            where = f"{plan.name}'s build manifest (tensors recorded from the engine when it was built)"
            problems += compare(name, declared, Signature.from_dict(data["io"]), where)
            if source_onnx is not None and data.get("source_onnx_sha256") != sha256_file(source_onnx):
                problems.append(f"{name}: {plan.name} was built from {data.get('source_onnx')} "
                                f"(sha256 {str(data.get('source_onnx_sha256'))[:12]}), not from {source_onnx.name} "
                                f"(sha256 {sha256_file(source_onnx)[:12]})")  # fmt: skip
            report.checked.append(f"{name}: config.pbtxt vs {manifest.name}")
        if missing:
            report.skipped.append(f"{name}: {plan.name} itself not read: {missing}; Triton checks it at load time")
            continue
        try:
            sig = plan_signature(plan)
        except RuntimeError as exc:
            report.skipped.append(f"{name}: {plan.name} not read here: {exc}")
            continue
        problems += compare(name, declared, sig, f"{plan.name} (read with TensorRT)")
        report.checked.append(f"{name}: config.pbtxt vs {plan.name} (read with TensorRT)")
    return problems


def _check_ensemble(config: mc.ModelConfig, configs: dict[str, mc.ModelConfig]) -> list[str]:
    available = {t.name: t for t in config_signature(config).inputs}
    where = {t.name: "the ensemble's request inputs" for t in available.values()}
    problems: list[str] = []
    for step in config.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"{config.name}: step {step.model_name!r} has no model in the repository")
            continue
        sig = config_signature(model)
        inputs = {t.name: t for t in sig.inputs}
        for model_input, tensor in step.input_map.items():
            spec, got = inputs.get(model_input), available.get(tensor)
            if spec is None or got is None:
                problems.append(f"{config.name}: step {step.model_name} maps {tensor!r} to input {model_input!r}, "
                                "but one of them does not exist")  # fmt: skip
                continue
            if spec.dtype != got.dtype or not shapes_match(spec.shape, got.shape):
                problems.append(f"{step.model_name}: input {model_input!r} is {spec.dtype} {list(spec.shape)} in "
                                f"config.pbtxt but {where[tensor]} give {got.dtype} {list(got.shape)}")  # fmt: skip
        outputs = {t.name: t for t in sig.outputs}
        for model_output, tensor in step.output_map.items():
            if model_output in outputs:
                available[tensor] = outputs[model_output]
                where[tensor] = f"{step.model_name}'s output {model_output!r}"
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctlesion_export.repo_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--engine-source-onnx", type=Path, help="gpu-trt: the ONNX the plans were built from")
    args = parser.parse_args(argv)
    from ctlesion_export.torch_serving import probe_signature

    try:
        report = check_repository(args.repository, args.engine_source_onnx, probe_signature)
    except IOMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in report.checked:
        print(f"checked  {line}")
    for line in report.skipped:
        print(f"skipped  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
