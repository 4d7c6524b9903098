"""The 3D false-positive-reduction models of a Triton repository, and their ensemble ``lesion_fpr``.

  fpr_preprocess  (Python, no batching)  dicom [-1] BYTES + centres_mm [-1, 3] -> cubes [-1, D, H, W] uint8
                   + airway_hu [-1, P] float32 (the airway probe: preprocess_backend.airways)
  fpr_classifier  (Python onnxruntime on CPU targets, onnxruntime_onnx on GPU targets; dynamic
                   batching over cubes of concurrent requests) cubes -> probability [1]
  lesion_fpr      the ensemble of the two (probability, and airway_hu passed through); the client
                   calls it after linking the first pass's detections into 3D lesions (docs/contracts.md)

The classifier's config carries what the client needs to turn probabilities into findings: the
rescoring rule, the operating threshold chosen on validation data and the candidate threshold.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from preprocess_backend.airways import PROBE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FPR_CHECKPOINT = REPO_ROOT / "models" / "ctlesion_fpr.pt"  # committed; the ONNX is built from it
DEFAULT_FPR_ONNX = REPO_ROOT / "work" / "onnx" / "ctlesion_fpr.onnx"
FPR_ENSEMBLE = "lesion_fpr"
FPR_MAX_BATCH = 64
# Targets served by the tritonserver of the pytriton wheel, which has the Python backend but no
# onnxruntime backend: their classifier runs onnxruntime inside a Python-backend model, on the CPU.
PYTHON_CLASSIFIER_TARGETS = ("cpu", "gpu-torch")
AIRWAY_PLANES = PROBE.shape[0]
TORCH_FPR_CHECKPOINT = "model.pt"  # the gpu-torch classifier's checkpoint, beside its ONNX


def export_fpr_checkpoint(checkpoint: Path, onnx_path: Path) -> Path:
    """FPR checkpoint -> the served uint8-input ONNX, its geometry, rule and thresholds as metadata."""
    from ctlesion_fpr.model import export_onnx, load_checkpoint

    net, meta = load_checkpoint(Path(checkpoint))
    if "cube" not in meta:
        raise ValueError(f"{checkpoint}: no cube geometry in its meta (not released by ctlesion_fpr.train --release?)")
    return export_onnx(net, Path(onnx_path), tuple(meta["cube"]["shape"]), meta)


def default_fpr_onnx(checkpoint: Path = DEFAULT_FPR_CHECKPOINT, onnx_path: Path = DEFAULT_FPR_ONNX) -> Path:
    """The ONNX of the committed FPR checkpoint, exported when missing or made from other bytes."""
    from ctlesion_export.build_repo import export_if_changed

    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"FPR checkpoint {checkpoint} not found (train one with python -m ctlesion_fpr.train --release)")
    export_if_changed(Path(checkpoint), Path(onnx_path), export_fpr_checkpoint)
    return Path(onnx_path)


def fpr_configs(fpr_onnx: Path, target: str, limits: object, instances: int = 1, queue_delay_us: int = 2000,
                cube_instances: int = 1, classifier_threads: int = 1,
                torch_classifier: str | None = None) -> dict[str, mc.ModelConfig]:
    """name -> ModelConfig of the three FPR models for ``target`` (cpu | gpu-*). ``cube_instances``:
    ``fpr_preprocess`` decodes DICOM like ``preprocess`` and is scaled with it (a series' cube
    requests arrive together, after its last slab, while the detector idles). ``classifier_threads``:
    onnxruntime threads of the CPU classifier (0 = all cores); one, without spinning, because it runs
    beside the cube decoding and other series' slabs: at 29 cubes a run it took 190 ms of CPU on one
    thread against 290 on two (bench/RESULTS.md). ``torch_classifier`` ("gpu" | "cpu", gpu-torch only):
    the classifier runs the FPR checkpoint in torch (``fpr_classifier_torch``) on an instance of that
    kind, instead of onnxruntime on the CPU."""
    from ctlesion_export.build_repo import TensorSpec, _add_io, _instance, _params
    from ctlesion_fpr.predict import read_meta

    info = read_meta(fpr_onnx)
    d, h, w = info.spec.shape
    pre = mc.ModelConfig(name="fpr_preprocess", backend="python", max_batch_size=0)
    _add_io(pre.input, [TensorSpec("dicom", "bytes", (-1,)), TensorSpec("centres_mm", "float32", (-1, 3))])
    _add_io(pre.output, [TensorSpec("cubes", "uint8", (-1, d, h, w)), TensorSpec("airway_hu", "float32", (-1, AIRWAY_PLANES))])
    _instance(pre, cube_instances, gpu=False)
    _params(pre, {"cube": json.dumps(info.spec.to_dict())})
    _params(pre, {f"limit_{k}": v for k, v in asdict(limits).items()})  # type: ignore[call-overload]

    python_classifier = target in PYTHON_CLASSIFIER_TARGETS
    if torch_classifier is not None:
        cls = mc.ModelConfig(name="fpr_classifier", backend="python", max_batch_size=FPR_MAX_BATCH)
        _params(cls, {"fpr_checkpoint": TORCH_FPR_CHECKPOINT, "intra_op_threads": classifier_threads})
    elif python_classifier:
        cls = mc.ModelConfig(name="fpr_classifier", backend="python", max_batch_size=FPR_MAX_BATCH)
        _params(cls, {"fpr_onnx_file": "model.onnx", "intra_op_threads": classifier_threads, "allow_spinning": "0"})
    else:
        cls = mc.ModelConfig(name="fpr_classifier", platform="onnxruntime_onnx", max_batch_size=FPR_MAX_BATCH)
    _add_io(cls.input, [TensorSpec("cubes", "uint8", (d, h, w))])
    _add_io(cls.output, [TensorSpec("probability", "float32", (1,))])
    cls.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    _instance(cls, instances, gpu=torch_classifier == "gpu" if torch_classifier else not python_classifier)
    _params(cls, {"rule": info.rule, "operating_threshold": info.operating_threshold,
                  "candidate_threshold": info.candidate_threshold, "cube": json.dumps(info.spec.to_dict())})  # fmt: skip
    if info.coefficients is not None:  # the logistic rule's weights travel with the model that needs them
        _params(cls, {"rescoring": json.dumps(info.coefficients)})

    ens = mc.ModelConfig(name=FPR_ENSEMBLE, platform="ensemble", max_batch_size=0)
    _add_io(ens.input, [TensorSpec("dicom", "bytes", (-1,)), TensorSpec("centres_mm", "float32", (-1, 3))])
    _add_io(ens.output, [TensorSpec("probability", "float32", (-1, 1)), TensorSpec("airway_hu", "float32", (-1, AIRWAY_PLANES))])
    step = ens.ensemble_scheduling.step.add(model_name="fpr_preprocess", model_version=-1)
    step.input_map["dicom"] = "dicom"
    step.input_map["centres_mm"] = "centres_mm"
    step.output_map["cubes"] = "cubes"
    step.output_map["airway_hu"] = "airway_hu"  # straight to the client: its airway veto (preprocess_backend.airways)
    step = ens.ensemble_scheduling.step.add(model_name="fpr_classifier", model_version=-1)
    step.input_map["cubes"] = "cubes"
    step.output_map["probability"] = "probability"
    return {"fpr_preprocess": pre, "fpr_classifier": cls, FPR_ENSEMBLE: ens}


def add_fpr_models(out: Path, fpr_onnx: Path, target: str, limits: object, cube_instances: int = 1,
                   classifier_threads: int = 1, torch_checkpoint: Path | None = None,
                   torch_kind: str = "gpu") -> None:
    """Write the FPR models into the repository ``out`` (the served ONNX is a uint8-input graph
    already, so every target serves the same file). ``torch_checkpoint`` (gpu-torch): the checkpoint
    ``fpr_onnx`` was exported from, served in torch on a ``torch_kind`` instance; the ONNX stays beside
    it for the tensor check."""
    from ctlesion_export.build_repo import SOURCES, _write_config

    torch_classifier = torch_kind if torch_checkpoint is not None else None
    for name, config in fpr_configs(fpr_onnx, target, limits, cube_instances=cube_instances,
                                    classifier_threads=classifier_threads, torch_classifier=torch_classifier).items():
        _write_config(out / name, config)
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        source_name = "fpr_classifier_torch" if name == "fpr_classifier" and torch_classifier else name
        source = SOURCES / source_name / "1" / "model.py"
        if source.exists() and (name != "fpr_classifier" or target in PYTHON_CLASSIFIER_TARGETS):
            shutil.copy2(source, out / name / "1" / "model.py")
    shutil.copy2(fpr_onnx, out / "fpr_classifier" / "1" / "model.onnx")
    if torch_checkpoint is not None:
        shutil.copy2(torch_checkpoint, out / "fpr_classifier" / "1" / TORCH_FPR_CHECKPOINT)


def checkpoint_of(fpr_onnx: Path, checkpoint: Path = DEFAULT_FPR_CHECKPOINT) -> Path | None:
    """``checkpoint`` when ``fpr_onnx`` was exported from those very bytes (the sha256 that
    ``export_if_changed`` keeps beside it), else None: a torch classifier must serve the same model."""
    import hashlib

    source = Path(fpr_onnx).with_name(Path(fpr_onnx).name + ".source")
    if not (Path(checkpoint).is_file() and source.is_file()):
        return None
    return Path(checkpoint) if source.read_text().strip() == hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest() else None
