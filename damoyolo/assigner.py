"""AlignOTA label assignment (DAMO-YOLO's SimOTA variant) and box IoU helpers.

Candidates are anchors inside a ground-truth box or within ``center_radius`` strides of its centre.
The cost of (anchor, object) = classification cost (BCE of the predicted score against the
IoU-valued soft label, focal-scaled) + ``iou_weight`` x -log(IoU) + a prohibitive term unless the
anchor is both inside the box and near its centre. Each object takes its k cheapest anchors with
k = max(1, int(sum of its top-``candidate_topk`` IoUs)); an anchor claimed twice goes to its
cheapest object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: [N, 4] x [M, 4] -> [N, M]."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=eps)


def aligned_giou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Generalised IoU of matching rows: [N, 4] x [N, 4] -> [N]."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = (area_a + area_b - inter).clamp(min=eps)
    enclose = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return inter / union - (enclose - union) / enclose.clamp(min=eps)


@dataclass
class AssignResult:
    """Per anchor: ``gt_index`` (-1 = background), the IoU of its prediction with that object, its label."""

    gt_index: torch.Tensor  # [A] long
    iou: torch.Tensor  # [A] float, 0 for background
    labels: torch.Tensor  # [A] long, -1 for background

    @property
    def positive(self) -> torch.Tensor:
        return self.gt_index >= 0

    @property
    def num_positive(self) -> int:
        return int(self.positive.sum())


@dataclass
class AlignOTAAssigner:
    center_radius: float = 2.5
    candidate_topk: int = 10
    iou_weight: float = 3.0
    cls_weight: float = 1.0

    @torch.no_grad()
    def assign(self, scores: torch.Tensor, priors: torch.Tensor, boxes: torch.Tensor, gt_boxes: torch.Tensor,
               gt_labels: torch.Tensor) -> AssignResult:
        """scores [A, C] probabilities, priors [A, 4] (x, y, stride, stride), boxes [A, 4] decoded predictions."""
        num_anchors = priors.shape[0]
        gt_index = torch.full((num_anchors,), -1, dtype=torch.long, device=priors.device)
        iou_out = torch.zeros(num_anchors, device=priors.device)
        labels = torch.full_like(gt_index, -1)
        if gt_boxes.shape[0] == 0 or num_anchors == 0:
            return AssignResult(gt_index, iou_out, labels)

        candidate, in_box_and_centre = self._candidates(priors, gt_boxes)
        if not candidate.any():
            return AssignResult(gt_index, iou_out, labels)
        ious = box_iou(boxes[candidate], gt_boxes)  # [V, G]
        iou_cost = -torch.log(ious + 1e-7)
        soft = F.one_hot(gt_labels.long(), scores.shape[-1]).float()[None] * ious[..., None]  # [V, G, C]
        pred = scores[candidate].float()[:, None, :].expand_as(soft)
        cls_cost = (F.binary_cross_entropy(pred, soft, reduction="none") * (soft - pred).abs().pow(2)).sum(-1)
        cost = cls_cost * self.cls_weight + iou_cost * self.iou_weight + (~in_box_and_centre).float() * 1e8

        matched, matched_iou, matched_gt = self._dynamic_k(cost, ious)
        idx = candidate.nonzero().squeeze(1)[matched]
        gt_index[idx] = matched_gt
        iou_out[idx] = matched_iou
        labels[idx] = gt_labels[matched_gt].long()
        return AssignResult(gt_index, iou_out, labels)

    def _candidates(self, priors: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, stride = priors[:, 0:1], priors[:, 1:2], priors[:, 2:3]  # [A, 1]
        in_box = torch.stack([x - gt[:, 0], y - gt[:, 1], gt[:, 2] - x, gt[:, 3] - y], -1).amin(-1) > 0  # [A, G]
        cx, cy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
        r = self.center_radius * stride
        in_centre = torch.stack([x - (cx - r), y - (cy - r), (cx + r) - x, (cy + r) - y], -1).amin(-1) > 0
        candidate = in_box.any(1) | in_centre.any(1)
        return candidate, (in_box & in_centre)[candidate]

    def _dynamic_k(self, cost: torch.Tensor, ious: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        matching = torch.zeros_like(cost)
        topk = min(self.candidate_topk, ious.shape[0])
        ks = ious.topk(topk, dim=0).values.sum(0).int().clamp(min=1)
        for g in range(cost.shape[1]):
            matching[cost[:, g].topk(int(ks[g]), largest=False).indices, g] = 1.0
        shared = matching.sum(1) > 1
        if shared.any():  # an anchor claimed by several objects goes to the cheapest
            best = cost[shared].argmin(1)
            matching[shared] = 0.0
            matching[shared.nonzero().squeeze(1), best] = 1.0
        matched = matching.sum(1) > 0
        matched_gt = matching[matched].argmax(1)
        matched_iou = (matching * ious).sum(1)[matched]
        return matched, matched_iou, matched_gt
