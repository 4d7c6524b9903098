"""Building blocks shared by backbone, neck and head.

Attribute names (``conv``/``bn``, ``conv1``/``bn1``, ``rbr_dense``/``rbr_1x1``, ...) are chosen so
that ``state_dict()`` keys equal those of the official DAMO-YOLO checkpoints; do not rename them.
Every block that holds a BatchNorm has a ``fuse()`` method that folds it for deployment.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# The official detector overrides every BatchNorm after construction (Detector.init_bn);
# the values are not stored in checkpoints, so they must be set here.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def activation(name: str | None) -> nn.Module:
    """Activation by name; not in-place, so hooks and autograd never see a tensor change under them."""
    if name in (None, "identity"):
        return nn.Identity()
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unsupported activation {name!r} (relu, silu, identity)")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without dropping more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a biased conv equal to ``bn(conv(x))`` in eval mode."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def _fold_sequential(seq: nn.Sequential) -> None:
    """Fold every Conv2d directly followed by a BatchNorm2d inside a Sequential (BN -> Identity)."""
    for i in range(len(seq) - 1):
        if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
            seq[i] = fold_bn(seq[i], seq[i + 1])
            seq[i + 1] = nn.Identity()


class ConvBNAct(nn.Module):
    """conv -> bn -> act ("same" padding); keys ``conv.*``, ``bn.*`` (official ConvBNAct)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: str | None = "silu"):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False)
        self.bn: nn.Module = batch_norm(c_out)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuse(self) -> None:
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fold_bn(self.conv, self.bn)
            self.bn = nn.Identity()


class ConvBN(nn.Module):
    """conv -> bn without activation; keys ``conv1.*``, ``bn1.*`` (official ConvKXBN)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, bias=False)
        self.bn1: nn.Module = batch_norm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))

    def fuse(self) -> None:
        if isinstance(self.bn1, nn.BatchNorm2d):
            self.conv1 = fold_bn(self.conv1, self.bn1)
            self.bn1 = nn.Identity()


class ConvBNReLU(nn.Module):
    """ConvBN + activation under ``conv.*`` (official ConvKXBNRELU)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, act: str = "relu"):
        super().__init__()
        self.conv = ConvBN(c_in, c_out, k, stride)
        self.activation_function = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation_function(self.conv(x))


class RepConv(nn.Module):
    """3x3 conv+BN in parallel with 1x1 conv+BN (no identity branch), summed, then activation.

    ``fuse()`` pads the 1x1 kernel to 3x3 and sums both folded branches into one biased
    conv ``rbr_reparam``: the same function in eval mode, one conv instead of two at run time.
    """

    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1, act: str | None = "relu"):
        super().__init__()
        if k != 3:
            raise ValueError("RepConv is defined for 3x3 kernels only")
        self.in_channels, self.out_channels, self.stride = c_in, c_out, stride
        self.nonlinearity = activation(act)
        self.rbr_dense = self._branch(c_in, c_out, 3, stride, 1)
        self.rbr_1x1 = self._branch(c_in, c_out, 1, stride, 0)
        self.rbr_reparam: nn.Conv2d | None = None

    @staticmethod
    def _branch(c_in: int, c_out: int, k: int, stride: int, pad: int) -> nn.Sequential:
        branch = nn.Sequential()
        branch.add_module("conv", nn.Conv2d(c_in, c_out, k, stride, pad, bias=False))
        branch.add_module("bn", batch_norm(c_out))
        return branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return self.nonlinearity(self.rbr_reparam(x))
        return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x))

    @torch.no_grad()
    def fuse(self) -> None:
        if self.rbr_reparam is not None:
            return
        dense = fold_bn(self.rbr_dense.conv, self.rbr_dense.bn)
        point = fold_bn(self.rbr_1x1.conv, self.rbr_1x1.bn)
        dense.weight.add_(F.pad(point.weight, [1, 1, 1, 1]))
        dense.bias.add_(point.bias)
        self.rbr_reparam = dense
        del self.rbr_dense, self.rbr_1x1


class Focus(nn.Module):
    """Space-to-depth (2x2 pixel groups into channels) then ConvBNAct; halves H and W."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, act: str = "silu"):
        super().__init__()
        self.conv = ConvBNAct(c_in * 4, c_out, k, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The order (top-left, bottom-left, top-right, bottom-right) is the official one:
        # the stem weights of a checkpoint depend on it.
        x = torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), dim=1)
        return self.conv(x)


class SPPBottleneck(nn.Module):
    """1x1 reduce, max-pools 5/9/13 concatenated, 1x1 project (YOLOv3-SPP); SiLU as in the official code."""

    def __init__(self, c_in: int, c_out: int, kernel_sizes: tuple[int, ...] = (5, 9, 13), act: str = "silu"):
        super().__init__()
        hidden = c_in // 2
        self.conv1 = ConvBNAct(c_in, hidden, 1, act=act)
        self.m = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.conv2 = ConvBNAct(hidden * (len(kernel_sizes) + 1), c_out, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.m], dim=1))


class DepthwiseSeparable(nn.Module):
    """Depthwise kxk + BN + act, pointwise 1x1 + BN + act (official DepthwiseConv, nano neck)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, act: str = "silu"):
        super().__init__()
        # Registration order (convs before norms) is the official state_dict order.
        self.depthwise = nn.Conv2d(c_in, c_in, k, stride, (k - 1) // 2, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.dwnorm: nn.Module = batch_norm(c_in)
        self.pwnorm: nn.Module = batch_norm(c_out)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.dwnorm(self.depthwise(x)))
        return self.act(self.pwnorm(self.pointwise(x)))

    def fuse(self) -> None:
        if isinstance(self.dwnorm, nn.BatchNorm2d):
            self.depthwise = fold_bn(self.depthwise, self.dwnorm)
            self.pointwise = fold_bn(self.pointwise, self.pwnorm)
            self.dwnorm, self.pwnorm = nn.Identity(), nn.Identity()


class InvertedResidual(nn.Module):
    """MobileNetV3-style block: 1x1 expand, 5x5 depthwise (stride), 1x1 project; residual when shapes allow.

    ``se_slot`` keeps the (empty) squeeze-excitation position of the backbone version, which shifts
    the Sequential indices of the keys (``conv.7`` vs ``conv.6`` for the projection).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expand: float, act: str = "silu", se_slot: bool = False):
        super().__init__()
        hidden = make_divisible(math.ceil(c_out * expand))
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, hidden, 1, bias=False),
            batch_norm(hidden),
            activation(act),
            nn.Conv2d(hidden, hidden, 5, stride, 2, groups=hidden, bias=False),
            batch_norm(hidden),
        ]
        if se_slot:
            layers.append(nn.Identity())
        layers += [activation(act), nn.Conv2d(hidden, c_out, 1, bias=False), batch_norm(c_out)]
        self.conv = nn.Sequential(*layers)
        self.use_shortcut = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_shortcut else y

    def fuse(self) -> None:
        _fold_sequential(self.conv)
