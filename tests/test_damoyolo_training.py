"""Training pieces on hand-made cases: AlignOTA, QFL / DFL / GIoU, compute_loss, pretrained loading."""

from __future__ import annotations

import math

import pytest
import torch

import damoyolo
from damoyolo.assigner import AlignOTAAssigner, aligned_giou, box_iou
from damoyolo.head import HeadOutputs, anchor_points
from damoyolo.loss import distribution_focal_loss, quality_focal_loss


def test_official_default_weights() -> None:
    a = AlignOTAAssigner()
    assert (a.center_radius, a.candidate_topk, a.iou_weight, a.cls_weight) == (2.5, 10, 3.0, 1.0)
    from damoyolo import loss

    assert (loss.QFL_WEIGHT, loss.GIOU_WEIGHT, loss.DFL_WEIGHT) == (1.0, 2.0, 0.25)


def test_iou_helpers() -> None:
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[50 / 150, 0.0]]))
    # disjoint boxes: GIoU = -(enclosing area - union) / enclosing area
    g = aligned_giou(a, torch.tensor([[20.0, 0, 30, 10]]))
    assert math.isclose(g.item(), -(300 - 200) / 300, rel_tol=1e-5)


def _grid_case() -> tuple[torch.Tensor, torch.Tensor]:
    priors = anchor_points([(8, 8), (4, 4), (2, 2)], (8, 16, 32), torch.device("cpu"))
    return priors, torch.tensor([[8.0, 8, 24, 24], [40, 36, 60, 60]])


def test_assigner_gives_each_object_anchors_at_it() -> None:
    priors, gt = _grid_case()
    # predictions: every anchor predicts a 16x16 box centred on itself
    boxes = torch.cat([priors[:, :2] - 8, priors[:, :2] + 8], 1)
    scores = torch.full((priors.shape[0], 2), 0.1)
    res = AlignOTAAssigner().assign(scores, priors, boxes, gt, torch.tensor([0, 1]))
    for g in range(2):
        idx = (res.gt_index == g).nonzero().squeeze(1)
        assert idx.numel() >= 1
        p = priors[idx]
        inside = (p[:, 0] > gt[g, 0]) & (p[:, 0] < gt[g, 2]) & (p[:, 1] > gt[g, 1]) & (p[:, 1] < gt[g, 3])
        assert inside.any()
        # all are candidates: inside the box or within 2.5 strides of its centre (when k exceeds the
        # anchors that are both, the official rule fills up from the candidates, as here)
        c = (gt[g, :2] + gt[g, 2:]) / 2
        near = ((p[:, :2] - c).abs() < 2.5 * p[:, 2:3]).all(1)
        assert (inside | near).all()
        assert (res.labels[idx] == g).all() and (res.iou[idx] > 0).all()
    # the anchor whose prediction equals the first object is assigned to it with IoU 1
    exact = ((priors[:, 0] == 16) & (priors[:, 1] == 16) & (priors[:, 2] == 8)).nonzero().item()
    assert res.gt_index[exact] == 0 and math.isclose(res.iou[exact].item(), 1.0, rel_tol=1e-5)
    assert (res.labels[res.gt_index < 0] == -1).all()


def test_assigner_without_objects() -> None:
    priors, _ = _grid_case()
    res = AlignOTAAssigner().assign(torch.rand(84, 1), priors, torch.rand(84, 4), torch.zeros(0, 4),
                                    torch.zeros(0, dtype=torch.long))
    assert res.num_positive == 0


def test_qfl_lower_when_score_matches_quality() -> None:
    labels = torch.tensor([0, -1])
    quality = torch.tensor([0.8, 0.0])
    near = quality_focal_loss(torch.tensor([[0.75], [0.05]]), labels, quality).sum()
    far = quality_focal_loss(torch.tensor([[0.2], [0.6]]), labels, quality).sum()
    exact = quality_focal_loss(torch.tensor([[0.8], [1e-6]]), labels, quality).sum()
    assert exact < near < far
    assert exact < 1e-6  # focal factor |q - p|^2 vanishes at the target


