"""The one data interface training, validation and evaluation share: a ``Case`` is a DICOM series
(written once into a cache folder for formats that are volumes, so the detector always reads
through the server's DICOM path) plus its nodule truth and irrelevant findings in patient mm (LPS)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Nodule:
    """A finding in patient coordinates (LPS mm, the frame of DICOM and of LUNA16's coordX/Y/Z)."""

    nodule_id: int
    centre_mm: tuple[float, float, float]
    diameter_mm: float  # <= 0: unknown (LUNA16's excluded findings; matched as 10 mm)
    readers: int | None = None  # LIDC: how many of the 4 readers marked it
    type: str = "unknown"  # solid / part-solid / ground-glass where a source knows it
    attachment: str = "unknown"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Case:
    """One scan: where its DICOM series is, its truth nodules, its irrelevant findings, its fold."""

    case_id: str
    nodules: list[Nodule]
    irrelevant: list[Nodule] = field(default_factory=list)
    fold: int | None = None  # LUNA16: the subset number (0..9)
    source: str = ""  # the file or folder the case was read from
    candidates: list[tuple[tuple[float, float, float], int]] = field(default_factory=list)  # LUNA16 candidates.csv: (centre mm, class)
    series: Callable[[], Path] | None = field(default=None, repr=False)  # -> folder of the DICOM series

    def series_dir(self) -> Path:
        """The DICOM series folder (a MetaImage volume is written into the cache on first use)."""
        if self.series is None:
            raise FileNotFoundError(f"case {self.case_id} has no image")
        return self.series()

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "fold": self.fold,
            "source": self.source,
            "nodules": [n.to_dict() for n in self.nodules],
            "irrelevant": [n.to_dict() for n in self.irrelevant],
        }


class CaseSource(Protocol):
    """A data set in some on-disk format; ``cases`` yields its scans (optionally of some folds only)."""

    name: str

    def cases(self, folds: set[int] | None = None) -> Iterator[Case]: ...


class DataError(ValueError):
    """A data set that cannot be used as asked (wrong spec, empty folds): the user's input, not a bug."""
