"""False positives on real CT: the real series in ``../shared/realdata`` through the served pipeline.

None of these has nodule truth a sensitivity could be measured on; what they measure is what a
radiologist would have to dismiss: findings per 100 mm of z on real lungs (LIDC-IDRI-0002, GE), on a
real mediastinum with contrast (TotalSegmentator crops, NIfTI written as DICOM), and on a scan
without lungs (the abdominal negative control: no finding expected). On the LIDC slab, findings
on a reader mark (the 2-of-4-reader nodule, sub-3 mm nodule marks: ``damoyolo.data.lidc`` with 3
readers required, as LUNA16) are ignored as LUNA16 ignores irrelevant findings. A series the model contract refuses (the 4 mm-pixel CIP chest) is reported
with its reason: refusing it is the right answer.

    python -m damoyolo.eval.realdata --checkpoint models/ctlesion_damoyolo.pt --out work/eval/realdata
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preprocess_backend.errors import DicomInputError
from preprocess_backend.lesion_filters import LesionFilter
from preprocess_backend.types import Lesion

log = logging.getLogger(__name__)
CROP_PIXEL_MM = 0.75  # in-plane pixel the 1.5 mm NIfTI crops are resampled to (inside the model contract)

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"


@dataclass
class RealSeries:
    name: str
    region: str  # "chest" | "mediastinum" | "abdomen" | "chest-lowres"
    series_dir: Path
    truth: Any = None  # a damoyolo.data Case (LIDC: >= 3-reader nodules, the other reader marks irrelevant)


@dataclass
class RealResult:
    name: str
    region: str
    slices: int
    z_mm: float
    findings: int
    ignored: int
    false_positives: int
    fp_per_100mm: float
    refused: str | None = None
    lesions: list[dict[str, Any]] = field(default_factory=list)


def _nifti_as_dicom(nifti: Path, cache: Path) -> Path:
    import SimpleITK as sitk

    from damoyolo.data.dicom_cache import write_volume_series

    out = cache / nifti.name.replace(".nii.gz", "")
    if out.exists() and any(out.iterdir()):
        return out
    img = sitk.ReadImage(str(nifti))
    hu = sitk.GetArrayFromImage(img).astype(np.float32)
    spacing = list(img.GetSpacing())
    # The crops are 1.5 mm voxels, outside the model contract's 0.4-1.2 mm pixels: resample in-plane
    # to 0.75 mm (linear) so the real anatomy can be looked at; the images are smoother than a scan's.
    if max(spacing[:2]) > CROP_PIXEL_MM:
        from scipy import ndimage

        n_y, n_x = hu.shape[1:]
        hu = ndimage.zoom(hu, (1.0, spacing[1] / CROP_PIXEL_MM, spacing[0] / CROP_PIXEL_MM), order=1)
        # zoom keeps the first and last pixel centres: same origin, spacing from the new counts
        spacing = [(n_x - 1) * spacing[0] / (hu.shape[2] - 1), (n_y - 1) * spacing[1] / (hu.shape[1] - 1), spacing[2]]
    origin = np.asarray(img.GetOrigin())
    write_volume_series(hu, tuple(origin), tuple(spacing), np.asarray(img.GetDirection()), out, nifti.name)
    return out


def real_series(root: Path = REALDATA, cache: Path | None = None) -> list[RealSeries]:
    """The real series that exist under ``root`` (see its README)."""
    cache = cache or Path("work") / "realdata_dicom"
    out = []
    lidc = root / "lidc0002-slab"
    if (lidc / "dicom").is_dir():
        from damoyolo.data.lidc import LidcSource

        case = next(iter(LidcSource(lidc).cases()), None)
        out.append(RealSeries("lidc0002-slab", "chest", lidc / "dicom", case))
    for name in ("pulmonary_report_ct_cropped", "aorta_report_ct_cropped"):
        nifti = root / "totalseg-chest-crops" / f"{name}.nii.gz"
        if nifti.exists():
            out.append(RealSeries(f"totalseg-{name.split('_')[0]}-crop", "mediastinum", _nifti_as_dicom(nifti, cache)))
    abdomen = root / "totalseg-abdomen-nonchest" / "example_ct_dicom"
    if abdomen.is_dir():
        out.append(RealSeries("totalseg-abdomen-nonchest", "abdomen", abdomen))
    cip = root / "cip-ct64-chest" / "ct-64Dicom"
    if cip.is_dir():
        out.append(RealSeries("cip-ct64-chest", "chest-lowres", cip))
    return out


def _count(findings: list[Lesion], truth: Any) -> tuple[int, int]:
    """(false positives, ignored): LUNA16 matching against the truth nodules and irrelevant findings."""
    if truth is None:
        return len(findings), 0
    from preprocess_backend.matching import match_lesions

    m = match_lesions(findings, truth, 1.0, tuple(truth.irrelevant))
    ignored = sum(1 for i in range(len(findings)) if m.lesion_nodule[i] is None and m.ignored(i))
    fp = sum(1 for i in range(len(findings)) if m.lesion_nodule[i] is None and not m.ignored(i))
    return fp, ignored


def evaluate_real(series: list[RealSeries], predict_fn: Any, options: Any, stage: Any, rule: LesionFilter) -> list[RealResult]:
    from damoyolo.eval.fpr_stage import second_stage
    from damoyolo.eval.runner import run_detector_on_case

    results = []
    for s in series:
        try:
            _, candidates = run_detector_on_case(predict_fn, s.series_dir, options)
        except DicomInputError as exc:
            results.append(RealResult(s.name, s.region, 0, math.nan, 0, 0, 0, math.nan, refused=str(exc)))
            continue
        from damoyolo.eval.runner import series_files

        files = series_files(s.series_dir)
        from preprocess_backend.dicom_io import read_header

        zs = sorted(h.position[2] for h in (read_header(p, p.name) for p in files) if h.position)
        spacing = float(np.median(np.diff(zs))) if len(zs) > 1 else 1.0
        z_mm = (zs[-1] - zs[0] + spacing) if zs else math.nan
        findings = second_stage(s.series_dir, candidates, stage, rule)
        fp, ign = _count(findings, s.truth)
        results.append(RealResult(
            s.name, s.region, len(files), round(z_mm, 2), len(findings), ign, fp, round(100.0 * fp / z_mm, 2) if z_mm else math.nan,
            lesions=[{k: v for k, v in les.to_dict().items() if k in ("centre_mm", "diameter_mm", "max_score", "detector_score", "fpr_probability", "kind", "slices")} for les in findings],
        ))  # fmt: skip
    return results


def format_results(results: list[RealResult], title: str) -> str:
    lines = [title, f"{'series':30s} {'region':12s} {'slices':>6s} {'z mm':>7s} {'findings':>8s} {'ignored':>7s} {'FP':>4s} {'FP/100mm':>8s}"]
    for r in results:
        if r.refused:
            lines.append(f"{r.name:30s} {r.region:12s} refused: {r.refused}")
            continue
        lines.append(f"{r.name:30s} {r.region:12s} {r.slices:6d} {r.z_mm:7.1f} {r.findings:8d} {r.ignored:7d} {r.false_positives:4d} {r.fp_per_100mm:8.2f}")
    chest = [r for r in results if not r.refused and r.region in ("chest", "mediastinum")]
    if chest:
        z = sum(r.z_mm for r in chest)
        fp = sum(r.false_positives for r in chest)
        lines.append(f"real chest (lungs + mediastinum): {fp} FP over {z:.0f} mm of z = {100 * fp / z:.2f} per 100 mm")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ctlesion_export.fpr_repo import default_fpr_onnx
    from damoyolo.eval.fpr_stage import FprStage
    from damoyolo.eval.runner import (
        add_scale_arguments,
        onnx_predictor,
        scale_overrides,
        torch_predictor,
    )

    p = argparse.ArgumentParser(prog="python -m damoyolo.eval.realdata", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="detector checkpoint (.pt)")
    p.add_argument("--onnx", type=Path, help="detector ONNX instead of --checkpoint")
    p.add_argument("--fpr-onnx", type=Path, default=None, help="default: the served one, exported from models/ctlesion_fpr.pt")
    p.add_argument("--realdata", type=Path, default=REALDATA)
    p.add_argument("--out", type=Path, required=True)
    add_scale_arguments(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    predict_fn, info = onnx_predictor(a.onnx) if a.onnx else torch_predictor(a.checkpoint or Path("models/ctlesion_damoyolo.pt"))
    series = real_series(a.realdata, a.out / "dicom")
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    texts = []
    fpr_onnx = a.fpr_onnx or default_fpr_onnx()
    stage = FprStage(fpr_onnx) if fpr_onnx.exists() else None
    runs = [("article threshold 0.3, no FPR", None, LesionFilter(3.0, 30.0, 0.3), 0.3)]
    if stage is not None:
        runs.append((f"shipped default: FPR ({stage.info.rule}), threshold {stage.info.operating_threshold:.3f}", stage,
                     LesionFilter(3.0, 30.0, stage.info.operating_threshold), stage.info.candidate_threshold))  # fmt: skip
    for title, st, rule, candidate in runs:
        options = info.options(score_threshold=candidate, **scale_overrides(a, info))
        results = evaluate_real(series, predict_fn, options, st, rule)
        report[title] = [asdict(r) for r in results]
        texts.append(format_results(results, title))
    (a.out / "realdata.json").write_text(json.dumps(report, indent=1, default=lambda v: None))
    print("\n\n".join(texts))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
