"""Triton Python model `fpr_classifier`: uint8 cubes -> nodule probability, onnxruntime in-process.

The dynamic batcher merges the cubes of concurrent requests (several series' lesions) into one
call; they run through ``ctlesion_fpr.predict.FprPredictor`` (the evaluation's predictor) and are
split back per request.
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from ctlesion_fpr.predict import FprPredictor, probabilities_per_request


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params.get("fpr_onnx_file", "model.onnx")
        self.predict = FprPredictor(path, threads=int(params.get("intra_op_threads", "0")),
                                    spinning=params.get("allow_spinning", "0") == "1")

    def execute(self, requests: list) -> list:
        batches = [pb_utils.get_input_tensor_by_name(r, "cubes").as_numpy() for r in requests]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("probability", probs)])
                for probs in probabilities_per_request(self.predict, batches)]
