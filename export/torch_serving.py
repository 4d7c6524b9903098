"""The detector in torch for the ``gpu-torch`` target: fp16 CUDA graphs per batch bucket, fp32 on CPU.

The tritonserver of the pytriton wheel has no TensorRT or onnxruntime backend, so on a GPU node
without the NGC image the detector runs inside a Python-backend model (model_repository/
detector_torch/1/model.py), which is a thin shell around ``TorchDetector``:

- the committed checkpoint is loaded as ``ctlesion export`` loads it (``load_detector``: strict,
  ``weights_only``), RepConv branches fused;
- on CUDA: fp16 weights, and one CUDA graph per batch bucket (1, 2, 4, ... max batch), captured at
  start-up; a merged batch of n slices is copied (uint8, a quarter of the float bytes) into the
  smallest bucket >= n, the graph replays (cast to fp16, network, decode) and the first n rows are
  returned as float32. Batches above the largest bucket run in chunks of it. Padding rows hold stale
  data; their outputs are never read.
- without CUDA: fp32 eager on the CPU (so the target can be built, served and compared here).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class TorchServingConfig:
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    fp16: bool | None = None  # None: fp16 on CUDA, fp32 on CPU
    cuda_graphs: bool = True  # CUDA only
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    threads: int = 0  # CPU: torch intra-op threads (0: torch's default)

    def __post_init__(self) -> None:
        if not self.buckets or any(b < 1 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"batch buckets must be increasing positive sizes, got {self.buckets}")


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself: 32 -> (1, 2, 4, 8, 16, 32)."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) <= max_batch]
    return tuple(sorted({*sizes, max_batch}))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` rows (``n`` <= the largest bucket)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows exceed the largest bucket {buckets[-1]}")


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    images: Any  # static uint8 input on the device
    scores: Any  # static float32 outputs
    boxes: Any


@dataclass
class TorchDetector:
    """uint8 images [N, C, H, W] -> (scores [N, A, K], boxes [N, A, 4]) float32, as the ONNX detector."""

    checkpoint: Path
    config: TorchServingConfig = field(default_factory=TorchServingConfig)

    def __post_init__(self) -> None:
        import torch

        from ctlesion_export.cli import load_detector

        self.torch = torch
        self.device = resolve_device(self.config.device)
        self.on_cuda = self.device.type == "cuda"
        self.fp16 = self.on_cuda if self.config.fp16 is None else self.config.fp16
        if self.config.threads > 0 and not self.on_cuda:
            torch.set_num_threads(self.config.threads)
        model, meta = load_detector(self.checkpoint)
        self.channels, self.size = int(meta["in_channels"]), int(meta["model_size"])
        self.dtype = torch.float16 if self.fp16 else torch.float32
        self.model = model.fuse().eval().to(self.device, self.dtype)
        self.graphs: dict[int, _Graph] = {}
        self.bucket_counts: dict[int, int] = {}  # executions per bucket, for the logs / bench

    @property
    def uses_graphs(self) -> bool:
        return self.on_cuda and self.config.cuda_graphs

    def _forward(self, images_u8: Any) -> tuple[Any, Any]:
        scores, boxes = self.model(images_u8.to(self.dtype))
        return scores.float(), boxes.float()

    def capture(self, bucket: int) -> _Graph:
        """Warm up on a side stream, then record one graph for batches of ``bucket`` rows."""
        torch = self.torch
        static = torch.zeros((bucket, self.channels, self.size, self.size), dtype=torch.uint8, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):  # cuDNN picks its kernels before capture
                self._forward(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            scores, boxes = self._forward(static)
        entry = _Graph(graph, static, scores, boxes)
        self.graphs[bucket] = entry
        return entry

    def warmup(self) -> None:
        """Capture every bucket's graph (CUDA), or run one batch (CPU), before the first request."""
        if self.uses_graphs:
            for bucket in self.config.buckets:
                self.capture(bucket)
            self.torch.cuda.synchronize(self.device)
        else:
            self(np.zeros((1, self.channels, self.size, self.size), dtype=np.uint8))
        log.info("torch detector on %s (%s), buckets %s, graphs %s", self.device,
                 "fp16" if self.fp16 else "fp32", self.config.buckets, sorted(self.graphs))  # fmt: skip

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if images.ndim != 4 or images.shape[1:] != (self.channels, self.size, self.size):
            raise ValueError(f"images must be [N, {self.channels}, {self.size}, {self.size}], got {list(images.shape)}")
        largest = self.config.buckets[-1]
        parts = [self._run(images[i : i + largest]) for i in range(0, len(images), largest)]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _run(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        n = len(chunk)
        host = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.uint8))
        if not self.uses_graphs:
            self.bucket_counts[n] = self.bucket_counts.get(n, 0) + 1
            with torch.inference_mode():
                scores, boxes = self._forward(host.to(self.device))
            return scores.cpu().numpy(), boxes.cpu().numpy()
        bucket = bucket_for(n, self.config.buckets)
        self.bucket_counts[bucket] = self.bucket_counts.get(bucket, 0) + 1
        entry = self.graphs.get(bucket) or self.capture(bucket)
        entry.images[:n].copy_(host)
        entry.graph.replay()
        # .cpu() waits for the replay on the current stream; clone-free: numpy copies are made below
        return entry.scores[:n].cpu().numpy(), entry.boxes[:n].cpu().numpy()


def resolve_device(spec: str) -> Any:
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} asked for, but torch sees no CUDA device")
    return device


def run_merged(detector: TorchDetector, batches: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The requests the dynamic batcher merged: one detector run, outputs split back per request."""
    sizes = [len(b) for b in batches]
    scores, boxes = detector(np.concatenate(batches, axis=0) if len(batches) > 1 else batches[0])
    out, start = [], 0
    for size in sizes:
        out.append((np.ascontiguousarray(scores[start : start + size]), np.ascontiguousarray(boxes[start : start + size])))
        start += size
    return out


def probe_signature(checkpoint: Path, config: Any = None) -> Any:
    """repo_check hook: the tensors the torch detector reads and produces, from one CPU fp32 run."""
    from ctlesion_export.repo_check import Signature, TensorSig

    detector = TorchDetector(checkpoint, TorchServingConfig(device="cpu", cuda_graphs=False))
    scores, boxes = detector(np.zeros((1, detector.channels, detector.size, detector.size), dtype=np.uint8))
    return Signature(
        [TensorSig("images", "UINT8", (-1, detector.channels, detector.size, detector.size))],
        [TensorSig("scores", "FP32" if scores.dtype == np.float32 else str(scores.dtype), (-1, *scores.shape[1:])),
         TensorSig("boxes", "FP32" if boxes.dtype == np.float32 else str(boxes.dtype), (-1, *boxes.shape[1:]))],
    )  # fmt: skip


def model_info(checkpoint: Path) -> Any:
    """The detector's geometry (as ``inspect_onnx`` reports it for an ONNX) from one CPU probe run."""
    import torch

    from ctlesion_export.cli import checkpoint_scale
    from ctlesion_export.onnx_export import OnnxModelInfo

    sig = probe_signature(checkpoint, None)
    (images,), (scores, _) = sig.inputs, sig.outputs
    _, channels, height, width = images.shape
    meta = torch.load(str(checkpoint), map_location="cpu", weights_only=True).get("meta") or {}
    return OnnxModelInfo(path=Path(checkpoint), channels=channels, height=height, width=width,
                         num_classes=scores.shape[2], num_anchors=scores.shape[1], quantized=False,
                         **checkpoint_scale(meta))  # fmt: skip
