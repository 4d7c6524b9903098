"""The FPR model in onnxruntime: what the Triton model, the evaluation and the tests run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocess_backend.cubes import CubeSpec
from preprocess_backend.rescoring import check_rule

MAX_RUN_BATCH = 64  # cubes per onnxruntime run: bounds the arena, same speed


@dataclass
class FprModelInfo:
    spec: CubeSpec
    rule: str  # preprocess_backend.rescoring rule
    coefficients: dict[str, Any] | None  # the logistic rule's fitted coefficients (None for the fixed rules)
    operating_threshold: float  # final-confidence threshold chosen on validation data
    candidate_threshold: float  # detector score threshold of the candidates it was trained on
    meta: dict[str, Any]


def read_meta(path: Path) -> FprModelInfo:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    check_rule(str(meta.get("rule", "geometric")), meta.get("rescoring"))  # a broken model refuses here, not mid-request
    return FprModelInfo(
        spec=CubeSpec.from_dict(meta["cube"]),
        rule=str(meta.get("rule", "geometric")),
        coefficients=meta.get("rescoring"),
        operating_threshold=float(meta.get("operating_threshold", 0.5)),
        candidate_threshold=float(meta.get("candidate_threshold", 0.05)),
        meta=meta,
    )


class FprPredictor:
    """uint8 cubes [N, D, H, W] -> nodule probability [N]."""

    def __init__(self, path: Path, threads: int = 0, spinning: bool = True) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.enable_mem_pattern = False
        # served, idle spinning threads take the CPU the cube decoding beside them needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.info = read_meta(Path(path))

    def __call__(self, cubes: np.ndarray) -> np.ndarray:
        cubes = np.ascontiguousarray(cubes, dtype=np.uint8)
        if cubes.shape[0] == 0:
            return np.zeros(0, np.float32)
        parts = [self.session.run(["probability"], {"cubes": cubes[i : i + MAX_RUN_BATCH]})[0] for i in range(0, cubes.shape[0], MAX_RUN_BATCH)]
        return np.concatenate(parts).astype(np.float32).reshape(-1)


class TorchFprPredictor:
    """The same probability from the checkpoint in torch (gpu-torch: on the GPU), interchangeable with
    :class:`FprPredictor`: the module is the one ``export_onnx`` traces (flips averaged, sigmoid)."""

    def __init__(self, checkpoint: Path, device: str = "auto", threads: int = 0) -> None:
        import torch

        from ctlesion_fpr.model import FprProbability, flips_of, load_checkpoint

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # fp32 as in onnxruntime: TF32 convolutions would move probabilities by ~1e-3 near the threshold
            torch.backends.cudnn.allow_tf32 = False
        elif threads > 0:
            torch.set_num_threads(threads)
        net, meta = load_checkpoint(Path(checkpoint))
        self.model = FprProbability(net, flips_of(meta)).to(self.device).eval()
        self.meta = meta

    def __call__(self, cubes: np.ndarray) -> np.ndarray:
        import torch

        cubes = np.ascontiguousarray(cubes, dtype=np.uint8)
        if cubes.shape[0] == 0:
            return np.zeros(0, np.float32)
        with torch.inference_mode():
            parts = [self.model(torch.from_numpy(cubes[i : i + MAX_RUN_BATCH]).to(self.device)).float().cpu().numpy()
                     for i in range(0, cubes.shape[0], MAX_RUN_BATCH)]  # fmt: skip
        return np.concatenate(parts).astype(np.float32).reshape(-1)


def probabilities_per_request(predict: FprPredictor | TorchFprPredictor, batches: list[np.ndarray]) -> list[np.ndarray]:
    """One run over the cubes of every request the dynamic batcher merged, split back: [n_i, 1] each."""
    probs = predict(np.concatenate(batches, axis=0)) if batches else np.zeros(0, np.float32)
    bounds = np.cumsum([0] + [b.shape[0] for b in batches])
    return [probs[a:b].reshape(-1, 1) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
