"""ZeroHead: per level one conv for class scores and one for the box distribution (GFL), no shared tower.

Boxes are regressed as distances (left, top, right, bottom) from an anchor point, each as a
discrete distribution over 0..reg_max in units of the level's stride (distribution focal loss).
Anchor points are (i * stride, j * stride) -- the official convention, without a +0.5 offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

STRIDES = (8, 16, 32)


@dataclass
class HeadOutputs:
    """Training-mode output: what the loss needs, before any decoding."""

    cls_scores: torch.Tensor  # [N, A, C] sigmoid probabilities (QFL works on probabilities)
    reg_logits: torch.Tensor  # [N, A, 4, reg_max + 1] distribution logits
    priors: torch.Tensor  # [A, 4] anchor x, y, stride, stride (input pixels)
    reg_max: int


class Scale(nn.Module):
    """A learnable scalar multiplier (key ``scale``, shape [])."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Integral(nn.Module):
    """Expected value of a distribution over 0..reg_max (buffer ``project`` is part of the state_dict)."""

    def __init__(self, reg_max: int):
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))

    def forward(self, prob: torch.Tensor) -> torch.Tensor:
        return (prob * self.project.to(prob.dtype)).sum(-1)


def anchor_points(sizes: list[tuple[int, int]], strides: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[A, 4] (x, y, stride, stride) for feature maps of the given (H, W), row-major per level."""
    levels = []
    for (h, w), s in zip(sizes, strides, strict=True):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype) * s,
                                torch.arange(w, device=device, dtype=dtype) * s, indexing="ij")
        st = torch.full_like(xs, float(s))
        levels.append(torch.stack([xs, ys, st, st], dim=-1).reshape(-1, 4))
    return torch.cat(levels, dim=0)


def distance_to_box(points: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """(x, y) and (l, t, r, b) distances -> (x1, y1, x2, y2)."""
    return torch.cat([points - dist[..., :2], points + dist[..., 2:]], dim=-1)


def box_to_distance(points: torch.Tensor, boxes: torch.Tensor, max_dist: float, eps: float = 0.1) -> torch.Tensor:
    """Inverse of :func:`distance_to_box`, clamped to [0, max_dist - eps] (a valid DFL target)."""
    dist = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    return dist.clamp(min=0, max=max_dist - eps)


class ZeroHead(nn.Module):
    def __init__(self, num_classes: int, in_channels: tuple[int, ...], reg_max: int = 16, last_kernel_size: int = 3,
                 strides: tuple[int, ...] = STRIDES):
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)
        # Registered first, like the official head, so that the state_dict order matches too.
        self.integral = Integral(reg_max)
        k = last_kernel_size
        self.gfl_cls = nn.ModuleList(nn.Conv2d(c, num_classes, k, padding=k // 2) for c in in_channels)
        self.gfl_reg = nn.ModuleList(nn.Conv2d(c, 4 * (reg_max + 1), k, padding=k // 2) for c in in_channels)
        self.scales = nn.ModuleList(Scale(1.0) for _ in in_channels)
        self.reset_class_layers()
        for conv in self.gfl_reg:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def reset_class_layers(self, prior_prob: float = 0.01) -> None:
        """Official init: small weights, bias so that every score starts near ``prior_prob``."""
        for conv in self.gfl_cls:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, -math.log((1 - prior_prob) / prior_prob))

    def _level(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        cls = self.gfl_cls[i](x).sigmoid().flatten(2).transpose(1, 2)  # [N, HW, C]
        reg = self.scales[i](self.gfl_reg[i](x)).float()
        reg = reg.reshape(n, 4, self.reg_max + 1, h * w).permute(0, 3, 1, 2)  # [N, HW, 4, R+1]
        return cls, reg

    def forward(self, feats: tuple[torch.Tensor, ...]) -> HeadOutputs | tuple[torch.Tensor, torch.Tensor]:
        cls_list, reg_list = zip(*(self._level(i, x) for i, x in enumerate(feats)), strict=True)
        cls_scores = torch.cat(cls_list, dim=1)
        reg_logits = torch.cat(reg_list, dim=1)
        # Anchors come from the actual feature sizes on every call: nothing size- or batch-specific
        # is baked into an exported graph (the official export's fixed-constant defect, issue #93).
        priors = anchor_points([tuple(f.shape[-2:]) for f in feats], self.strides, feats[0].device)
        if self.training:
            return HeadOutputs(cls_scores, reg_logits, priors, self.reg_max)
        return cls_scores, self.decode(reg_logits, priors)

    def decode(self, reg_logits: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
        """Distribution logits [N, A, 4, R+1] -> boxes [N, A, 4] xyxy in input pixels."""
        dist = self.integral(F.softmax(reg_logits, dim=-1)) * priors[:, 2:3]
        return distance_to_box(priors[:, :2], dist)
