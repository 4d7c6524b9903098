"""The detector: backbone -> neck -> head, plus build / fuse helpers."""

from __future__ import annotations

import torch
from torch import nn

from damoyolo.backbone import TinyNASCSP, TinyNASMob, TinyNASRes, read_structure
from damoyolo.config import VariantSpec, get_spec
from damoyolo.head import HeadOutputs, ZeroHead
from damoyolo.layers import BN_EPS, BN_MOMENTUM, RepConv
from damoyolo.neck import GiraffeNeckV2

SIZE_MULTIPLE = 32  # the coarsest stride: H and W must divide by it


class DamoYolo(nn.Module):
    """DAMO-YOLO. Eval forward: ``(scores [N, A, C], boxes [N, A, 4] xyxy px)``; train forward: :class:`HeadOutputs`.

    Input: float32 [N, C, H, W] with values 0..255 (no mean/std, as the official model).
    """

    def __init__(self, spec: VariantSpec, num_classes: int = 1, in_channels: int = 3):
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError("num_classes and in_channels must be >= 1")
        self.spec, self.num_classes, self.in_channels = spec, num_classes, in_channels
        structure = read_structure(spec.structure)
        if spec.backbone == "res":
            self.backbone: nn.Module = TinyNASRes(structure, in_channels, spec.out_indices, spec.act)
        elif spec.backbone == "csp":
            self.backbone = TinyNASCSP(structure, in_channels, spec.out_indices, spec.act)
        else:
            self.backbone = TinyNASMob(structure, in_channels, spec.out_indices, spec.act)
        self.neck = GiraffeNeckV2(spec.neck_in, spec.neck_out, spec.depth, spec.hidden_ratio, spec.act,
                                  spec.depthwise)
        self.head = ZeroHead(num_classes, spec.neck_out, spec.reg_max, spec.head_kernel)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = BN_EPS, BN_MOMENTUM

    @property
    def variant(self) -> str:
        return self.spec.name

    def forward(self, images: torch.Tensor) -> HeadOutputs | tuple[torch.Tensor, torch.Tensor]:
        check_input_size(images)
        return self.head(self.neck(self.backbone(images)))

    def fuse(self) -> DamoYolo:
        """Re-parameterise for deployment (RepConv branches and every BatchNorm folded); eval mode."""
        fuse_repconv(self)
        return self

    def compute_loss(self, outputs: HeadOutputs, targets: list[torch.Tensor]):  # noqa: ANN201 (avoids a cycle)
        from damoyolo.loss import compute_loss

        return compute_loss(outputs, targets)


def check_input_size(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    # Plain ints while tracing for ONNX with fixed H/W; the check costs nothing at run time.
    if int(h) % SIZE_MULTIPLE or int(w) % SIZE_MULTIPLE:
        raise ValueError(f"input height and width must be multiples of {SIZE_MULTIPLE}, got {int(h)}x{int(w)}")


@torch.no_grad()
def fuse_repconv(model: nn.Module, conv_bn: bool = True) -> nn.Module:
    """Re-parameterise in place for deployment (sets eval mode); idempotent.

    Every RepConv becomes one biased 3x3 conv; with ``conv_bn`` (default) every conv + BatchNorm
    pair is folded too, which is what we export. ``conv_bn=False`` gives the official converter's
    deploy form (RepConv only), the one its params / FLOPs table describes.
    """
    model.eval()
    for m in list(model.modules()):
        if isinstance(m, RepConv) or (conv_bn and m is not model and callable(getattr(m, "fuse", None))):
            m.fuse()
    return model


def build_model(variant: str, num_classes: int = 1, in_channels: int = 3) -> DamoYolo:
    """Build ``T S M L Ns Nm Nl`` (or ``ct`` = T) in its training (unfused) form."""
    return DamoYolo(get_spec(variant), num_classes=num_classes, in_channels=in_channels)
