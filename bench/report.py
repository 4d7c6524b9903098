"""Markdown, console summary, plots and the bench/RESULTS.md section of a ``ctlesion bench`` run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ctlesion_bench.metrics import format_view, view_markdown

if TYPE_CHECKING:
    from ctlesion_bench.bench import BenchResult
    from ctlesion_bench.measure import EnsembleRow


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _met(value: float | None, target: float) -> str:
    return "not measured" if value is None else ("met" if value >= target else "NOT met")


def render_plots(res: BenchResult, out: Path) -> list[str]:
    if not res.ensemble:
        return []
    from ctlesion_bench.plots import latency_plot, throughput_plot

    det = res.best_detector()
    return [
        str(latency_plot(res.ensemble, out / "latency.png")),
        str(throughput_plot(res.ensemble, out / "throughput.png", det.slices_per_s if det else None,
                            res.naive.slices_per_s if res.naive else None, res.ensemble_int8)),
    ]  # fmt: skip


def _ensemble_table(rows: list[EnsembleRow]) -> list[str]:
    return [
        "| in-flight slabs | slices/s | req/s | p50 ms | p95 ms | p99 ms | failures / requests "
        "| detector avg batch | slabs / exec | detector queue ms | detector infer ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {e.concurrency} | {e.slices_per_s:.1f} | {e.requests_per_s:.2f} | {e.p50_ms:.0f} | {e.p95_ms:.0f} | {e.p99_ms:.0f} | {e.failures} / {e.requests} "
            f"| {_fmt(e.detector_avg_batch, '.1f')} | {_fmt(e.detector_requests_per_exec)} | {_fmt(e.detector_queue_ms, '.1f')} | {_fmt(e.detector_infer_ms, '.1f')} |"
            for e in rows
        ],
    ]  # fmt: skip


def markdown(res: BenchResult, plot_dir: str | None = None) -> str:
    m = res.machine
    det, ens, r = res.best_detector(), res.best_ensemble(), res.ratios
    ens8 = res.best_ensemble_int8()
    s = res.settings
    lines = [
        f"Command: `{res.command}`",
        "",
        f"Machine: {m.cpu_model}, {m.cores} cores, Python {m.python}, no GPU used; {m.date_utc} (load average "
        f"{m.loadavg_1m:.2f} at the start); run took {res.seconds:.0f} s.",
        f"Data: phantom CT series of {s.get('series_slices')} slices, slabs of {s.get('slab_size') or 'the client library'}, model input "
        f"{s.get('input')}; every figure is the median of {s.get('repeat')} repeats.",
        "",
        "| | slices/s | note |",
        "|---|---:|---|",
        f"| (1) detector alone, onnxruntime in-process | {_fmt(det.slices_per_s if det else None, '.1f')} | best batch {det.batch if det else 'n/a'} |",
        f"| (2) Triton ensemble over gRPC | {_fmt(ens.slices_per_s if ens else None, '.1f')} | best concurrency {ens.concurrency if ens else 'n/a'} |",
        *([f"| (2) same, INT8 (QDQ) detector | {ens8.slices_per_s:.1f} | best concurrency {ens8.concurrency} |"] if ens8 else []),
        f"| (3) naive per-image baseline | {_fmt(res.naive.slices_per_s if res.naive else None, '.1f')} | pydicom + window + PyTorch + NMS, batch 1, {res.naive.torch_threads if res.naive else '-'} torch thread(s) |",
        "",
        f"- (2)/(1) serving overhead: **{_fmt(r.serving_over_detector, '.3f')}** (target >= {r.serving_target}: {_met(r.serving_over_detector, r.serving_target)})",
        f"- (2)/(3) what Triton + batching buys: **{_fmt(r.serving_over_naive, '.2f')}x** (target >= {r.speedup_target}x: {_met(r.serving_over_naive, r.speedup_target)})",
        *([f"- (2, INT8 detector)/(3): **{_fmt(r.int8_serving_over_naive, '.2f')}x** (target >= {r.speedup_target}x: "
           f"{_met(r.int8_serving_over_naive, r.speedup_target)}); the naive baseline stays FP32 PyTorch"] if ens8 else []),
        f"- server RSS at the end: {_fmt(res.server_rss_end_bytes / 2**20 if res.server_rss_end_bytes else None, '.0f')} MiB",
        "",
        "Detector alone (onnxruntime CPU, default threads):",
        "",
        "| batch | ms / batch | slices/s |",
        "|---:|---:|---:|",
        *[f"| {d.batch} | {d.ms_per_batch:.1f} | {d.slices_per_s:.1f} |" for d in res.detector],
        "",
        "Ensemble over gRPC (client latency per slab request):",
        "",
        *_ensemble_table(res.ensemble),
    ]
    if res.ensemble_int8:
        lines += ["", "Ensemble over gRPC, INT8 (QDQ) detector served from a second CPU repository:", "",
                  *_ensemble_table(res.ensemble_int8)]  # fmt: skip
    if res.server_view and res.server_view.reachable:
        lines += [
            "",
            "Server's own view over the whole sweep (Triton Prometheus metrics; times in ms per request, "
            "avg batch = inferences / executions):",
            "",
            *view_markdown(res.server_view),
        ]
    if res.int8:
        lines += [
            "",
            "FP32 vs INT8 (QDQ, min-max calibration on phantom slices) detector, onnxruntime CPU, interleaved:",
            "",
            "| batch | fp32 ms | int8 ms | fp32/int8 |",
            "|---:|---:|---:|---:|",
            *[
                f"| {q['batch']} | {q['fp32_ms']:.1f} | {q['int8_ms']:.1f} | {q['speedup']:.2f} |"
                for q in res.int8
            ],
        ]
    if res.plots:
        base = plot_dir if plot_dir is not None else ""
        lines += ["", *[f"![{Path(p).stem}]({base}{Path(p).name})" for p in res.plots]]
    if res.notes:
        lines += ["", *[f"- {n}" for n in res.notes]]
    return "\n".join(lines) + "\n"


GPU_SECTION = """## GPU

