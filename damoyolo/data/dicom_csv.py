"""A plain DICOM folder plus a CSV: the format a hospital team can produce.

``dicomcsv:DIR``: DIR holds one folder per scan (any depth; the case is named by the folder's path
relative to DIR, and the CSV may name it so or by its SeriesInstanceUID) and ``nodules.csv``::

    case,x_mm,y_mm,z_mm,diameter_mm,label,fold
    patient01/ct,-60.5,12.0,-130.25,8.5,nodule,0
    patient01/ct,40.0,-5.0,-110.0,,irrelevant,0

x/y/z are patient coordinates in mm (DICOM LPS: what a viewer shows as the cursor position);
``label`` is ``nodule`` (default) or ``irrelevant`` (scored as LUNA16 scores its excluded findings);
``fold`` (optional) groups scans for cross-validation, else a stable hash of the case picks one.
A scan folder without rows in the CSV is a scan without nodules.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom

from damoyolo.data.lidc import _fold
from damoyolo.data.types import Case, Nodule

CSV_NAME = "nodules.csv"


@dataclass
class DicomCsvSource:
    root: Path
    csv_path: Path | None = None
    name: str = "dicomcsv"

    def _rows(self) -> dict[str, list[dict[str, str]]]:
        path = self.csv_path or Path(self.root) / CSV_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CSV_NAME} in {self.root}")
        rows: dict[str, list[dict[str, str]]] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows.setdefault(row["case"].strip().strip("/"), []).append(row)
        return rows

    def cases(self, folds: set[int] | None = None) -> Iterator[Case]:
        rows = self._rows()
        folders = sorted({p.parent for p in Path(self.root).rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", "")
                          and p.name != CSV_NAME and pydicom.misc.is_dicom(p)})
        known: set[str] = set()
        for folder in folders:
            rel = folder.relative_to(self.root).as_posix()
            uid = str(pydicom.dcmread(next(p for p in sorted(folder.iterdir()) if p.is_file() and pydicom.misc.is_dicom(p)),
                                      stop_before_pixels=True).SeriesInstanceUID)
            key = rel if rel in rows or uid not in rows else uid  # the CSV may name a scan either way
            known.add(key)
            nodules: list[Nodule] = []
            irrelevant: list[Nodule] = []
            fold = _fold(key)
            for r in rows.get(key, []):
                target = irrelevant if (r.get("label") or "nodule").strip().lower() == "irrelevant" else nodules
                centre = (float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"]))
                target.append(Nodule(len(target) + 1, centre, float(r.get("diameter_mm") or -1.0)))
                if (r.get("fold") or "").strip():
                    fold = int(r["fold"])
            if folds is not None and fold not in folds:
                continue
            yield Case(rel, nodules, irrelevant, fold, str(folder), series=lambda f=folder: f)
        missing = set(rows) - known
        if missing:
            raise FileNotFoundError(f"{CSV_NAME} names scans with no DICOM folder under {self.root}: {sorted(missing)[:5]}")
