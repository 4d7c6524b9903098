"""PNG plots of the ensemble sweep: latency percentiles and throughput vs concurrency."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ctlesion_bench.measure import EnsembleRow  # noqa: E402


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
    rows: list[EnsembleRow], path: Path, detector_alone: float | None, naive: float | None
) -> Path:
    conc = [r.concurrency for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(conc, [r.slices_per_s for r in rows], "o-", label="ensemble (gRPC)")
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