No GPU figures were measured: the task that wrote this harness was lent no GPU. A GPU user runs

    ctlesion bench --device cuda --checkpoint models/ctlesion_damoyolo.pt --out work/bench-gpu
    # same as: python -m ctlesion_bench.gpu_sweep --checkpoint models/ctlesion_damoyolo.pt --out work/bench-gpu

which measures detector throughput vs batch in torch fp32 / fp16 / CUDA graphs (fp16), records the
GPU's name, writes gpu.json + gpu.md, and exits with a clear message (code 2) where CUDA is absent.
"""


def replace_section(path: Path, name: str, body: str) -> Path:
    """Put ``body`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``; the rest is kept.

    A section not there yet goes before the GPU section (or at the end); a missing file is created
    with a header and the GPU section.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    if not text:
        text = (
            "# Benchmark results\n\nEach figure below was written by the command shown with it, "
            "on the machine named.\n\n" + GPU_SECTION
        )
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    elif "\n## GPU" in text:
        i = text.index("\n## GPU") + 1
        text = text[:i] + section + "\n\n" + text[i:]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def update_results_md(path: Path, res: BenchResult) -> Path:
    """Replace the CPU section of ``ctlesion bench`` (markers ``bench:cpu``) in the results file.

    The plots are copied next to the results file (``results/``) so that the file and its figures
    are committed together; the run's own copies stay in --out.
    """
    import shutil

    plots = path.parent / "results"
    plots.mkdir(parents=True, exist_ok=True)
    for p in res.plots:
        shutil.copy2(p, plots / Path(p).name)
    return replace_section(
        path, "bench:cpu", f"## CPU (latest `ctlesion bench` run)\n\n{markdown(res, 'results/')}"
    )


def print_summary(res: BenchResult) -> None:
    det, ens, r = res.best_detector(), res.best_ensemble(), res.ratios
    print(
        f"(1) detector alone : {_fmt(det.slices_per_s if det else None, '.1f')} slices/s (batch {det.batch if det else '-'})"
    )
    print(
        f"(2) ensemble gRPC  : {_fmt(ens.slices_per_s if ens else None, '.1f')} slices/s (concurrency {ens.concurrency if ens else '-'})"
    )
    ens8 = res.best_ensemble_int8()
    if ens8:
        print(f"(2) INT8 detector  : {ens8.slices_per_s:.1f} slices/s (concurrency {ens8.concurrency}); "
              f"vs naive {_fmt(r.int8_serving_over_naive, '.2f')}x")  # fmt: skip
    print(f"(3) naive baseline : {_fmt(res.naive.slices_per_s if res.naive else None, '.1f')} slices/s")
    print(f"(2)/(1) serving overhead = {_fmt(r.serving_over_detector, '.3f')} (target >= {r.serving_target}: "
          f"{_met(r.serving_over_detector, r.serving_target)}); (2)/(3) Triton + batching vs naive = "
          f"{_fmt(r.serving_over_naive, '.2f')}x (target >= {r.speedup_target}x: {_met(r.serving_over_naive, r.speedup_target)})")  # fmt: skip
    for e in res.ensemble:
        print(
            f"  concurrency {e.concurrency}: {e.slices_per_s:.1f} slices/s, p50 {e.p50_ms:.0f} p95 {e.p95_ms:.0f} p99 {e.p99_ms:.0f} ms, "
            f"{e.failures} failures; detector avg batch {_fmt(e.detector_avg_batch, '.1f')}"
        )
    if res.server_view is not None:
        print(format_view(res.server_view))
    for q in res.int8:
        print(
            f"  int8 batch {q['batch']}: fp32 {q['fp32_ms']:.1f} ms, int8 {q['int8_ms']:.1f} ms, x{q['speedup']:.2f}"
        )
    if res.server_rss_end_bytes:
        print(f"server RSS at the end: {res.server_rss_end_bytes / 2**20:.0f} MiB")
