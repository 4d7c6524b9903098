"""Triton Python model `fpr_classifier` of the gpu-torch target: uint8 cubes -> nodule probability,
the FPR checkpoint in torch on the GPU Triton gives the instance (the CPU where it has none).

Same tensors and batching as ``model_repository/fpr_classifier`` (onnxruntime on the CPU): the dynamic
batcher merges several series' cubes into one call, ``ctlesion_fpr.predict.TorchFprPredictor`` runs
them, the answer is split back per request.
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from ctlesion_fpr.predict import TorchFprPredictor, probabilities_per_request


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        device = params.get("device", "auto")
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        path = Path(args["model_repository"]) / args["model_version"] / params["fpr_checkpoint"]
        self.predict = TorchFprPredictor(path, device=device, threads=int(params.get("intra_op_threads", "0")))
        pb_utils.Logger.log_info(f"fpr_classifier: torch on {self.predict.device}")

    def execute(self, requests: list) -> list:
        batches = [pb_utils.get_input_tensor_by_name(r, "cubes").as_numpy() for r in requests]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("probability", probs)])
                for probs in probabilities_per_request(self.predict, batches)]
