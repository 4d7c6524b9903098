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
- CPU serving default for 512x512 CT: see ``CPU_DEFAULT`` below and the timing notes in the
  lead's README (measured with ``python -m damoyolo.bench``).
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
