"""RepGFPN neck (official GiraffeNeckV2): top-down then bottom-up fusion with CSP stages of RepConv blocks."""

from __future__ import annotations

import torch
from torch import nn

from damoyolo.layers import ConvBNAct, DepthwiseSeparable, InvertedResidual, RepConv


class RepBlock(nn.Module):
    """RepConv 3x3 then ConvBNAct 3x3 with a residual (official BasicBlock_3x3_Reverse).

    The nano models replace both convs by one inverted-residual block (``depthwise``).
    """

    def __init__(self, channels: int, hidden_ratio: float, act: str, depthwise: bool = False):
        super().__init__()
        self.depthwise = depthwise
        if depthwise:
            self.conv = InvertedResidual(channels, channels, 1, 3.0, act, se_slot=False)
        else:
            hidden = int(channels * hidden_ratio)
            self.conv1 = ConvBNAct(hidden, channels, 3, act=act)
            self.conv2 = RepConv(channels, hidden, 3, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depthwise:
            return self.conv(x)
        return x + self.conv1(self.conv2(x))


class CSPStage(nn.Module):
    """Split into two 1x1 branches; one runs n RepBlocks; all intermediate outputs are concatenated."""

    def __init__(self, c_in: int, hidden_ratio: float, c_out: int, n: int, act: str, depthwise: bool = False):
        super().__init__()
        c_first = c_out // 2
        c_mid = c_out - c_first
        self.conv1 = ConvBNAct(c_in, c_first, 1, act=act)
        self.conv2 = ConvBNAct(c_in, c_mid, 1, act=act)
        self.convs = nn.Sequential(*[RepBlock(c_mid, hidden_ratio, act, depthwise) for _ in range(n)])
        self.conv3 = ConvBNAct(c_mid * n + c_first, c_out, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.conv1(x)]
        y = self.conv2(x)
        for block in self.convs:
            y = block(y)
            outs.append(y)
        return self.conv3(torch.cat(outs, dim=1))


class GiraffeNeckV2(nn.Module):
    """Inputs (P3, P4, P5) from the backbone, outputs at strides 8, 16, 32 with ``out_channels``.

    Node names follow the official code (x3 ... x7); the order of the concatenations matters for
    loading official weights.
    """

    def __init__(self, in_channels: tuple[int, int, int], out_channels: tuple[int, int, int], depth: float,
                 hidden_ratio: float, act: str, depthwise: bool = False):
        super().__init__()
        c2, c1, c0 = in_channels  # strides 8, 16, 32
        o0, o1, o2 = out_channels
        n = round(3 * depth)

        def down(c: int) -> nn.Module:
            return DepthwiseSeparable(c, c, 3, 2, act) if depthwise else ConvBNAct(c, c, 3, 2, act=act)

        def stage(c_in: int, c_out: int) -> CSPStage:
            return CSPStage(c_in, hidden_ratio, c_out, n, act, depthwise)

        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.bu_conv13 = down(c1)
        self.merge_3 = stage(c1 + c0, c0)
        self.bu_conv24 = down(c2)
        self.merge_4 = stage(c2 + c1 + c0, c1)
        self.merge_5 = stage(c1 + c2, o0)
        self.bu_conv57 = down(o0)
        self.merge_7 = stage(o0 + c1, o1)
        self.bu_conv46 = down(c1)
        self.bu_conv76 = down(o1)
        self.merge_6 = stage(c1 + o1 + c0, o2)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x2, x1, x0 = features
        x3 = self.merge_3(torch.cat([x0, self.bu_conv13(x1)], 1))
        x4 = self.merge_4(torch.cat([x1, self.bu_conv24(x2), self.upsample(x3)], 1))
        x5 = self.merge_5(torch.cat([x2, self.upsample(x4)], 1))
        x7 = self.merge_7(torch.cat([x4, self.bu_conv57(x5)], 1))
        x6 = self.merge_6(torch.cat([x3, self.bu_conv46(x4), self.bu_conv76(x7)], 1))
        return x5, x7, x6
