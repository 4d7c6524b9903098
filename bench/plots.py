"""PNG plots: latency percentiles and throughput vs concurrency (sweep), server memory over a soak."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ctlesion_bench.measure import EnsembleRow  # noqa: E402
from ctlesion_bench.memory import MIB, MemorySample, SoakVerdict  # noqa: E402


def latency_plot(rows: list[EnsembleRow], path: Path) -> Path:
    conc = [r.concurrency for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "^:")):
        ax.plot(conc, [getattr(r, key) for r in rows], style, label=key.split("_")[0])
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("in-flight slabs (concurrency)")
    ax.set_ylabel("latency per slab request (ms)")
    ax.set_title("Triton ensemble over gRPC: latency percentiles")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def throughput_plot(
    rows: list[EnsembleRow],
    path: Path,
    detector_alone: float | None,
    naive: float | None,
    rows_int8: list[EnsembleRow] | None = None,
) -> Path:
    conc = [r.concurrency for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(conc, [r.slices_per_s for r in rows], "o-", label="ensemble (gRPC), FP32 detector")
    if rows_int8:
        ax.plot([r.concurrency for r in rows_int8], [r.slices_per_s for r in rows_int8], "D-", color="C1",
                label="ensemble (gRPC), INT8 detector")  # fmt: skip
    if detector_alone:
        ax.axhline(detector_alone, color="C2", ls="--", label="detector alone (ORT, best batch)")
    if naive:
        ax.axhline(naive, color="C3", ls=":", label="naive per-image baseline")
    batches = [(r.concurrency, r.detector_avg_batch) for r in rows if r.detector_avg_batch]
    if batches:  # the server's view: what the dynamic batcher reached at each level
        ax2 = ax.twinx()
        ax2.plot([c for c, _ in batches], [b for _, b in batches], "s:", color="C7", alpha=0.8,
                 label="detector avg batch (right)")  # fmt: skip
        ax2.set_ylabel("detector avg batch (slices / execution)")
        ax2.set_ylim(bottom=0)
        handles, labels = ax2.get_legend_handles_labels()
    else:
        handles, labels = [], []
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("in-flight slabs (concurrency)")
    ax.set_ylabel("slices / s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput vs concurrency")
    ax.grid(alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    ax.legend(h1 + handles, l1 + labels, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def memory_plot(
    samples: list[MemorySample],
    path: Path,
    warmup_s: float | None = None,
    verdict: SoakVerdict | None = None,
    history_csv: Path | None = None,
    t0_unix: float = 0.0,
) -> Path:
    """Server memory over a load test (PSS, RSS sum, private heap), PSS per process, locust's requests/s."""
    ts = [s.t_s for s in samples]
    fig, (ax, ax_proc, ax_rps) = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True, height_ratios=(3, 2, 1))
    for key, style, label in (
        ("pss_bytes", "-", "PSS sum (judged)"),
        ("rss_bytes", "--", "RSS sum (shared pages counted per process)"),
        ("anon_bytes", ":", "private anonymous (heaps, arenas)"),
        ("shmem_bytes", "-.", "shared region (/dev/shm)"),
    ):
        ax.plot(ts, [getattr(s, key) / MIB for s in samples], style, label=label)
    if warmup_s:
        for a in (ax, ax_proc, ax_rps):
            a.axvspan(0, warmup_s, color="0.85", alpha=0.6, lw=0)
        ax.text(warmup_s / 2, 0.02, "warm-up", transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
    if verdict is not None and verdict.samples:
        ax.axhline(verdict.baseline_bytes / MIB, color="C0", lw=0.6)
        ax.axhline((verdict.baseline_bytes + verdict.allowed_bytes) / MIB, color="C3", lw=0.8, ls="--",
                   label=f"allowed end ({verdict.allowed_bytes / MIB:.0f} MiB over start)")  # fmt: skip
        status = "PASS" if verdict.passed else "FAIL"
        ax.set_title(f"Soak: {status}, PSS {verdict.growth_bytes / MIB:+.1f} MiB over {verdict.measured_s:.0f} s, "
                     f"{verdict.failures} failures", fontsize=10)  # fmt: skip
    else:
        ax.set_title("Server memory during the load test", fontsize=10)
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    for label in sorted({k for s in samples for k in s.pss_by_process}):
        ax_proc.plot(ts, [s.pss_by_process.get(label, 0) / MIB for s in samples], label=label)
    ax_proc.set_ylabel("PSS by process (MiB)")
    ax_proc.set_ylim(bottom=0)
    ax_proc.grid(alpha=0.3)
    if ax_proc.lines:
        ax_proc.legend(fontsize=7, loc="center right")
    if history_csv is not None and history_csv.exists():
        with open(history_csv, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("Name") == "Aggregated"]
        ax_rps.plot([float(r["Timestamp"]) - t0_unix for r in rows], [float(r["Requests/s"]) for r in rows],
                    color="C2")  # fmt: skip
    ax_rps.set_ylabel("requests / s")
    ax_rps.set_xlabel("seconds since the server was first sampled")
    ax_rps.set_ylim(bottom=0)
    ax_rps.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
