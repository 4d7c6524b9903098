"""Series assembly: group by SeriesInstanceUID, order by position along the slice normal, report defects.

Order comes from ImagePositionPatient projected on the normal of ImageOrientationPatient (ascending),
never from InstanceNumber or file names, which scanners and PACS routinely get wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from preprocess_backend.dicom_io import DecodedSlice, DicomHeader, slice_normal
from preprocess_backend.errors import DicomInputError

POSITION_TOL_MM = 0.01  # two slices closer than this along the normal are duplicates
ORIENTATION_TOL = 1e-3  # direction-cosine difference still counted as the same orientation
GAP_FACTOR = 1.5  # a spacing above GAP_FACTOR x the median spacing is a gap


@dataclass
class SeriesGeometry:
    """What 3D work needs (mm, LPS): per-slice positions plus the shared in-plane geometry."""

    positions: np.ndarray  # float64 [Z, 3] ImagePositionPatient, in series order
    orientation: np.ndarray  # float64 [6] ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    rows: int = 0
    columns: int = 0
    slice_thickness: float | None = None
    sop_instance_uids: list[str] = field(default_factory=list)

    @property
    def normal(self) -> np.ndarray:
        return slice_normal(self.orientation)

    @property
    def z(self) -> np.ndarray:
        """Position of each slice along the normal (mm)."""
        return self.positions @ self.normal

    @property
    def slice_spacing(self) -> float:
        z = np.sort(self.z)
        d = np.diff(z)
        d = d[d > POSITION_TOL_MM]
        if d.size:
            return float(np.median(d))
        return float(self.slice_thickness or 1.0)

    def pixel_to_patient(self, slice_index: np.ndarray | float, col: np.ndarray | float, row: np.ndarray | float) -> np.ndarray:
        """Patient LPS mm of (column, row) pixel coordinates on slice ``slice_index`` ([..., 3])."""
        idx = np.clip(np.asarray(slice_index, dtype=np.int64), 0, len(self.positions) - 1)
        x_dir, y_dir = self.orientation[:3], self.orientation[3:]
        col = np.asarray(col, dtype=np.float64)[..., None]
        row = np.asarray(row, dtype=np.float64)[..., None]
        return self.positions[idx] + col * self.pixel_spacing[1] * x_dir + row * self.pixel_spacing[0] * y_dir

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["positions"] = self.positions.tolist()
        d["orientation"] = self.orientation.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeriesGeometry:
        return cls(
            positions=np.asarray(d["positions"], dtype=np.float64).reshape(-1, 3),
            orientation=np.asarray(d["orientation"], dtype=np.float64),
            pixel_spacing=tuple(d["pixel_spacing"]),  # type: ignore[arg-type]
            rows=int(d.get("rows", 0)),
            columns=int(d.get("columns", 0)),
            slice_thickness=d.get("slice_thickness"),
            sop_instance_uids=list(d.get("sop_instance_uids", [])),
        )


@dataclass
class SeriesReport:
    """Defects found while assembling; empty lists mean a clean, regular series."""

    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (uid kept first, uid at same position)
    repeated_instances: list[str] = field(default_factory=list)  # same SOPInstanceUID sent twice (dropped)
    gaps: list[tuple[int, float]] = field(default_factory=list)  # (index after which the gap is, spacing mm)
    inconsistent: list[str] = field(default_factory=list)  # human-readable geometry problems
    other_series: list[str] = field(default_factory=list)  # series left out when mixing was allowed
    median_spacing_mm: float | None = None
    # leniency applied (empty UIDs filled in, a decoder fallback, ...): not defects, but said in results
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.gaps or self.inconsistent or self.repeated_instances)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Series:
    """Slices of one series in order along the normal."""

    series_instance_uid: str
    slices: list[DecodedSlice]
    z: np.ndarray  # float64 [Z] position along the normal (zeros when there is no geometry)
    report: SeriesReport

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def has_geometry(self) -> bool:
        s = self.slices[0]
        return all(x.position is not None and x.orientation is not None for x in self.slices) and s.pixel_spacing is not None

    @property
    def geometry(self) -> SeriesGeometry:
        if not self.has_geometry:
            raise DicomInputError(self.slices[0].source, "missing ImagePositionPatient / ImageOrientationPatient / PixelSpacing")
        first = self.slices[0]
        return SeriesGeometry(
            positions=np.array([s.position for s in self.slices], dtype=np.float64),
            orientation=np.asarray(first.orientation, dtype=np.float64),
            pixel_spacing=first.pixel_spacing,  # type: ignore[arg-type]
            rows=first.rows,
            columns=first.columns,
            slice_thickness=first.slice_thickness,
            sop_instance_uids=[s.sop_instance_uid for s in self.slices],
        )

    def volume(self) -> np.ndarray:
        """float32 [Z, H, W] HU; needs every slice to have the same size."""
        shapes = {s.hu.shape for s in self.slices}
        if len(shapes) != 1:
            raise DicomInputError(self.slices[0].source, f"slices of different sizes {sorted(shapes)} cannot be stacked")
        return np.stack([s.hu for s in self.slices])


DERIVED_KEY_PREFIX = "derived:"


def series_key(s: DecodedSlice | DicomHeader) -> str:
    """SeriesInstanceUID; where a real archive left it empty, a key from what a series shares:
    FrameOfReferenceUID (else StudyInstanceUID), orientation and pixel spacing (rounded)."""
    if s.series_instance_uid:
        return s.series_instance_uid

    def fmt(values: Sequence[float] | None, digits: int) -> str:
        return "-" if values is None else "/".join(f"{round(float(v), digits) + 0.0:.{digits}f}" for v in values)

    frame = s.frame_of_reference_uid or s.study_instance_uid or "-"
    return f"{DERIVED_KEY_PREFIX}{frame}:{fmt(s.orientation, 3)}:{fmt(s.pixel_spacing, 4)}"


def group_by_series(slices: Sequence[DecodedSlice]) -> dict[str, list[DecodedSlice]]:
    """Series key (``series_key``: SeriesInstanceUID, or a derived key when empty) -> slices, first-seen order."""
    groups: dict[str, list[DecodedSlice]] = {}
    for s in slices:
        groups.setdefault(series_key(s), []).append(s)
    return groups


def _leniency_warnings(slices: Sequence[DecodedSlice], key: str) -> list[str]:
    """Per-slice warnings counted once each, plus the derived series key when one was used."""
    counts: dict[str, int] = {}
    for s in slices:
        for w in s.warnings:
            counts[w] = counts.get(w, 0) + 1
    out = [f"{n} slice(s): {w}" for w, n in counts.items()]
    if key.startswith(DERIVED_KEY_PREFIX):
        out.append(f"SeriesInstanceUID empty: slices grouped by FrameOfReferenceUID + orientation + spacing ({key})")
    return out


def _check_geometry(slices: Sequence[DecodedSlice], report: SeriesReport) -> None:
    first = slices[0]
    for s in slices[1:]:
        if s.hu.shape != first.hu.shape:
            report.inconsistent.append(f"{s.source}: size {s.hu.shape} differs from {first.hu.shape}")
        if s.pixel_spacing is not None and first.pixel_spacing is not None and not np.allclose(s.pixel_spacing, first.pixel_spacing, atol=1e-3):
            report.inconsistent.append(f"{s.source}: PixelSpacing {s.pixel_spacing} differs from {first.pixel_spacing}")
        if s.orientation is not None and first.orientation is not None and not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_TOL):
            report.inconsistent.append(f"{s.source}: ImageOrientationPatient differs from the first slice")
        if s.frame_of_reference_uid != first.frame_of_reference_uid:
            report.inconsistent.append(f"{s.source}: FrameOfReferenceUID differs from the first slice")


def assemble_series(slices: Sequence[DecodedSlice], allow_mixed: bool = False) -> Series:
    """Order the slices of one series by position along the normal and report defects.

    Several series in one input raise ``DicomInputError`` unless ``allow_mixed``: then the largest
    series is kept and the others are listed in ``report.other_series``. A single slice without
    geometry (CR / DX radiograph) is a valid 1-slice series; several slices without it are refused.
    """
    if not slices:
        raise DicomInputError("series", "no slices")
    report = SeriesReport()
    groups = group_by_series(slices)
    if len(groups) > 1:
        if not allow_mixed:
            names = ", ".join(f"{uid or '<none>'} ({len(g)})" for uid, g in groups.items())
            raise DicomInputError(slices[0].source, f"mixed series in one request: {names}")
        keep = max(groups, key=lambda uid: len(groups[uid]))
        report.other_series = [uid for uid in groups if uid != keep]
        slices = groups[keep]
    uid = slices[0].series_instance_uid
    report.warnings = _leniency_warnings(slices, series_key(slices[0]))

    unique: list[DecodedSlice] = []
    seen: set[tuple[str, int]] = set()
    for s in slices:
        key = (s.sop_instance_uid, s.frame_index)
        if s.sop_instance_uid and key in seen:
            report.repeated_instances.append(s.sop_instance_uid)
            continue
        seen.add(key)
        unique.append(s)
    slices = unique

    _check_geometry(slices, report)
    if len(slices) == 1:
        s = slices[0]
        z = np.array([float(np.dot(s.position, s.normal))]) if s.position is not None and s.orientation is not None else np.zeros(1)
        return Series(uid, list(slices), z, report)

    missing = [s.source for s in slices if s.position is None or s.orientation is None]
    if missing:
        raise DicomInputError(missing[0], f"missing ImagePositionPatient / ImageOrientationPatient needed to order {len(slices)} slices")
    normal = slice_normal(slices[0].orientation)  # type: ignore[arg-type]
    positions = np.array([s.position for s in slices], dtype=np.float64)
    z = positions @ normal
    order = np.argsort(z, kind="stable")
    ordered = [slices[i] for i in order]
    z = z[order]

    # Positions should move along the normal only; in-plane drift means tilt or a mixed stack.
    pos = positions[order]
    drift = pos - pos[0] - np.outer(z - z[0], normal)
    if np.max(np.linalg.norm(drift, axis=1)) > 1.0:
        report.inconsistent.append("slice positions drift in-plane (> 1 mm): gantry tilt or mixed stacks")

    d = np.diff(z)
    for i in np.nonzero(d <= POSITION_TOL_MM)[0]:
        report.duplicates.append((ordered[i].sop_instance_uid, ordered[i + 1].sop_instance_uid))
    steps = d[d > POSITION_TOL_MM]
    if steps.size:
        median = float(np.median(steps))
        report.median_spacing_mm = median
        for i in np.nonzero(d > GAP_FACTOR * median)[0]:
            report.gaps.append((int(i), float(d[i])))
    return Series(uid, ordered, z, report)


def slice_from_header(h: DicomHeader, **extra: Any) -> DecodedSlice:
    """A header as a pixel-less ``DecodedSlice`` so ``assemble_series`` orders headers exactly as it
    orders decoded slices (the client and the evaluation runner order series this way).

    A zero-stride view of the right shape stands in for the pixels (no memory).
    """
    return DecodedSlice(
        hu=np.broadcast_to(np.float32(0.0), (max(h.rows, 1), max(h.columns, 1))),
        source=h.source,
        sop_instance_uid=h.sop_instance_uid,
        series_instance_uid=h.series_instance_uid,
        study_instance_uid=h.study_instance_uid,
        frame_of_reference_uid=h.frame_of_reference_uid,
        modality=h.modality,
        photometric=h.photometric,
        pixel_spacing=h.pixel_spacing,
        position=h.position,
        orientation=h.orientation,
        slice_thickness=h.slice_thickness,
        instance_number=h.instance_number,
        warnings=list(h.warnings),
        extra=dict(extra),
    )


def assemble_headers(headers: Sequence[DicomHeader], allow_mixed: bool = False) -> Series:
    """``assemble_series`` on headers only; each slice's ``extra["item"]`` is its index in ``headers``."""
    return assemble_series([slice_from_header(h, item=i) for i, h in enumerate(headers)], allow_mixed)
