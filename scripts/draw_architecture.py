"""Draw docs/architecture.png: where a slice goes from DICOM bytes to a finding, and which module
owns each step. ``STAGES`` is also what tests/test_architecture_doc.py checks against the tree.

    .venv/bin/python scripts/draw_architecture.py --out docs/architecture.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

# (lane, title, modules owning the step); lanes run left to right in the order a slice travels.
STAGES: list[tuple[str, str, list[str]]] = [
    ("in", "DICOM in: a folder, a PACS (DICOMweb / DIMSE) or a C-STORE to the node",
     ["client/pacs.py", "client/pacs_dicomweb.py", "client/pacs_dimse.py", "node/scp.py", "node/service.py"]),
    ("client", "headers up to PixelData, group by series, order by position, cut slabs + halo",
     ["client/core.py", "preprocess_backend/dicom_io.py", "preprocess_backend/series.py", "preprocess_backend/slabs.py"]),
    ("client", "send slabs: bounded concurrency, retries, deadlines (one protocol, sync + asyncio)",
     ["client/client.py", "client/steps.py", "client/retry.py"]),
    ("triton", "preprocess: input contract, decode to HU, order, lung window, 2.5D stack, letterbox, masks",
     ["model_repository/preprocess/1/model.py", "preprocess_backend/pipeline.py", "preprocess_backend/contract.py",
      "preprocess_backend/windowing.py", "preprocess_backend/stacking.py", "preprocess_backend/letterbox.py",
      "preprocess_backend/masks.py"]),
    ("triton", "detector: DAMO-YOLO (ONNX Runtime on CPU; torch / ONNX / TensorRT on GPU)",
     ["model_repository/detector_onnxruntime/1/model.py", "model_repository/detector_torch/1/model.py", "damoyolo/model.py"]),
    ("triton", "postprocess: threshold, NMS, back to pixels and mm, lung / body filter, mean HU",
     ["model_repository/postprocess/1/model.py", "preprocess_backend/pipeline.py", "preprocess_backend/postprocess.py"]),
    ("client", "drop halo results, link boxes into 3D lesions",
     ["client/merge.py", "preprocess_backend/lesions.py"]),
    ("triton", "3D false-positive reduction (ensemble lesion_fpr): HU cubes -> classifier; airway probe",
     ["client/fpr.py", "model_repository/fpr_preprocess/1/model.py", "preprocess_backend/cubes.py",
      "preprocess_backend/airways.py", "model_repository/fpr_classifier/1/model.py", "fpr/predict.py"]),
    ("client", "rescore, 3D size rule and threshold -> findings",
     ["preprocess_backend/rescoring.py", "preprocess_backend/lesion_filters.py", "client/result.py"]),
    ("out", "report (JSON + PNG), DICOM SR back to the PACS / the node's delivery",
     ["client/report.py", "client/sr_report.py", "node/deliver.py"]),
]

# Offline: what makes the model and checks it (same preprocess_backend code as the server).
OFFLINE: list[tuple[str, list[str]]] = [
    ("phantom / test CT series", ["phantoms/generate.py", "testgen/generate.py", "damoyolo/data/luna16.py"]),
    ("train", ["damoyolo/train.py", "damoyolo/dataset.py", "fpr/train.py"]),
    ("evaluate (FROC / CPM)", ["damoyolo/eval/runner.py", "damoyolo/eval/froc.py", "preprocess_backend/matching.py"]),
    ("export + model repository", ["export/onnx_export.py", "export/quantize.py", "export/build_repo.py"]),
    ("benchmarks + load tests (through the same client)", ["bench/bench.py", "bench/loadtest.py", "loadtest/locustfile.py"]),
]

LANE_COLOUR = {"in": "#e8e8e8", "client": "#d9e8fb", "triton": "#fde2c8", "out": "#e8e8e8"}
LANE_NAME = {"in": "input", "client": "client library (ctlesion_client)", "triton": "Triton server", "out": "output"}


def draw(out: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    rows = len(STAGES)
    fig = plt.figure(figsize=(12, 0.95 * rows + 2.6))
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.98))
    ax.set_xlim(0, 12)
    ax.set_ylim(-2.9, rows + 0.5)
    ax.axis("off")
    for i, (lane, title, modules) in enumerate(STAGES):
        y = rows - 1 - i
        x0 = 0.1 if lane != "triton" else 1.3
        ax.add_patch(FancyBboxPatch((x0, y + 0.08), 10.5, 0.8, boxstyle="round,pad=0.02", fc=LANE_COLOUR[lane], ec="#555"))
        ax.text(x0 + 0.1, y + 0.68, f"{i + 1}. {title}", fontsize=9, weight="bold", va="center")
        lines = textwrap.wrap("  ".join(modules), 128)
        ax.text(x0 + 0.1, y + 0.33, "\n".join(lines), fontsize=7, family="monospace", va="center", color="#222")
        if i:
            ax.annotate("", xy=(6.0, y + 0.9), xytext=(6.0, y + 1.06), arrowprops={"arrowstyle": "->", "color": "#333"})
    for k, (lane, name) in enumerate(LANE_NAME.items()):
        ax.add_patch(FancyBboxPatch((0.1 + 2.9 * k, rows + 0.05), 0.25, 0.25, boxstyle="round,pad=0.01", fc=LANE_COLOUR[lane], ec="#555"))
        ax.text(0.45 + 2.9 * k, rows + 0.18, name, fontsize=8, va="center")
    ax.text(0.1, -0.45, "offline (the same preprocess_backend code reads the training and evaluation series):", fontsize=9, weight="bold")
    for k, (title, modules) in enumerate(OFFLINE):
        ax.text(0.2, -0.9 - 0.45 * k, f"{title}: " + "  ".join(modules), fontsize=7.5, family="monospace")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="draw the data-flow picture of docs/architecture.md")
    parser.add_argument("--out", type=Path, default=Path("docs/architecture.png"))
    args = parser.parse_args(argv)
    draw(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
