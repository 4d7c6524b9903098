"""Architecture facts: official key layout, BatchNorm settings, fusion, decoded outputs, input sizes."""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources

import pytest
import torch
from torch import nn

import damoyolo
from damoyolo.head import anchor_points
from damoyolo.layers import RepConv

FACTS = json.loads(resources.files("damoyolo").joinpath("official_keys.json").read_text())["variants"]
ALL = ["T", "S", "M", "L", "Ns", "Nm", "Nl"]


def _lines(sd: dict[str, torch.Tensor]) -> str:
    return "\n".join(f"{k} {'x'.join(str(d) for d in v.shape)}" for k, v in sd.items())


@pytest.fixture(scope="module")
def coco_models() -> dict[str, damoyolo.DamoYolo]:
    # meta device: the key layout needs shapes only, and building is then cheap
    with torch.device("meta"):
        return {v: damoyolo.build_model(v, num_classes=80) for v in ALL}


@pytest.mark.parametrize("variant", ALL)
def test_state_dict_matches_official_layout(variant: str, coco_models: dict) -> None:
    facts = FACTS[variant]
    sd = coco_models[variant].state_dict()
    assert len(sd) == facts["key_count"]
    for key, shape in facts["sample"].items():
        assert key in sd, key
        assert list(sd[key].shape) == shape, key
    if "keys" in facts:  # full list recorded for T: report the first difference readably
        assert list(sd) == list(facts["keys"])
        assert {k: list(v.shape) for k, v in sd.items()} == facts["keys"]
    assert hashlib.sha256(_lines(sd).encode()).hexdigest() == facts["sha256_ordered"]


@pytest.mark.parametrize("variant", ALL)
def test_unfused_param_count_matches_official_code(variant: str, coco_models: dict) -> None:
    params = sum(p.numel() for p in coco_models[variant].parameters())
    assert params == FACTS[variant]["param_count_unfused"]


def test_expected_official_counts_recorded() -> None:
    # The counts in ../shared/FACTS.md, independent of the JSON's provenance.
    assert {v: FACTS[v]["key_count"] for v in ["T", "S", "M", "L", "Ns"]} == {
        "T": 586, "S": 640, "M": 844, "L": 1114, "Ns": 526}


def test_strict_load_of_checkpoint_form_and_batchnorm_settings() -> None:
    src = damoyolo.build_model("Ns", num_classes=80)
    ckpt = {"model": {k: v.clone() for k, v in src.state_dict().items()}}
    dst = damoyolo.build_model("Ns", num_classes=80)
    dst.load_state_dict(damoyolo.unwrap_state_dict(ckpt), strict=True)
    bns = [m for m in dst.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)


@pytest.mark.parametrize("variant", ["T", "Ns"])
def test_fused_equals_unfused(variant: str) -> None:
    torch.manual_seed(0)
    model = damoyolo.build_model(variant, num_classes=2)
    _randomise_bn(model)
    model.eval()
    x = torch.rand(2, 3, 96, 128) * 255
    with torch.no_grad():
        s0, b0 = model(x)
        model.fuse()
        s1, b1 = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.rbr_reparam is not None for m in model.modules() if isinstance(m, RepConv))
    assert (s0 - s1).abs().max().item() < 1e-4
    assert (b0 - b1).abs().max().item() < 1e-4 * max(1.0, b0.abs().max().item())


def test_repconv_fusion_is_exact_and_can_fail() -> None:
    torch.manual_seed(1)
    rep = RepConv(8, 16, 3, stride=2, act="relu")
    _randomise_bn(rep)
    rep.eval()
    x = torch.randn(2, 8, 17, 17)
    ref = rep(x)
    rep.fuse()
    assert (rep(x) - ref).abs().max().item() < 1e-4
    # the comparison is sensitive: dropping the 1x1 branch's share breaks it
    with torch.no_grad():
        rep.rbr_reparam.bias.add_(0.01)
    assert (rep(x) - ref).abs().max().item() > 1e-4


