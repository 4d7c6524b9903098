"""``python -m ctlesion_phantoms`` / ``ctlesion phantom``: generate a phantom data set."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ctlesion_phantoms.config import PROFILES, PhantomConfig
from ctlesion_phantoms.generate import generate_dataset


def build_parser() -> argparse.ArgumentParser:
    d = PhantomConfig()
    p = argparse.ArgumentParser(
        prog="ctlesion phantom",
        description="Generate synthetic chest CT series (DICOM) with nodule truth. Case i gets seed SEED+i.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (DIR/<case_id>/series/*.dcm, truth.json, DIR/manifest.json)")
    p.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    p.add_argument("--slices-max", type=int, default=d.slices_max, help=f"most slices per series (default {d.slices_max}); fewer -> thicker or partial")
    p.add_argument("--nodules-min", type=int, default=d.nodules_min, help=f"fewest nodules in a case with nodules (default {d.nodules_min})")
    p.add_argument("--nodules-max", type=int, default=d.nodules_max, help=f"most nodules per case (default {d.nodules_max})")
    p.add_argument("--p-no-nodules", type=float, default=d.p_no_nodules, help=f"probability of a case without nodules (default {d.p_no_nodules})")
    p.add_argument("--min-diameter", type=float, default=d.diameter_mm[0], help=f"smallest nodule diameter mm (default {d.diameter_mm[0]})")
    p.add_argument("--max-diameter", type=float, default=d.diameter_mm[1], help=f"largest nodule diameter mm (default {d.diameter_mm[1]})")
    p.add_argument("--profile", choices=PROFILES, default="default",
                   help="default: the generator the committed model was trained on; wide: domain randomisation (docs/phantoms.md)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cases < 1:
        print("--cases must be >= 1", file=sys.stderr)
        return 2
    try:
        config = PhantomConfig(
            slices_max=args.slices_max,
            nodules_min=args.nodules_min,
            nodules_max=args.nodules_max,
            p_no_nodules=args.p_no_nodules,
            diameter_mm=(args.min_diameter, args.max_diameter),
            profile=args.profile,
        )
    except ValueError as exc:
        print(f"invalid options: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tqdm(total=args.cases, unit="case", disable=args.quiet, desc="phantoms") as bar:
        manifest = generate_dataset(args.out, args.cases, args.seed, config, workers=args.workers, on_case=lambda _e: bar.update(1))
    n_nod = sum(c["nodules"] for c in manifest["cases"])
    print(f"{args.cases} cases, {n_nod} nodules -> {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
