"""Training losses of DAMO-YOLO (GFL family) with the official weights and normalisation.

- Quality focal loss (weight 1.0) on all anchors: the target of a positive is the IoU of its
  decoded box with its object; negatives are pushed to 0; focal factor |target - p|^2.
- GIoU loss (weight 2.0) and distribution focal loss (weight 0.25, averaged over the 4 sides)
  on positives, each weighted by the anchor's max class score and normalised by the sum of
  those weights (at least 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from damoyolo.assigner import AlignOTAAssigner, aligned_giou
from damoyolo.head import HeadOutputs, box_to_distance, distance_to_box

QFL_WEIGHT = 1.0
GIOU_WEIGHT = 2.0
DFL_WEIGHT = 0.25


@dataclass
class LossOutput:
    total: torch.Tensor
    qfl: torch.Tensor
    giou: torch.Tensor
    dfl: torch.Tensor
    num_positive: int

    def as_dict(self) -> dict[str, float]:
        return {"total": float(self.total.detach()), "qfl": float(self.qfl.detach()), "giou": float(self.giou.detach()),
                "dfl": float(self.dfl.detach()), "num_positive": float(self.num_positive)}


def quality_focal_loss(scores: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor,
                       beta: float = 2.0) -> torch.Tensor:
    """Per-anchor QFL. scores [A, C] probabilities; labels [A] (-1 = background); quality [A] in 0..1."""
    scores = scores.float()
    loss = F.binary_cross_entropy(scores, torch.zeros_like(scores), reduction="none") * scores.pow(beta)
    pos = (labels >= 0).nonzero().squeeze(1)
    if pos.numel():
        cls = labels[pos]
        p = scores[pos, cls]
        loss[pos, cls] = F.binary_cross_entropy(p, quality[pos], reduction="none") * (quality[pos] - p).abs().pow(beta)
    return loss.sum(1)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-side DFL: cross-entropy towards the two bins around a continuous target. logits [K, R+1], target [K]."""
    left = target.long()
    w_left = (left + 1).float() - target
    w_right = target - left.float()
    return F.cross_entropy(logits, left, reduction="none") * w_left + \
        F.cross_entropy(logits, left + 1, reduction="none") * w_right


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1 - aligned_giou(pred, target)


def _split_targets(target: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.as_tensor(target, dtype=torch.float32, device=device).reshape(-1, 5)
    return target[:, 1:5], target[:, 0].long()


def compute_loss(outputs: HeadOutputs, targets: list[torch.Tensor],
                 assigner: AlignOTAAssigner | None = None) -> LossOutput:
    """Loss of a batch. ``targets[i]``: tensor [M_i, 5] of (class, x1, y1, x2, y2) in input pixels.

    ``outputs`` is the training-mode forward of :class:`damoyolo.model.DamoYolo`.
    """
    assigner = assigner or AlignOTAAssigner()
    scores, logits, priors, reg_max = outputs.cls_scores, outputs.reg_logits, outputs.priors, outputs.reg_max
    n, a, c = scores.shape
    if len(targets) != n:
        raise ValueError(f"{len(targets)} target tensors for a batch of {n}")
    stride = priors[:, 2:3]
    prob = F.softmax(logits, dim=-1)
    project = torch.arange(reg_max + 1, device=logits.device, dtype=prob.dtype)
    boxes = distance_to_box(priors[:, :2], (prob * project).sum(-1) * stride)  # [N, A, 4]

    labels = torch.full((n, a), -1, dtype=torch.long, device=scores.device)
    quality = torch.zeros((n, a), device=scores.device)
    box_targets = torch.zeros((n, a, 4), device=scores.device)
    for i, target in enumerate(targets):
        gt_boxes, gt_labels = _split_targets(target, scores.device)
        if gt_labels.numel() and (gt_labels.min() < 0 or gt_labels.max() >= c):
            raise ValueError(f"image {i}: class ids must be in 0..{c - 1}")
        res = assigner.assign(scores[i].detach(), priors, boxes[i].detach(), gt_boxes, gt_labels)
        pos = res.positive
        labels[i, pos] = res.labels[pos]
        quality[i, pos] = res.iou[pos]
        box_targets[i, pos] = gt_boxes[res.gt_index[pos]]

    labels, quality = labels.reshape(-1), quality.reshape(-1)
    flat_scores = scores.reshape(-1, c)
    pos = (labels >= 0).nonzero().squeeze(1)
    num_pos = int(pos.numel())
    qfl = QFL_WEIGHT * quality_focal_loss(flat_scores, labels, quality).sum() / max(num_pos, 1)
    if num_pos == 0:
        zero = logits.sum() * 0.0  # keeps the graph connected so backward() still works
        return LossOutput(qfl + zero, qfl, zero, zero, 0)

    weight = flat_scores.detach().max(1).values[pos]
    norm = weight.sum().clamp(min=1.0)
    pos_boxes = boxes.reshape(-1, 4)[pos]
    pos_targets = box_targets.reshape(-1, 4)[pos]
    giou = GIOU_WEIGHT * (giou_loss(pos_boxes, pos_targets) * weight).sum() / norm

    pos_stride = stride.repeat(n, 1)[pos]
    pos_points = priors[:, :2].repeat(n, 1)[pos]
    dist_target = box_to_distance(pos_points / pos_stride, pos_targets / pos_stride, reg_max)  # [P, 4] in bins
    dfl = distribution_focal_loss(logits.reshape(-1, 4, reg_max + 1)[pos].reshape(-1, reg_max + 1),
                                  dist_target.reshape(-1))
    dfl = DFL_WEIGHT * (dfl * weight[:, None].expand(-1, 4).reshape(-1)).sum() / (4 * norm)
    return LossOutput(qfl + giou + dfl, qfl, giou, dfl, num_pos)
