"""LUNA16 on disk: ``subset0..subset9/*.mhd`` (+ ``.raw``), ``annotations.csv``,
``annotations_excluded.csv`` and, where present, ``candidates.csv`` (or ``candidates_V2.csv``).

Coordinates stay LUNA16's world coordinates (coordX/Y/Z, mm), which are the DICOM patient frame
(LPS) of the image: SimpleITK reads each volume's origin, spacing and direction, and the cache
writes the volume as a DICOM series with that same geometry (``dicom_cache``). The fold of a scan
is its subset number: the official protocol is 10-fold cross-validation by subset.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from damoyolo.data.dicom_cache import cached_series
from damoyolo.data.types import Case, Nodule

FOLDS = 10
_SUBSET = re.compile(r"^subset(\d+)$")
_CSV_DIRS = (".", "CSVFILES", "evaluationScript/annotations", "annotations")


def _find_csv(root: Path, names: tuple[str, ...]) -> Path | None:
    for d in _CSV_DIRS:
        for n in names:
            if (root / d / n).is_file():
                return root / d / n
    return None


def read_findings(path: Path | None) -> dict[str, list[Nodule]]:
    """seriesuid -> findings of an annotations-style CSV (seriesuid, coordX, coordY, coordZ, diameter_mm)."""
    out: dict[str, list[Nodule]] = {}
    if path is None:
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            uid = row["seriesuid"].strip()
            found = out.setdefault(uid, [])
            diameter = float(row.get("diameter_mm") or -1.0)
            found.append(Nodule(len(found) + 1, (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])), diameter))
    return out


def read_candidates(path: Path | None) -> dict[str, list[tuple[tuple[float, float, float], int]]]:
    out: dict[str, list[tuple[tuple[float, float, float], int]]] = {}
    if path is None:
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            centre = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
            out.setdefault(row["seriesuid"].strip(), []).append((centre, int(float(row["class"]))))
    return out


@dataclass
class Luna16Source:
    """``luna16:DIR``; volumes are written as DICOM into ``cache_dir`` the first time a case is read."""

    root: Path
    cache_dir: Path
    name: str = "luna16"

    def volumes(self) -> list[tuple[int, Path]]:
        found = []
        for d in sorted(Path(self.root).iterdir()):
            m = _SUBSET.match(d.name)
            if m and d.is_dir():
                found += [(int(m.group(1)), p) for p in sorted(d.glob("*.mhd"))]
        if not found:
            raise FileNotFoundError(f"no subset*/ *.mhd volumes under {self.root}")
        return found

    def cases(self, folds: set[int] | None = None) -> Iterator[Case]:
        nodules = read_findings(_find_csv(self.root, ("annotations.csv",)))
        if not nodules and _find_csv(self.root, ("annotations.csv",)) is None:
            raise FileNotFoundError(f"no annotations.csv under {self.root}")
        excluded = read_findings(_find_csv(self.root, ("annotations_excluded.csv",)))
        candidates = read_candidates(_find_csv(self.root, ("candidates_V2.csv", "candidates.csv")))
        for fold, mhd in self.volumes():
            if folds is not None and fold not in folds:
                continue
            uid = mhd.stem
            yield Case(
                case_id=uid,
                nodules=nodules.get(uid, []),
                irrelevant=excluded.get(uid, []),
                fold=fold,
                source=str(mhd),
                candidates=candidates.get(uid, []),
                series=partial(cached_series, mhd, self.cache_dir, uid),
            )
