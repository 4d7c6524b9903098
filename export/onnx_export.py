"""PyTorch checkpoint -> ONNX detector with decoded outputs and a dynamic batch axis.

The graph holds the fused RepConv convolutions, the DFL integral and the anchor decoding, so the
served model outputs ``scores`` [N, A, C] and ``boxes`` [N, A, 4] (xyxy, input pixels) and the
postprocess step needs only threshold + NMS. Anchors are computed from the input's shape inside the
graph, so neither the batch nor the size is frozen (the official export's defect, issue #93).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "boxes")
# The detector's input scale (preprocess_backend Options.pixel_mm / context_mm it was trained at),
# kept in the ONNX metadata so every consumer (repository, evaluation, calibration) preprocesses at
# the model's own scale. "none": native pixels / neighbouring slices; absent (older exports): the same.
SCALE_KEYS = {"pixel_mm": "ctlesion.pixel_mm", "context_mm": "ctlesion.context_mm"}


@dataclass(frozen=True)
class OnnxModelInfo:
    """What the model repository builder needs to know about an exported detector."""

    path: Path
    channels: int
    height: int
    width: int
    num_classes: int
    num_anchors: int
    quantized: bool
    pixel_mm: float | None = None  # the training scale (SCALE_KEYS); None: native pixels
    context_mm: float | None = None  # None: neighbouring slices as 2.5D context

    def scale(self) -> dict[str, float | None]:
        """``Options`` overrides that preprocess at this model's training scale."""
        return {"pixel_mm": self.pixel_mm, "context_mm": self.context_mm}


def export_onnx(
    model: object,
    out_path: Path,
    size: int = 512,
    in_channels: int = 3,
    opset: int = 17,
    simplify: bool = True,
    scale: dict[str, float | None] | None = None,
) -> Path:
    """Export a (fused, eval-mode) DamoYolo model; returns the path of the checked ONNX file."""
    import onnx
    import torch

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()  # type: ignore[attr-defined]
    dummy = torch.zeros(1, in_channels, size, size)
    dynamic = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter gives a plain static graph that onnxruntime, TensorRT and the
        # quantization tools all take; torch.export's exporter would add onnxscript to the pins.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(out_path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(out_path))
    if simplify:
        import onnxslim

        proto = onnxslim.slim(proto)
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    if scale is not None:
        set_scale_metadata(proto, scale)
    onnx.save(proto, str(out_path))
    log.info("exported %s (opset %d, %s)", out_path, opset, "simplified" if simplify else "as traced")
    return out_path


def set_scale_metadata(proto: object, scale: dict[str, float | None]) -> None:
    """Write the training scale into an ONNX ModelProto's metadata_props (replacing older values)."""
    props = proto.metadata_props  # type: ignore[attr-defined]
    keep = [(p.key, p.value) for p in props if p.key not in SCALE_KEYS.values()]
    del props[:]
    for key, value in keep:
        props.add(key=key, value=value)
    for name, key in SCALE_KEYS.items():
        value = scale.get(name)
        props.add(key=key, value="none" if value is None else f"{float(value):g}")


def read_scale_metadata(props: dict[str, str]) -> dict[str, float | None]:
    """The training scale from an ONNX metadata map (absent keys: native, None)."""
    from preprocess_backend.types import mm_or_none

    return {name: mm_or_none(props.get(key, "none")) for name, key in SCALE_KEYS.items()}


def copy_scale_metadata(src: Path, dst: Path) -> None:
    """Carry the training scale from ``src`` to ``dst`` (quantization writes a new model without it)."""
    import onnx

    scale = read_scale_metadata({p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props})
    proto = onnx.load(str(dst))
    set_scale_metadata(proto, scale)
    onnx.save(proto, str(dst))


def inspect_onnx(path: Path) -> OnnxModelInfo:
    """Read the detector's I/O contract back from an ONNX file and check it."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    inputs = [i for i in proto.graph.input if i.name not in {init.name for init in proto.graph.initializer}]
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise ValueError(f"{path}: expected one input named {INPUT_NAME!r}, found {[i.name for i in inputs]}")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or min(dims[1:]) <= 0:
        raise ValueError(f"{path}: input {INPUT_NAME} must be [batch, C, H, W] with fixed C, H, W; got {dims}")
    outputs = {o.name: o for o in proto.graph.output}
    if set(outputs) != set(OUTPUT_NAMES):
        raise ValueError(f"{path}: outputs must be {OUTPUT_NAMES}, found {sorted(outputs)}")
    score_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in outputs["scores"].type.tensor_type.shape.dim]
    if len(score_dims) != 3 or min(score_dims[1:]) <= 0:
        # Anchors are computed from the input's shape inside the graph, so the exporter leaves
        # these dims symbolic; one run on a zero image gives their values at the fixed size.
        score_dims = _probe_output_shape(path, dims)
    quantized = any(node.op_type in {"QuantizeLinear", "DequantizeLinear"} for node in proto.graph.node)
    return OnnxModelInfo(
        path=Path(path),
        channels=dims[1],
        height=dims[2],
        width=dims[3],
        num_classes=score_dims[2] if len(score_dims) == 3 else -1,
        num_anchors=score_dims[1] if len(score_dims) == 3 else -1,
        quantized=quantized,
        **read_scale_metadata({p.key: p.value for p in proto.metadata_props}),
    )


def _probe_output_shape(path: Path, input_dims: list[int]) -> list[int]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # the serving ONNX of the GPU targets takes uint8 (cast inside the graph); the exported one float
    dtype = np.uint8 if session.get_inputs()[0].type == "tensor(uint8)" else np.float32
    image = np.zeros([1, *input_dims[1:]], dtype=dtype)
    (scores,) = session.run(["scores"], {INPUT_NAME: image})
    return list(scores.shape)


def compare_with_torch(model: object, onnx_path: Path, images: np.ndarray) -> tuple[float, float]:
    """Max abs difference of (scores, boxes) between PyTorch and onnxruntime on ``images``."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_scores, ort_boxes = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.astype(np.float32)})
    with torch.no_grad():
        t_scores, t_boxes = model(torch.from_numpy(images.astype(np.float32)))  # type: ignore[operator]
    return (
        float(np.abs(ort_scores - t_scores.numpy()).max()),
        float(np.abs(ort_boxes - t_boxes.numpy()).max()),
    )
