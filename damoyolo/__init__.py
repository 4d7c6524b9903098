"""DAMO-YOLO in PyTorch, key-compatible with the official checkpoints (tinyvision/DAMO-YOLO, Apache-2.0).

Notes
-----
- Variants ``T S M L`` (640) and nano ``Ns Nm Nl`` (416), built from the official structure
  descriptions (``damoyolo/structures``) and configs (``damoyolo.config``); ``ct`` is our CT default (T).
- ``build_model(variant, num_classes, in_channels)`` gives the training (unfused) form whose
  ``state_dict`` keys and shapes equal an official checkpoint's (``official_keys.json`` holds the
  recorded facts; tests compare). BatchNorm eps 1e-3 / momentum 0.03 are set as the official code
  does after construction. ``model.fuse()`` folds RepConv branches and BatchNorms for deployment.
- Input: float32 [N, C, H, W], values 0..255, H and W multiples of 32 (else ValueError).
  Eval forward returns ``(scores [N, A, C] sigmoid, boxes [N, A, 4] xyxy input pixels)``; the DFL
  integral and anchor decode run inside the model with anchors built from the actual feature
  sizes, so an exported graph has a free batch axis and any multiple-of-32 export size.
  A = (H/8)(W/8) + (H/16)(W/16) + (H/32)(W/32), level by level, row-major.
- Training forward returns :class:`HeadOutputs`; ``compute_loss(outputs, targets)`` with targets
  per image [M, 5] = (class, x1, y1, x2, y2) px: AlignOTA assignment, QFL 1.0 + GIoU 2.0 + DFL 0.25.
- ``load_pretrained(model, checkpoint)`` starts fine-tuning from COCO weights with another class
  count (class convs re-initialised, reported in a :class:`LoadReport`).
- ``python -m damoyolo.variants`` prints params / GFLOPs next to the official table. The official
  "FLOPs (G)" is 2 x thop ops of the RepConv-fused model with BatchNorm kept (see damoyolo.flops).
- Which variant to serve. Measured on the 2-core x86 dev machine, torch 2.13 eager, fused,
  batch 1, 512x512, 1-class head (``python -m damoyolo.bench T Ns Nm Nl --size 512 --threads 1 2``),
  median ms at 1 / 2 threads: T 158 / 109, Ns 102 / 69, Nm 216 / 146, Nl 233 / 186.
  The nano models save FLOPs with depthwise 5x5 convs, which PyTorch's CPU kernels run poorly:
  Nm and Nl are slower than T here, and Ns is only ~1.5x faster than T at 10 points less COCO mAP
  (32.3 vs 42.0). So ``CPU_DEFAULT = "T"`` (ONNX Runtime may shift these ratios: re-measure with the
  exported model before changing it). On a GPU the same T is the default (2.78 ms TRT FP16 on a T4
  officially); S / M buy accuracy at 1.4x / 2x its latency if a GPU budget allows.
"""

from damoyolo.config import VARIANTS, VariantSpec, get_spec
from damoyolo.head import HeadOutputs
from damoyolo.loss import LossOutput, compute_loss
from damoyolo.model import DamoYolo, build_model, check_input_size, fuse_repconv
from damoyolo.pretrained import LoadReport, load_pretrained, unwrap_state_dict

CPU_DEFAULT = "T"
GPU_DEFAULT = "T"

__all__ = [
    "CPU_DEFAULT",
    "GPU_DEFAULT",
    "VARIANTS",
    "DamoYolo",
    "HeadOutputs",
    "LoadReport",
    "LossOutput",
    "VariantSpec",
    "build_model",
    "check_input_size",
    "compute_loss",
    "fuse_repconv",
    "get_spec",
    "load_pretrained",
    "unwrap_state_dict",
]
