"""Triton Python model `postprocess`: decoded detector outputs -> findings per slice.

A thin adapter over ``preprocess_backend.pipeline.postprocess_findings`` (score threshold, class-aware
NMS, letterbox inverse to original pixels, millimetres from PixelSpacing, anatomical and size
filters, mean HU), whose arrays become the output tensors directly (no per-detection objects).
Request options override the defaults of this model's config.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from preprocess_backend.errors import DicomInputError
from preprocess_backend.native_threads import limit_native_threads
from preprocess_backend.pipeline import SLAB_META_TENSORS, postprocess_findings
from preprocess_backend.types import Options

FLOAT_OPTIONS = ("score_threshold", "nms_iou", "min_size_mm", "max_size_mm")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        limit_native_threads(1)  # Triton scales this step by instances; idle BLAS threads spin
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.defaults = {name: float(params[name]) for name in FLOAT_OPTIONS if name in params}
        self.defaults["max_detections"] = int(params.get("max_detections", "100"))
        self.meta_names = [name for name, _, _ in SLAB_META_TENSORS]

    def execute(self, requests: list) -> list:
        return [self._one(request) for request in requests]

    def _one(self, request: object) -> object:
        try:
            values = dict(self.defaults)
            for name in FLOAT_OPTIONS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    values[name] = float(tensor.as_numpy().reshape(-1)[0])
            options = Options.from_dict(values)
            scores = pb_utils.get_input_tensor_by_name(request, "scores").as_numpy()
            boxes = pb_utils.get_input_tensor_by_name(request, "boxes").as_numpy()
            meta = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.meta_names}
            findings = postprocess_findings(scores, boxes, meta, options)
            tensors = [pb_utils.Tensor(name, array) for name, array in findings.to_arrays().items()]
            return pb_utils.InferenceResponse(output_tensors=tensors)
        except (DicomInputError, ValueError) as exc:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
            )
