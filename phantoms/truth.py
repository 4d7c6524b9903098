"""Ground truth of one case (what a detector should find) and its JSON form."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ScanGeometry:
    """Axial LPS geometry. Voxel (k, i, j) = (slice index in ascending z, row, column).

    Patient mm of voxel (k, i, j) = origin + j * col_spacing * x + i * row_spacing * y + k * slice_spacing * z,
    i.e. ImagePositionPatient of slice k is origin + (0, 0, k * slice_spacing).
    """

    rows: int
    columns: int
    slices: int
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm, as DICOM PixelSpacing
    slice_spacing: float  # mm between slice centres
    slice_thickness: float  # mm, nominal reconstructed thickness
    origin: tuple[float, float, float]  # ImagePositionPatient of slice 0 (lowest z), mm
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

    def voxel_to_mm(self, kij: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """(k, i, j) [..., 3] -> LPS mm [..., 3]."""
        v = np.asarray(kij, dtype=np.float64)
        o = np.asarray(self.origin, dtype=np.float64)
        return np.stack(
            [
                o[0] + v[..., 2] * self.pixel_spacing[1],
                o[1] + v[..., 1] * self.pixel_spacing[0],
                o[2] + v[..., 0] * self.slice_spacing,
            ],
            axis=-1,
        )

    def mm_to_voxel(self, xyz: np.ndarray | tuple[float, float, float]) -> np.ndarray:
        """LPS mm [..., 3] -> continuous (k, i, j) [..., 3]."""
        p = np.asarray(xyz, dtype=np.float64) - np.asarray(self.origin, dtype=np.float64)
        return np.stack(
            [p[..., 2] / self.slice_spacing, p[..., 1] / self.pixel_spacing[0], p[..., 0] / self.pixel_spacing[1]],
            axis=-1,
        )

    def slice_positions(self) -> np.ndarray:
        """ImagePositionPatient of every slice [slices, 3], ascending z."""
        k = np.arange(self.slices, dtype=np.float64)
        pos = np.repeat(np.asarray(self.origin, dtype=np.float64)[None], self.slices, axis=0)
        pos[:, 2] += k * self.slice_spacing
        return pos

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScanGeometry:
        return cls(
            rows=int(d["rows"]),
            columns=int(d["columns"]),
            slices=int(d["slices"]),
            pixel_spacing=tuple(d["pixel_spacing"]),  # type: ignore[arg-type]
            slice_spacing=float(d["slice_spacing"]),
            slice_thickness=float(d["slice_thickness"]),
            origin=tuple(d["origin"]),  # type: ignore[arg-type]
            orientation=tuple(d.get("orientation", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))),
        )


@dataclass
class NoduleTruth:
    """One nodule. centre_voxel is continuous (k, i, j); round it to index the volume."""

    nodule_id: int
    centre_mm: tuple[float, float, float]  # LPS patient mm
    centre_voxel: tuple[float, float, float]  # (z index in position order, row, column)
    diameter_mm: float
    type: str  # solid | part_solid | ground_glass
    attachment: str  # isolated | juxtavascular | juxtapleural
    mean_hu: float  # intended mean HU inside the nodule before noise and blur
    core_diameter_mm: float | None = None  # part-solid only: diameter of the solid core
    side: str = ""  # "right" | "left" lung (patient side)
    # additive (profile "wide" and the test generator fill them; "" = not recorded)
    subtype: str = ""  # "" | "calcified" | "cavitary" (both solid by density)
    margin: str = ""  # "" | "round" | "lobulated" | "spiculated"
    is_mass: bool = False  # diameter > 30 mm: a mass, not a nodule (reported as such)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoduleTruth:
        d = _known(cls, d)
        d["centre_mm"] = tuple(d["centre_mm"])
        d["centre_voxel"] = tuple(d["centre_voxel"])
        return cls(**d)


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """Keys of ``d`` that ``cls`` has: truth written by a newer generator still loads (fields are additive)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class CaseTruth:
    case_id: str
    seed: int
    geometry: ScanGeometry
    nodules: list[NoduleTruth] = field(default_factory=list)
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    noise_hu: float = 0.0
    psf_sigma_mm: float = 0.0
    generator_version: str = ""
    profile: str = ""  # generator profile ("default", "wide") or the test generator's name
    scanner: dict[str, Any] = field(default_factory=dict)  # additive: kernel, dose, padding, artefacts

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["geometry"] = self.geometry.to_dict()
        d["nodules"] = [n.to_dict() for n in self.nodules]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseTruth:
        d = _known(cls, d)
        d["geometry"] = ScanGeometry.from_dict(d["geometry"])
        d["nodules"] = [NoduleTruth.from_dict(n) for n in d.get("nodules", [])]
        return cls(**d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> CaseTruth:
        return cls.from_dict(json.loads(Path(path).read_text()))
