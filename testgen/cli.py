"""``ctlesion testgen``: cases of the independent test generator (DICOM + truth.json + manifest.json)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ctlesion_testgen.generate import TESTGEN_SEED, TestgenConfig, generate_set


def build_parser() -> argparse.ArgumentParser:
    d = TestgenConfig()
    p = argparse.ArgumentParser(
        prog="ctlesion testgen",
        description="Synthetic chest CT from an independently written generator, for testing only (never for training "
        f"or model selection). Case i gets seed SEED+i; its own range starts at {TESTGEN_SEED}.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (DIR/<case_id>/series/*.dcm, truth.json, DIR/manifest.json)")
    p.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=int, default=TESTGEN_SEED, help=f"seed of the first case (default {TESTGEN_SEED})")
    p.add_argument("--matrix", type=int, default=d.matrix, help=f"rows = columns (default {d.matrix})")
    p.add_argument("--slices-max", type=int, default=d.slices_max, help=f"most slices per series (default {d.slices_max})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cases < 1 or args.matrix < 64 or args.slices_max < 4:
        print("need --cases >= 1, --matrix >= 64, --slices-max >= 4", file=sys.stderr)
        return 2
    cfg = TestgenConfig(matrix=args.matrix, slices_max=args.slices_max)
    start = time.perf_counter()

    def progress(e: dict) -> None:
        print(f"{e['case_id']}: {e['slices']} slices, {e['nodules']} nodules, {e['seconds']:.1f} s", flush=True)

    manifest = generate_set(args.out, args.cases, args.seed, cfg, on_case=progress)
    n_nod = sum(c["nodules"] for c in manifest["cases"])
    print(f"{args.cases} cases, {n_nod} nodules -> {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
