"""List the DAMO-YOLO variants with our params / GFLOPs next to the official model-zoo figures.

GFLOPs and params are counted the way the official table was made (RepConv fused, BatchNorm kept,
2 x thop ops; see damoyolo.flops); "deploy" columns are our fully fused export (MACs).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from damoyolo.config import VARIANTS, get_spec
from damoyolo.flops import model_cost


@dataclass
class VariantRow:
    variant: str
    size: int
    params_m: float
    official_params_m: float
    gflops: float
    official_gflops: float
    deploy_params_m: float
    deploy_gmacs: float
    coco_map: float

    @property
    def params_dev(self) -> float:
        return self.params_m / self.official_params_m - 1

    @property
    def gflops_dev(self) -> float:
        return self.gflops / self.official_gflops - 1


def variant_rows(names: list[str] | None = None, size: int | None = None, num_classes: int = 80) -> list[VariantRow]:
    rows = []
    for name in names or list(VARIANTS):
        spec = get_spec(name)
        s = size or spec.size
        cost = model_cost(spec.name, s, num_classes=num_classes)
        scale = (s / spec.size) ** 2  # official figures are for spec.size; FLOPs scale with area
        rows.append(VariantRow(spec.name, s, cost.params / 1e6, spec.params_m, cost.gflops, spec.gflops * scale,
                               cost.deploy_params / 1e6, cost.deploy_macs / 1e9, spec.coco_map))
    return rows


def format_table(rows: list[VariantRow]) -> str:
    head = (f"{'variant':<8}{'size':>5}{'params M':>10}{'official':>9}{'dev':>7}"
            f"{'GFLOPs':>9}{'official':>9}{'dev':>7}{'deploy params M':>16}{'deploy GMACs':>13}{'COCO mAP':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.variant:<8}{r.size:>5}{r.params_m:>10.2f}{r.official_params_m:>9.2f}{r.params_dev:>+7.1%}"
                     f"{r.gflops:>9.2f}{r.official_gflops:>9.2f}{r.gflops_dev:>+7.1%}"
                     f"{r.deploy_params_m:>16.2f}{r.deploy_gmacs:>13.2f}{r.coco_map:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctlesion variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help=f"subset of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--size", type=int, help="input size (default: the official one, 640 or 416 for nano); "
                        "official figures are scaled by area")
    parser.add_argument("--num-classes", type=int, default=80, help="head classes (80 = COCO, as the table)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        rows = variant_rows(args.variants or None, args.size, args.num_classes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
