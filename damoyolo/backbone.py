"""TinyNAS (MAE-NAS) backbones built from the official structure descriptions.

Three families, as in the official code:
- ``res`` (T, S): Focus stem, stages of ResConvBlock (conv2 is a RepConv), SPP after the first block
  of the last stage; features taken after structure entries 2, 4, 5.
- ``csp`` (M, L): the same stages wrapped in CSP (downsampler, split, blocks, concat, fuse);
  entries 3 and 4 share one wrapper; features after wrapper 2, 3, 4.
- ``mob`` (nano): strided 3x3 stem, MobileNetV3-style inverted residual stages whose expansion
  grows with depth (3.5, 4.0, ...), SPP in the last stage.
"""

from __future__ import annotations

import ast
from functools import cache
from importlib import resources
from typing import Any

import torch
from torch import nn

from damoyolo.layers import ConvBN, ConvBNReLU, Focus, InvertedResidual, RepConv, SPPBottleneck, activation

StructureEntry = dict[str, Any]


@cache
def read_structure(name: str) -> tuple[StructureEntry, ...]:
    """Parse ``damoyolo/structures/<name>.txt`` (a Python literal list; ``#`` lines are comments)."""
    text = resources.files("damoyolo").joinpath("structures", f"{name}.txt").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    entries = ast.literal_eval(body)
    if not entries or entries[0]["class"] != "ConvKXBNRELU":
        raise ValueError(f"structure {name}: first entry must be the stem")
    return tuple(entries)


class ResConvBlock(nn.Module):
    """1x1 (k1kx) or kxk (kxkx) conv, then a kxk conv (RepConv when reparam), residual unless strided."""

    def __init__(self, c_in: int, c_out: int, btn: int, k: int, stride: int, act: str, reparam: bool, kxkx: bool):
        super().__init__()
        self.stride = stride
        self.conv1 = ConvBN(c_in, btn, k if kxkx else 1, 1)
        self.conv2: nn.Module = RepConv(btn, c_out, k, stride, act="identity") if reparam else ConvBN(btn, c_out, k, stride)
        self.activation_function = activation(act)
        # A projection only where the residual needs one (never on strided blocks, which drop it).
        self.residual_proj = ConvBN(c_in, c_out, 1, 1) if (c_in != c_out and stride != 2) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.activation_function(self.conv1(x)))
        if self.stride != 2:
            y = y + (self.residual_proj(x) if self.residual_proj is not None else x)
        return self.activation_function(y)


