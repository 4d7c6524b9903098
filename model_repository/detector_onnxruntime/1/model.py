"""Triton Python model: the detector on CPU, running the ONNX model in-process with onnxruntime.

The pytriton tritonserver has no onnxruntime backend, so on CPU the detector is a Python model.
Requests merged by the dynamic batcher arrive together in one ``execute`` call: their slices are
concatenated into one onnxruntime run and split back, which is what dynamic batching buys.
The ensemble passes images as uint8 (the windowed 0..255 values are integers by construction),
a quarter of the float32 bytes through the stub's shared memory; the cast happens here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        onnx_path = version_dir / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The arena stays (without it the detector takes 9-26 % longer); the memory pattern goes by
        # default: it keeps a planned block per batch size the batcher forms (docs/reliability.md §5).
        options.enable_mem_pattern = params.get("mem_pattern", "false") == "true"
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o["name"] for o in config["output"]]
        pb_utils.Logger.log_info(f"detector: {onnx_path.name} on onnxruntime {ort.__version__}")

    def execute(self, requests: list) -> list:
        batches = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        sizes = [b.shape[0] for b in batches]
        images = np.concatenate(batches, axis=0).astype(np.float32, copy=False)
        outputs = self.session.run(self.output_names, {self.input_name: images})
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + size]))
                for name, out in zip(self.output_names, outputs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
