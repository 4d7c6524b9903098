"""Params / GFLOPs against the official model zoo table, and the `variants` command."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from damoyolo import variants
from damoyolo.flops import count_ops, layer_ops


@pytest.fixture(scope="module")
def rows() -> list[variants.VariantRow]:
    return variants.variant_rows()


def test_variants_within_two_percent_of_official_table(rows: list[variants.VariantRow]) -> None:
    print()
    print(variants.format_table(rows))  # side by side, visible with pytest -s
    assert [r.variant for r in rows] == ["T", "S", "M", "L", "Ns", "Nm", "Nl"]
    for r in rows:
        assert abs(r.params_dev) < 0.02, (r.variant, r.params_m, r.official_params_m)
        assert abs(r.gflops_dev) < 0.02, (r.variant, r.gflops, r.official_gflops)
        # official GFLOPs are 2 x thop ops: the multiply-accumulate count alone is about half
        assert 0.45 < r.deploy_gmacs / r.official_gflops < 0.5


def test_layer_ops_rules() -> None:
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=True)
    out = torch.zeros(2, 8, 5, 5)
    assert layer_ops(conv, out) == 8 * 25 * (4 * 9 + 1)
    assert layer_ops(conv, out, with_bias=False) == 8 * 25 * 36
    dw = nn.Conv2d(8, 8, 5, groups=8, bias=False)
    assert layer_ops(dw, out) == 8 * 25 * 25
    assert layer_ops(nn.BatchNorm2d(8), out) == 2 * 8 * 25
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU())
    assert count_ops(model, (4, 4), 3) == 4 * 16 * 3


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert variants.main(["Ns", "--size", "320"]) == 0
    out = capsys.readouterr().out
    assert "Ns" in out and "GFLOPs" in out and "official" in out
    assert variants.main(["nope"]) == 2
    with pytest.raises(SystemExit) as exc:
        variants.main(["--help"])
    assert exc.value.code == 0
