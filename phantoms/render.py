"""Picture of sample slices with truth circles, read back from the written DICOM (docs/phantoms.png).

    python -m ctlesion_phantoms.render --out docs/phantoms.png [--seed 3 --cases 3]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import pydicom

from ctlesion_phantoms.config import PhantomConfig
from ctlesion_phantoms.generate import generate_case
from ctlesion_phantoms.truth import CaseTruth

LUNG = (-600.0, 1500.0)
COLOURS = {"solid": "#ff3b30", "part_solid": "#ffcc00", "ground_glass": "#34c759"}


def read_series_hu(series_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """HU volume [Z, H, W] ordered by ImagePositionPatient z, and those z positions."""
    items = []
    for path in Path(series_dir).glob("*.dcm"):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        items.append((float(ds.ImagePositionPatient[2]), hu))
    items.sort(key=lambda t: t[0])
    return np.stack([h for _, h in items]), np.array([z for z, _ in items])


def render_cases(case_dirs: list[Path], out_png: Path, panels: int = 6, max_bytes: int = 500_000) -> Path:
    """A grid of lung-window slices through truth nodules, circled and labelled by type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    shots: list[tuple[np.ndarray, CaseTruth, int]] = []
    shown: set[str] = set()
    for case_dir in case_dirs:
        truth = CaseTruth.load(case_dir / "truth.json")
        vol, _ = read_series_hu(case_dir / "series")
        # prefer nodule kinds not shown yet, so the grid has every type and attachment
        order = sorted(truth.nodules, key=lambda n: 2 * (n.type in shown) + (n.attachment in shown))
        for n in order[:2]:
            shown |= {n.type, n.attachment}
            shots.append((vol[int(round(n.centre_voxel[0]))], truth, int(round(n.centre_voxel[0]))))
        if not truth.nodules:
            shots.append((vol[vol.shape[0] // 2], truth, vol.shape[0] // 2))
    shots = shots[:panels]
    cols = 3
    rows = int(np.ceil(len(shots) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.4, rows * 3.6), facecolor="black")
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    lo, hi = LUNG[0] - LUNG[1] / 2, LUNG[0] + LUNG[1] / 2
    for ax, (img, truth, k) in zip(np.atleast_1d(axes).ravel(), shots, strict=False):
        g = truth.geometry
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
        for n in truth.nodules:
            dk = abs(n.centre_voxel[0] - k) * g.slice_spacing
            if dk < n.diameter_mm / 2:
                r_px = np.sqrt((n.diameter_mm / 2) ** 2 - dk**2) / g.pixel_spacing[0]
                ax.add_patch(Circle((n.centre_voxel[2], n.centre_voxel[1]), r_px + 5, fill=False, lw=0.9, color=COLOURS[n.type]))
                ax.text(n.centre_voxel[2] + r_px + 7, n.centre_voxel[1] - r_px - 7, f"{n.diameter_mm:.0f} mm\n{n.attachment}",
                        color=COLOURS[n.type], fontsize=5.5, va="bottom")
        ax.set_title(f"{truth.case_id}  z {k}/{g.slices}  {g.pixel_spacing[0]:.2f} x {g.slice_spacing:g} mm  noise {truth.noise_hu:.0f} HU",
                     color="white", fontsize=6.5)
    handles = [plt.Line2D([], [], color=c, lw=2, label=t.replace("_", "-")) for t, c in COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, labelcolor="white", fontsize=8)
    fig.suptitle("ctlesion phantoms: synthetic chest CT (lung window -600 / 1500), truth nodules circled",
                 color="white", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return _save_png(fig, out_png, max_bytes, dpi=130)


def _save_png(fig: object, out_png: Path, max_bytes: int, dpi: int) -> Path:
    """Noisy grey images compress poorly: shrink until the file fits (a palette would posterise the noise)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, facecolor="black")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    img = Image.open(buf).convert("RGB")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    for scale in (1.0, 0.85, 0.7, 0.55):
        size = (int(img.width * scale), int(img.height * scale))
        img.resize(size, Image.Resampling.LANCZOS).save(out_png, optimize=True)
        if out_png.stat().st_size <= max_bytes:
            break
    return out_png


def render_comparison(out_png: Path, per_row: int = 3, seed: int = 3, max_bytes: int = 600_000) -> Path:
    """docs/testgen.png: axial slices through nodules, one row per generator (default, wide, testgen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctlesion_testgen.generate import TESTGEN_SEED, TestgenConfig
    from ctlesion_testgen.generate import generate_case as testgen_case

    rows: list[tuple[str, list[Path]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for name, cfg in (("default", PhantomConfig(nodules_min=2, p_no_nodules=0.0)),
                          ("wide", PhantomConfig(profile="wide", nodules_min=2, p_no_nodules=0.0))):
            rows.append((f"phantoms, profile {name}", [base / name / generate_case(seed + i, base / name, cfg).case_id for i in range(per_row)]))
        tg_cfg = TestgenConfig(nodules=(2, 5), p_no_nodules=0.0)
        rows.append(("testgen (independent, test only)", [base / "tg" / testgen_case(TESTGEN_SEED + i, base / "tg", tg_cfg)["case_id"] for i in range(per_row)]))
        fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row * 3.3, len(rows) * 3.5), facecolor="black")
        lo, hi = LUNG[0] - LUNG[1] / 2, LUNG[0] + LUNG[1] / 2
        for r, (label, dirs) in enumerate(rows):
            for c, case_dir in enumerate(dirs):
                ax = axes[r, c]
                ax.axis("off")
                truth = CaseTruth.load(case_dir / "truth.json")
                vol, _ = read_series_hu(case_dir / "series")
                big = max(truth.nodules, key=lambda n: n.diameter_mm, default=None)
                k = int(round(big.centre_voxel[0])) if big else vol.shape[0] // 2
                ax.imshow(vol[k], cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
                g = truth.geometry
                extra = truth.scanner.get("kernel", "") if truth.scanner else ""
                ax.set_title(f"{label}\n{g.rows}x{g.columns}, {g.pixel_spacing[0]:.2f} mm, {g.slice_thickness:g}/{g.slice_spacing:g} mm {extra}",
                             color="white", fontsize=6)
        fig.suptitle("lung window -600 / 1500, slice through each case's largest nodule", color="white", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        return _save_png(fig, out_png, max_bytes, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="render sample phantom slices with truth circles")
    p.add_argument("--out", type=Path, default=Path("docs/phantoms.png"))
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--panels", type=int, default=6)
    p.add_argument("--compare", action="store_true", help="docs/testgen.png: default, wide and testgen side by side")
    args = p.parse_args(argv)
    if args.compare:
        out = render_comparison(args.out, per_row=args.cases, seed=args.seed)
        print(f"{out} ({out.stat().st_size // 1024} KB)")
        return 0
    # the picture should show every kind, so the kinds are drawn evenly here
    config = PhantomConfig(nodules_min=3, nodules_max=5, p_no_nodules=0.0,
                           type_weights={"solid": 1.0, "part_solid": 1.0, "ground_glass": 1.0})
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [Path(tmp) / generate_case(args.seed + i, Path(tmp), config).case_id for i in range(args.cases)]
        out = render_cases(dirs, args.out, panels=args.panels)
    print(f"{out} ({out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