class Stage(nn.Module):
    """A sequence of blocks under ``block_list`` (official SuperResStem)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block_list = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block_list:
            x = block(x)
        return x


class _Backbone(nn.Module):
    """Runs the stages in order and returns the features at ``out_indices`` (strides 8, 16, 32)."""

    out_indices: tuple[int, ...]

    def _stages(self) -> nn.ModuleList:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for idx, stage in enumerate(self._stages()):
            x = stage(x)
            if idx in self.out_indices:
                features.append(x)
        return features


def _stem(entry: StructureEntry, in_channels: int, use_focus: bool, act: str, stride: int) -> nn.Module:
    if use_focus:
        return Focus(in_channels, entry["out"], entry["k"], act=act)
    return ConvBNReLU(in_channels, entry["out"], entry["k"], stride, act=act)


class TinyNASRes(_Backbone):
    def __init__(self, structure: tuple[StructureEntry, ...], in_channels: int, out_indices: tuple[int, ...],
                 act: str, reparam: bool = True, use_focus: bool = True, with_spp: bool = True):
        super().__init__()
        self.out_indices = out_indices
        self.block_list = nn.ModuleList([_stem(structure[0], in_channels, use_focus, act, structure[0]["s"])])
        last = len(structure) - 1
        for idx, e in enumerate(structure[1:], start=1):
            kxkx = e["class"] == "SuperResConvKXKX"
            blocks: list[nn.Module] = []
            for j in range(e["L"]):
                c_in, stride = (e["in"], e["s"]) if j == 0 else (e["out"], 1)
                blocks.append(ResConvBlock(c_in, e["out"], e["btn"], e["k"], stride, act, reparam, kxkx))
                if j == 0 and with_spp and idx == last:
                    blocks.append(SPPBottleneck(e["out"], e["out"]))
            self.block_list.append(Stage(blocks))

    def _stages(self) -> nn.ModuleList:
        return self.block_list


class CSPWrapper(nn.Module):
    """Strided 3x3 downsampler (+SPP), then CSP: half through the blocks, half shortcut, concat, 1x1 fuse."""

    def __init__(self, c_in: int, c_out: int, hidden: int, blocks: list[nn.Module], with_spp: bool):
        super().__init__()
        act = "relu"  # the official wrapper's own convs are ReLU whatever the model's activation
        self.convstem = nn.ModuleList(blocks)
        self.downsampler = ConvBNReLU(c_in, hidden * 2, 3, 2, act=act)
        self.spp = SPPBottleneck(hidden * 2, hidden * 2) if with_spp else None
        self.conv_start = ConvBNReLU(hidden * 2, hidden, 1, 1, act=act)
        self.conv_shortcut = ConvBNReLU(hidden * 2, c_out // 2, 1, 1, act=act)
        self.conv_fuse = ConvBNReLU(c_out, c_out, 1, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsampler(x)
        if self.spp is not None:
            x = self.spp(x)
        shortcut = self.conv_shortcut(x)
        x = self.conv_start(x)
        for block in self.convstem:
            x = block(x)
        return self.conv_fuse(torch.cat((x, shortcut), dim=1))


class TinyNASCSP(_Backbone):
    def __init__(self, structure: tuple[StructureEntry, ...], in_channels: int, out_indices: tuple[int, ...],
                 act: str, reparam: bool = True, use_focus: bool = True, with_spp: bool = True):
        super().__init__()
        if len(structure) != 6:
            raise ValueError("the CSP backbone expects a stem and five stages")
        self.out_indices = out_indices

        def blocks(e: StructureEntry) -> list[nn.Module]:
            # A strided stage gives its first block's stride to the wrapper's downsampler.
            n = e["L"] - 1 if e["s"] == 2 else e["L"]
            half = e["out"] // 2
            kxkx = e["class"] == "SuperResConvKXKX"
            return [
                ResConvBlock(e["in"] // 2 if (e["s"] == 1 and j == 0) else half, half, e["btn"], e["k"], 1, act,
                             reparam, kxkx)
                for j in range(n)
            ]

        s = structure
        self.csp_stage = nn.ModuleList([
            _stem(s[0], in_channels, use_focus, act, s[0]["s"]),
            CSPWrapper(s[1]["in"], s[1]["out"], s[1]["out"] // 2, blocks(s[1]), False),
            CSPWrapper(s[2]["in"], s[2]["out"], s[2]["out"] // 2, blocks(s[2]), False),
            CSPWrapper(s[3]["in"], s[4]["out"], s[3]["out"] // 2, blocks(s[3]) + blocks(s[4]), False),
            CSPWrapper(s[5]["in"], s[5]["out"], s[5]["out"] // 2, blocks(s[5]), with_spp),
        ])

    def _stages(self) -> nn.ModuleList:
        return self.csp_stage


class TinyNASMob(_Backbone):
    def __init__(self, structure: tuple[StructureEntry, ...], in_channels: int, out_indices: tuple[int, ...],
                 act: str, with_spp: bool = True):
        super().__init__()
        self.out_indices = out_indices
        self.block_list = nn.ModuleList([_stem(structure[0], in_channels, False, act, 2)])
        last = len(structure) - 1
        for idx, e in enumerate(structure[1:], start=1):
            expand = 3.5 + (idx - 1) * 0.5  # deeper stages expand more (official block_pos rule)
            blocks: list[nn.Module] = []
            for j in range(e["L"]):
                c_in, stride = (e["in"], e["s"]) if j == 0 else (e["out"], 1)
                blocks.append(InvertedResidual(c_in, e["out"], stride, expand, act, se_slot=True))
                if j == 0 and with_spp and idx == last:
                    blocks.append(SPPBottleneck(e["out"], e["out"]))
            self.block_list.append(Stage(blocks))

    def _stages(self) -> nn.ModuleList:
        return self.block_list
