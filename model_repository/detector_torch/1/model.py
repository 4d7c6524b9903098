"""Triton Python model: the detector in torch (target ``gpu-torch``), fp16 CUDA graphs on a GPU.

Thin on purpose: loading, graph capture and batch buckets live in ``ctlesion_export.torch_serving``.
An instance of kind GPU runs on the GPU Triton gives it; a CPU instance on ``device`` (auto: CUDA
when torch sees it, else fp32 on the CPU, which is how this target is tested without a GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from ctlesion_export.torch_serving import TorchDetector, TorchServingConfig, run_merged


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        device = params.get("device", "auto")
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        fp16 = {"auto": None, "true": True, "false": False}[params.get("fp16", "auto")]
        serving = TorchServingConfig(
            device=device,
            fp16=fp16,
            cuda_graphs=params.get("cuda_graphs", "true") == "true",
            buckets=tuple(int(b) for b in params["buckets"].split(",")),
            threads=int(params.get("threads", "0")),
        )
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.detector = TorchDetector(version_dir / params["checkpoint"], serving)
        self.detector.warmup()
        pb_utils.Logger.log_info(
            f"detector: torch on {self.detector.device}, {'fp16' if self.detector.fp16 else 'fp32'}, "
            f"CUDA graphs for {sorted(self.detector.graphs) or 'none'}"
        )

    def execute(self, requests: list) -> list:
        batches = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("scores", s), pb_utils.Tensor("boxes", b)])
            for s, b in run_merged(self.detector, batches)
        ]

    def finalize(self) -> None:
        pb_utils.Logger.log_info(f"detector: executions per batch bucket {self.detector.bucket_counts}")
