"""GPU section: detector throughput vs batch in torch fp32 / fp16 / CUDA graphs (fp16).

    python -m ctlesion_bench.gpu_sweep --checkpoint models/ctlesion_damoyolo.pt --out work/bench-gpu
    ctlesion bench --device cuda ...      # the same

Exits with code 2 and a clear message where CUDA is not available. Writes gpu.json and gpu.md with
the GPU's name, torch / CUDA versions; every figure is the median of --repeat timed runs after warm-up.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ctlesion_bench.common import DEFAULT_CHECKPOINT, REPO_ROOT, Machine, median, write_json


@dataclass
class GpuRow:
    mode: str  # fp32 | fp16 | fp16+cudagraph
    batch: int
    ms_per_batch: float
    slices_per_s: float


def _time_cuda(fn: object, repeat: int, warmup: int) -> float:
    import torch

    for _ in range(warmup):
        fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()  # type: ignore[operator]
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def sweep(
    checkpoint: Path, batches: list[int], repeat: int, warmup: int, size: int | None
) -> tuple[list[GpuRow], str]:
    import torch

    from ctlesion_export.cli import load_detector

    model, meta = load_detector(checkpoint)
    model.fuse()
    model = model.cuda().eval()
    half = copy.deepcopy(model).half()
    size = size or int(meta["model_size"])
    channels = int(meta["in_channels"])
    rows: list[GpuRow] = []
    for b in tqdm(batches, desc="gpu batch sweep", unit="batch"):
        x32 = torch.rand(b, channels, size, size, device="cuda") * 255
        with torch.inference_mode():
            ms = _time_cuda(lambda x=x32, m=model: m(x), repeat, warmup)
            rows.append(GpuRow("fp32", b, round(ms, 3), round(b / ms * 1000, 1)))
            x16 = x32.half()
            ms = _time_cuda(lambda x=x16, m=half: m(x), repeat, warmup)
            rows.append(GpuRow("fp16", b, round(ms, 3), round(b / ms * 1000, 1)))
        static_in = x16.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                half(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            half(static_in)
        ms = _time_cuda(graph.replay, repeat, warmup)
        rows.append(GpuRow("fp16+cudagraph", b, round(ms, 3), round(b / ms * 1000, 1)))
    return rows, torch.cuda.get_device_name(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ctlesion_bench.gpu_sweep", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "work" / "bench-gpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--size", type=int, default=None, help="input size (default: the checkpoint's)")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_sweep: torch is not installed; nothing measured", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_sweep: CUDA is not available on this machine (torch.cuda.is_available() is False); "
              "no GPU figures measured. Run it where a CUDA GPU is present.", file=sys.stderr)  # fmt: skip
        return 2
    rows, gpu = sweep(args.checkpoint, args.batches, args.repeat, args.warmup, args.size)
    machine = Machine.here()
    machine.gpu = gpu
    command = "python -m ctlesion_bench.gpu_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "gpu.json", {"command": command, "machine": machine, "torch": torch.__version__,
                                       "cuda": torch.version.cuda, "rows": rows})  # fmt: skip
    md = [f"GPU: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}; {machine.date_utc}", f"Command: `{command}`", "",
          "| mode | batch | ms / batch | slices/s |", "|---|---:|---:|---:|"]  # fmt: skip
    md += [f"| {r.mode} | {r.batch} | {r.ms_per_batch:.2f} | {r.slices_per_s:.0f} |" for r in rows]
    (args.out / "gpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