def test_dfl_minimal_at_target_bins() -> None:
    target = torch.tensor([2.3])
    good = torch.full((1, 8), -10.0)
    good[0, 2], good[0, 3] = math.log(0.7), math.log(0.3)
    bad = torch.zeros(1, 8)
    assert distribution_focal_loss(good, target) < distribution_focal_loss(bad, target)


def _outputs(reg_logits: torch.Tensor, score: float, reg_max: int = 7) -> HeadOutputs:
    priors = anchor_points([(8, 8), (4, 4), (2, 2)], (8, 16, 32), torch.device("cpu"))
    scores = torch.full((1, priors.shape[0], 1), score)
    return HeadOutputs(scores, reg_logits, priors, reg_max)


def test_loss_decreases_as_prediction_approaches_target() -> None:
    target = [torch.tensor([[0.0, 8, 8, 40, 40]])]
    priors = anchor_points([(8, 8), (4, 4), (2, 2)], (8, 16, 32), torch.device("cpu"))
    # ideal logits: each anchor's distribution centred on its exact distances to the target box
    dist = torch.cat([priors[:, :2] - 8, 40 - priors[:, :2]], 1) / priors[:, 2:3]
    bins = torch.arange(8.0)
    ideal = -((bins - dist.clamp(0, 6.9)[..., None]) ** 2) * 4  # [A, 4, 8]
    losses = []
    for t in (0.0, 0.5, 1.0):
        out = _outputs((ideal * t)[None], score=0.3)
        losses.append(damoyolo.compute_loss(out, target))
    assert all(r.num_positive >= 1 for r in losses)
    giou = [r.giou.item() for r in losses]
    dfl = [r.dfl.item() for r in losses]
    assert giou[0] > giou[1] > giou[2] and dfl[0] > dfl[1] > dfl[2]
    assert losses[0].total > losses[2].total


def test_loss_rejects_bad_class_ids_and_batch_mismatch() -> None:
    out = _outputs(torch.zeros(1, 84, 4, 8), score=0.1)
    with pytest.raises(ValueError, match="class ids"):
        damoyolo.compute_loss(out, [torch.tensor([[3.0, 0, 0, 10, 10]])])
    with pytest.raises(ValueError, match="target tensors"):
        damoyolo.compute_loss(out, [])


def test_one_backward_step_small_input() -> None:
    torch.manual_seed(0)
    model = damoyolo.build_model("T", num_classes=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    x = torch.rand(2, 3, 64, 64) * 255
    targets = [torch.tensor([[0.0, 10, 12, 40, 44]]), torch.zeros(0, 5)]
    out = model(x)
    assert isinstance(out, HeadOutputs) and out.reg_logits.shape[-1] == 17
    loss = model.compute_loss(out, targets)
    assert loss.num_positive >= 1 and torch.isfinite(loss.total)
    loss.total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    opt.step()


def test_load_pretrained_into_one_class_model() -> None:
    coco = damoyolo.build_model("Ns", num_classes=80)
    ckpt = {"model": {("module." + k): v for k, v in coco.state_dict().items()}}
    model = damoyolo.build_model("Ns", num_classes=1)
    report = damoyolo.load_pretrained(model, ckpt)
    assert sorted(report.skipped) == sorted(f"head.gfl_cls.{i}.{p}" for i in range(3) for p in ("weight", "bias"))
    assert not report.missing and not report.unexpected
    sd = model.state_dict()
    key = "neck.merge_6.conv3.conv.weight"
    assert torch.equal(sd[key], coco.state_dict()[key])
    assert torch.equal(sd["head.gfl_reg.0.weight"], coco.state_dict()["head.gfl_reg.0.weight"])
    assert sd["head.gfl_cls.0.weight"].shape[0] == 1
    # a checkpoint of another variant is refused, not half-loaded
    with pytest.raises(ValueError, match="does not fit"):
        damoyolo.load_pretrained(damoyolo.build_model("Nm", num_classes=1), ckpt)
