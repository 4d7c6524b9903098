"""Knobs of the phantom generator. Defaults give realistic chest CT; tests shrink them for speed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

NODULE_TYPES = ("solid", "part_solid", "ground_glass")
ATTACHMENTS = ("isolated", "juxtavascular", "juxtapleural")
# Slice spacings scanners actually use; a case picks one that lets the chest fit in slices_max.
COMMON_SLICE_SPACINGS = (0.6, 0.625, 0.7, 0.75, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5)


@dataclass
class PhantomConfig:
    """Everything sampled per case is drawn from these ranges with the case's own seed."""

    matrix: int = 512  # rows = columns
    slices_max: int = 320  # more would be needed -> thicker spacing, else a partial (cropped) chest
    pixel_spacing_mm: tuple[float, float] = (0.55, 0.95)
    slice_spacing_mm: tuple[float, float] = (0.6, 2.5)
    # nodule count: 0 with probability p_no_nodules, else uniform in [nodules_min, nodules_max]
    nodules_min: int = 1
    nodules_max: int = 6
    p_no_nodules: float = 0.15
    diameter_mm: tuple[float, float] = (3.0, 30.0)  # log-uniform: small nodules are the common ones
    type_weights: dict[str, float] = field(
        default_factory=lambda: {"solid": 0.5, "part_solid": 0.2, "ground_glass": 0.3}
    )
    attachment_weights: dict[str, float] = field(
        default_factory=lambda: {"isolated": 0.5, "juxtavascular": 0.25, "juxtapleural": 0.25}
    )
    noise_hu: tuple[float, float] = (8.0, 40.0)  # std of quantum noise after the PSF
    psf_sigma_mm: tuple[float, float] = (0.3, 0.8)  # in-plane Gaussian blur (0 disables)
    vessel_min_radius_mm: float = 0.6  # the tree stops branching below this
    max_vessel_segments: int = 10000  # per case; caps time on thin-slice cases

    def __post_init__(self) -> None:
        if self.matrix < 64:
            raise ValueError("matrix must be >= 64")
        if not 0 <= self.nodules_min <= self.nodules_max:
            raise ValueError("need 0 <= nodules_min <= nodules_max")
        if self.slices_max < 8:
            raise ValueError("slices_max must be >= 8")
        lo, hi = self.diameter_mm
        if not 0 < lo <= hi:
            raise ValueError("diameter_mm must be an increasing positive range")
        for name, weights, allowed in (
            ("type_weights", self.type_weights, NODULE_TYPES),
            ("attachment_weights", self.attachment_weights, ATTACHMENTS),
        ):
            unknown = set(weights) - set(allowed)
            if unknown or sum(weights.values()) <= 0:
                raise ValueError(f"{name}: keys must be among {allowed} with a positive sum")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhantomConfig:
        d = dict(d)
        for key in ("pixel_spacing_mm", "slice_spacing_mm", "diameter_mm", "noise_hu", "psf_sigma_mm"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)
