"""Structured report of one series, as the article describes it: findings with location (side, lobe
guess, slice), size (mm), characteristic (solid / part-solid / ground-glass by mean HU) and confidence.

``write_report`` writes ``report.json`` plus one PNG per finding (its key slice = the slice where the
detector scored it highest, lung window, box drawn, caption). ``format_findings_table`` is the
terminal view. Only UIDs, geometry and findings are written: no patient identifiers (name, ID,
birth date, ...) are read from the DICOM files, so none can leak into the report or the logs.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ctlesion_client.result import SeriesResult
from preprocess_backend.dicom_io import decode_slice
from preprocess_backend.errors import DicomInputError
from preprocess_backend.types import Detection, Lesion
from preprocess_backend.windowing import window_slice

log = logging.getLogger(__name__)

SCHEMA = "ctlesion.report/1"
COLOURS = {"solid": (255, 59, 48), "part-solid": (255, 204, 0), "ground-glass": (52, 199, 89), None: (0, 170, 255)}
DISCLAIMER = (
    "Computer-aided detection output for review by a radiologist. Side and lobe are guesses from "
    "the position in the series; characteristic is from mean HU (ground-glass <= -600, solid >= -300)."
)
ImageSource = bytes | str | Path


@dataclass
class Finding:
    """One reported finding (a 3D lesion, or a 2D box on an image without patient geometry)."""

    finding_id: int
    side: str | None
    lobe_guess: str | None
    key_slice: int  # 1-based, position order
    slice_range: tuple[int, int]  # 1-based, inclusive
    centre_mm_lps: tuple[float, float, float] | None
    diameter_mm: float | None
    z_extent_mm: float | None
    characteristic: str | None
    mean_hu: float | None
    max_score: float
    mean_score: float
    num_detections: int
    key_sop_instance_uid: str
    key_box_px: tuple[float, float, float, float] | None
    overlay: str | None = None  # PNG file name, relative to the report folder

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.finding_id,
            "location": {
                "side": self.side,
                "lobe_guess": self.lobe_guess,
                "key_slice": self.key_slice,
                "slice_range": list(self.slice_range),
                "centre_mm_lps": None if self.centre_mm_lps is None else [round(v, 2) for v in self.centre_mm_lps],
            },
            "size": {"diameter_mm": _round(self.diameter_mm), "z_extent_mm": _round(self.z_extent_mm)},
            "characteristic": self.characteristic,
            "mean_hu": _round(self.mean_hu, 1),
            "confidence": {"max": round(self.max_score, 4), "mean": round(self.mean_score, 4)},
            "num_detections": self.num_detections,
            "key_image": {
                "sop_instance_uid": self.key_sop_instance_uid,
                "box_px": None if self.key_box_px is None else [round(v, 1) for v in self.key_box_px],
                "overlay": self.overlay,
            },
        }


@dataclass
class ReportFiles:
    json_path: Path
    overlays: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _round(value: float | None, digits: int = 2) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _from_lesion(result: SeriesResult, lesion: Lesion, finding_id: int) -> Finding:
    key = result.key_detection(lesion)
    key_index = key.slice_index if key is not None else lesion.slices[len(lesion.slices) // 2]
    return Finding(
        finding_id=finding_id,
        side=lesion.side,
        lobe_guess=lesion.lobe,
        key_slice=result.slice_number(key_index),
        slice_range=(result.slice_number(min(lesion.slices)), result.slice_number(max(lesion.slices))),
        centre_mm_lps=tuple(float(v) for v in lesion.centre_mm),  # type: ignore[arg-type]
        diameter_mm=_finite(lesion.diameter_mm),
        z_extent_mm=_finite(lesion.z_extent_mm),
        characteristic=lesion.characteristic,
        mean_hu=_finite(lesion.mean_hu),
        max_score=float(lesion.max_score),
        mean_score=float(lesion.mean_score),
        num_detections=int(lesion.num_detections),
        key_sop_instance_uid=key.sop_instance_uid if key is not None else result.sop_instance_uids[key_index],
        key_box_px=None if key is None else tuple(float(v) for v in key.box_px),  # type: ignore[arg-type]
    )


def _from_detection(result: SeriesResult, det: Detection, finding_id: int) -> Finding:
    # Radiographs (no patient geometry): each box is its own finding, without side / lobe.
    from preprocess_backend.lesions import classify_density

    hu = _finite(det.mean_hu)
    return Finding(
        finding_id=finding_id,
        side=None,
        lobe_guess=None,
        key_slice=result.slice_number(det.slice_index),
        slice_range=(result.slice_number(det.slice_index),) * 2,  # type: ignore[arg-type]
        centre_mm_lps=None,
        diameter_mm=_finite(det.diameter_mm),
        z_extent_mm=None,
        characteristic=classify_density(det.mean_hu) if result.modality == "CT" else None,
        mean_hu=hu if result.modality == "CT" else None,
        max_score=float(det.score),
        mean_score=float(det.score),
        num_detections=1,
        key_sop_instance_uid=det.sop_instance_uid,
        key_box_px=tuple(float(v) for v in det.box_px),  # type: ignore[arg-type]
    )


def findings_of(result: SeriesResult) -> list[Finding]:
    """Findings, highest confidence first: the 3D lesions, or the boxes when there is no geometry."""
    if result.geometry is not None or result.lesions:
        return [_from_lesion(result, les, i) for i, les in enumerate(result.lesions, start=1)]
    dets = sorted(result.detections, key=lambda d: -d.score)
    return [_from_detection(result, d, i) for i, d in enumerate(dets, start=1)]


# ----------------------------------------------------------------------------- terminal


def _location(f: Finding) -> str:
    if f.side is None:
        return "-"
    return f"{f.side} {f.lobe_guess}" if f.lobe_guess else f.side


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_findings_table(result: SeriesResult, findings: list[Finding] | None = None) -> str:
    """A fixed-width table of the findings for terminals (one line per finding)."""
    findings = findings_of(result) if findings is None else findings
    head = (
        f"series {result.series_instance_uid} ({result.modality or '?'}, {result.num_slices} slices, "
        f"{result.num_slabs} slabs): {len(findings)} finding(s)"
    )
    if not findings:
        return head + "\n  no findings above the score threshold"
    rows = [("#", "location (guess)", "slice", "size mm", "characteristic", "mean HU", "score")]
    for f in findings:
        rows.append((
            str(f.finding_id),
            _location(f),
            f"{f.key_slice}/{result.num_slices}" + (f" ({f.slice_range[0]}-{f.slice_range[1]})" if f.slice_range[0] != f.slice_range[1] else ""),
            _num(f.diameter_mm, ".1f"),
            f.characteristic or "-",
            _num(f.mean_hu, ".0f"),
            f"{f.max_score:.2f}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head]
    for n, row in enumerate(rows):
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- overlays


def _caption(result: SeriesResult, f: Finding) -> list[str]:
    if f.side is None:
        where = "location n/a"
    else:
        where = f"{f.side} lung" + (f", {f.lobe_guess} lobe" if f.lobe_guess else "") + " (guess)"
    size = "size n/a" if f.diameter_mm is None else f"{f.diameter_mm:.1f} mm"
    kind = f.characteristic or "characteristic n/a"
    if f.mean_hu is not None:
        kind += f" ({f.mean_hu:.0f} HU)"
    return [
        f"Finding {f.finding_id}: {where} | slice {f.key_slice}/{result.num_slices}",
        f"{size} | {kind} | confidence {f.max_score:.2f}",
    ]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def render_overlay(data: ImageSource, result: SeriesResult, finding: Finding, out_path: Path) -> Path:
    """Key slice in the lung window (CT) or the file's window, the box, and a caption bar below."""
    sl = decode_slice(data)
    try:
        gray = window_slice(sl, "lung" if sl.is_ct else "file", dtype=np.uint8)
    except DicomInputError:  # no usable window in the file: stretch min..max
        lo, hi = float(np.min(sl.hu)), float(np.max(sl.hu))
        gray = ((sl.hu - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")
    scale = max(1, round(512 / max(image.size)))  # small matrices are enlarged so the box stays visible
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    colour = COLOURS.get(finding.characteristic, COLOURS[None])
    draw = ImageDraw.Draw(image)
    if finding.key_box_px is not None:
        x1, y1, x2, y2 = (v * scale for v in finding.key_box_px)
        pad = 4  # a margin so the outline does not hide the nodule's edge
        draw.rectangle((x1 - pad, y1 - pad, x2 + pad, y2 + pad), outline=colour, width=2)
        draw.text((x1 - pad, max(0.0, y1 - pad - 16)), str(finding.finding_id), fill=colour, font=_font(14))
    font = _font(max(12, image.width // 40))
    lines = _caption(result, finding)
    line_h = int(font.size * 1.35) if hasattr(font, "size") else 14
    canvas = Image.new("RGB", (image.width, image.height + line_h * len(lines) + 12), (0, 0, 0))
    canvas.paste(image, (0, 0))
    text = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        text.text((8, image.height + 6 + i * line_h), line, fill=(255, 255, 255), font=font)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, format="PNG")  # Pillow writes no text chunks unless given pnginfo
    return out_path


def _image_lookup(result: SeriesResult, images: Mapping[str, ImageSource] | None) -> dict[str, ImageSource]:
    """SOPInstanceUID -> bytes or file of the slice: ``images`` first, else the result's own files."""
    lookup: dict[str, ImageSource] = {}
    for uid, source in zip(result.sop_instance_uids, result.sources, strict=False):
        if Path(source).is_file():
            lookup[uid] = Path(source)
    if images:
        lookup.update(images)
    return lookup


# ----------------------------------------------------------------------------- the report


def report_dict(result: SeriesResult, findings: list[Finding]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for f in findings:
        key = f.characteristic or "unknown"
        counts[key] = counts.get(key, 0) + 1
    return {
        "schema": SCHEMA,
        "generated_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "algorithm": {"name": "ctlesion DAMO-YOLO", "model": result.model_name},
        "study_instance_uid": result.study_instance_uid,
        "series_instance_uid": result.series_instance_uid,
        "modality": result.modality,
        "num_slices": result.num_slices,
        "summary": {"findings": len(findings), "by_characteristic": counts},
        "findings": [f.to_dict() for f in findings],
        "options": result.options,
        "warnings": list(result.warnings),
        "timings_s": {k: round(v, 4) for k, v in result.timings.items() if math.isfinite(v)},
        "disclaimer": DISCLAIMER,
    }


def write_report(
    result: SeriesResult,
    out_dir: str | Path,
    images: Mapping[str, ImageSource] | None = None,
    overlays: bool = True,
) -> ReportFiles:
    """Write ``report.json`` and ``finding_NN.png`` into ``out_dir`` (older ``finding_*.png`` there are removed).

    ``images`` maps SOPInstanceUID -> Part-10 bytes or file; without it the files the result was
    read from are used (a series detected from bytes, e.g. from a PACS, needs ``images``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("finding_*.png"):  # a rerun with fewer findings must not leave old overlays
        stale.unlink()
    findings = findings_of(result)
    files = ReportFiles(json_path=out / "report.json")
    lookup = _image_lookup(result, images) if overlays else {}
    for f in findings:
        if not overlays:
            break
        source = lookup.get(f.key_sop_instance_uid)
        if source is None:
            files.warnings.append(f"finding {f.finding_id}: key slice {f.key_sop_instance_uid} not available, no overlay")
            continue
        name = f"finding_{f.finding_id:02d}.png"
        try:
            files.overlays.append(render_overlay(source, result, f, out / name))
            f.overlay = name
        except (DicomInputError, OSError) as exc:
            files.warnings.append(f"finding {f.finding_id}: overlay failed: {exc}")
    data = report_dict(result, findings)
    data["warnings"] += files.warnings
    files.json_path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    log.info("report of series %s: %d finding(s) -> %s", result.series_instance_uid, len(findings), out)
    return files
