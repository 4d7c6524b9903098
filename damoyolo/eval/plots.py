"""The FROC figure as LUNA16 draws it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from damoyolo.eval.froc import FP_RATES, FrocResult, rate_label


def plot_froc(curves: Mapping[str, FrocResult], path: Path, title: str = "") -> Path:
    """FROC curve as LUNA16 draws it: log-x FP/scan from 1/8 to 8, the 7 operating points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for (label, r), colour in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        # a step curve: sensitivity holds until the next FP arrives
        ax.step(np.clip(r.curve_fps, 1e-3, None), r.curve_sensitivity, where="post", color=colour, label=f"{label} (CPM {r.cpm:.3f})")
        if r.band_fps and label == next(iter(curves)):  # one band only: overlapping bands hide each other
            ax.fill_between(r.band_fps, r.band_low, r.band_high, step="post", color=colour, alpha=0.15, linewidth=0)
        ax.plot(r.fp_rates, r.sensitivities, "o", color=colour, markersize=5)
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.125 / 1.2, 8 * 1.2)
    ax.set_xticks(list(FP_RATES), [rate_label(r) for r in FP_RATES])
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"FROC {title}".strip())
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path

