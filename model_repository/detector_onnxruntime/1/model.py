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
        # Idle intra-op threads spin by default; beside the preprocess / postprocess stubs on the same
        # cores that spinning is CPU they lose: off, the detector took 35-37 instead of 43-55 ms of CPU
        # per slice here and ran faster (bench/RESULTS.md, series throughput).
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "0"))
        # The batcher may merge up to max_batch_size slices; running them in pieces of at most
        # max_run_batch bounds the arena (it grows to the largest run) at no cost in throughput.
        self.max_run_batch = int(params.get("max_run_batch", "0"))  # 0: the whole batch in one run
        if self.max_run_batch < 0:
            raise ValueError(f"detector parameter max_run_batch must be >= 0, got {self.max_run_batch}")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o["name"] for o in config["output"]]
        pb_utils.Logger.log_info(f"detector: {onnx_path.name} on onnxruntime {ort.__version__}")

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        """uint8 (or float32) images -> outputs; the float32 cast is made per run piece, not for the
        whole merged batch (64 slices of float32 are 200 MB of fresh pages)."""
        step = self.max_run_batch or len(images)
        parts = [self.session.run(self.output_names, {self.input_name: images[i : i + step].astype(np.float32, copy=False)})
                 for i in range(0, len(images), step)]  # fmt: skip
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([part[k] for part in parts]) for k in range(len(self.output_names))]

    def execute(self, requests: list) -> list:
        batches = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        sizes = [b.shape[0] for b in batches]
        images = batches[0] if len(batches) == 1 else np.concatenate(batches, axis=0)
        outputs = self._run(images)
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