def test_eval_outputs_decoded_boxes_and_anchor_layout() -> None:
    model = damoyolo.build_model("Ns", num_classes=3).eval()
    x = torch.rand(2, 3, 64, 96) * 255
    with torch.no_grad():
        scores, boxes = model(x)
    a = 8 * 12 + 4 * 6 + 2 * 3
    assert scores.shape == (2, a, 3) and boxes.shape == (2, a, 4)
    assert scores.min() >= 0 and scores.max() <= 1
    assert (boxes[..., 2:] >= boxes[..., :2]).all()
    pri = anchor_points([(8, 12), (4, 6), (2, 3)], (8, 16, 32), torch.device("cpu"))
    assert pri[0].tolist() == [0, 0, 8, 8] and pri[1].tolist() == [8, 0, 8, 8]  # no +0.5 offset
    assert pri[12].tolist() == [0, 8, 8, 8] and pri[96].tolist() == [0, 0, 16, 16]
    # zero regression logits -> uniform distribution -> distance reg_max/2 strides from the anchor
    with torch.no_grad():
        for conv in model.head.gfl_reg:
            conv.weight.zero_()
            conv.bias.zero_()
        _, boxes = model(x)
    half = 7 / 2
    assert torch.allclose(boxes[0, 0], torch.tensor([-half * 8, -half * 8, half * 8, half * 8]))


def test_batch_and_size_are_free_and_sizes_checked() -> None:
    model = damoyolo.build_model("Ns").eval()
    with torch.no_grad():
        for shape in [(1, 3, 32, 32), (3, 3, 64, 160)]:
            s, b = model(torch.zeros(shape))
            assert s.shape[0] == shape[0]
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 100, 96))
    with pytest.raises(ValueError, match="unknown DAMO-YOLO variant"):
        damoyolo.build_model("XL")


def test_in_channels_and_classes_are_parameters() -> None:
    model = damoyolo.build_model("ct", num_classes=2, in_channels=5).eval()
    assert model.variant == "T"
    with torch.no_grad():
        scores, _ = model(torch.rand(1, 5, 64, 64))
    assert scores.shape[-1] == 2


REFERENCE = json.loads(resources.files("damoyolo").joinpath("official_keys.json").read_text())["reference_outputs"]


def _keyed_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor from its key name (the recipe recorded with the official reference outputs).

    Scaled so that activations stay O(1) and the outputs depend on every layer.
    """
    out = {}
    for k, v in sd.items():
        if k.endswith(("num_batches_tracked", "integral.project")):
            out[k] = v.clone()
            continue
        g = torch.Generator().manual_seed(int(hashlib.sha256(k.encode()).hexdigest()[:8], 16))
        r = torch.randn(v.shape, generator=g)
        if k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("scale"):
            out[k] = torch.ones(v.shape)
        elif v.dim() == 4:
            out[k] = r / v[0].numel() ** 0.5
        elif k.endswith(("bn.weight", "bn1.weight", "norm.weight")) or re.search(r"\.\d+\.weight$", k):
            out[k] = 1 + 0.2 * r  # BatchNorm gamma
        else:
            out[k] = 0.2 * r
    return out


@pytest.mark.parametrize("variant", ["T", "M", "Ns"])
@pytest.mark.parametrize("fused", [False, True])
def test_outputs_match_official_model(variant: str, fused: bool) -> None:
    """Same weights, same input -> the official model's recorded outputs (layer order, concat order, acts)."""
    ref = REFERENCE["variants"][variant]
    model = damoyolo.build_model(variant, num_classes=ref["num_classes"])
    model.load_state_dict(_keyed_weights(model.state_dict()), strict=True)
    model.eval()
    if fused:
        model.fuse()
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        scores, boxes = model(x)
    idx = ref["anchors"]
    assert torch.allclose(scores[0, idx], torch.tensor(ref["scores"]), atol=1e-4)
    assert torch.allclose(boxes[0, idx], torch.tensor(ref["boxes"]), atol=1e-3, rtol=1e-4)
    assert abs(scores.sum().item() - ref["scores_sum"]) < 1e-2
    assert abs(boxes.abs().sum().item() / ref["boxes_abs_sum"] - 1) < 1e-5
