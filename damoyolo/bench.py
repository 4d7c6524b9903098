"""CPU forward time of fused variants (torch eager, batch 1), per thread count.

Example: ``python -m damoyolo.bench T Ns Nm Nl --size 512 --threads 1 2 --iters 10``
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from damoyolo.model import build_model


@dataclass
class Timing:
    variant: str
    size: int
    threads: int
    median_ms: float
    min_ms: float


def time_variant(variant: str, size: int, threads: int, iters: int = 10, warmup: int = 2,
                 in_channels: int = 3) -> Timing:
    torch.set_num_threads(threads)
    model = build_model(variant, num_classes=1, in_channels=in_channels).fuse()
    x = torch.rand(1, in_channels, size, size) * 255
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    return Timing(variant, size, threads, statistics.median(times), min(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m damoyolo.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=["T", "Ns", "Nm", "Nl"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, batch 1, {args.size}x{args.size}, fused, eager, 1-class head")
    print(f"{'variant':<8}{'threads':>8}{'median ms':>11}{'min ms':>9}")
    for v in args.variants:
        for t in args.threads:
            r = time_variant(v, args.size, t, args.iters)
            print(f"{r.variant:<8}{r.threads:>8}{r.median_ms:>11.1f}{r.min_ms:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
