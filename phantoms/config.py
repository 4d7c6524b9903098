"""Knobs of the phantom generator. Defaults give realistic chest CT; tests shrink them for speed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

NODULE_TYPES = ("solid", "part_solid", "ground_glass")
ATTACHMENTS = ("isolated", "juxtavascular", "juxtapleural")
# profile "wide" (domain randomisation) draws two more kinds and one more attachment. Calcified and
# cavitary nodules are solid by density: truth keeps type "solid" and says so in NoduleTruth.subtype.
WIDE_NODULE_KINDS = (*NODULE_TYPES, "calcified", "cavitary")
WIDE_ATTACHMENTS = (*ATTACHMENTS, "perifissural")
PROFILES = ("default", "wide")
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
    # "default": the generator the committed model was trained and measured on (same seed, same
    # bytes). "wide": domain randomisation (phantoms/wide.py); fields still at their default value
    # take the wide profile's ranges (WIDE_DEFAULTS), fields set explicitly are kept.
    profile: str = "default"
    # wide only: matrix drawn per case from these weights (None: always ``matrix``)
    matrix_weights: dict[int, float] | None = None
    p_mass: float = 0.0  # wide only: probability that a lesion is a mass of 30 < d <= mass_max_mm
    mass_max_mm: float = 60.0
    voxel_budget: int = 0  # wide only: slices_max shrinks to budget / matrix^2 (0: no budget)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}")
        if self.profile == "wide":
            self._apply_wide_defaults()
        if self.matrix < 64:
            raise ValueError("matrix must be >= 64")
        if not 0 <= self.nodules_min <= self.nodules_max:
            raise ValueError("need 0 <= nodules_min <= nodules_max")
        if self.slices_max < 8:
            raise ValueError("slices_max must be >= 8")
        lo, hi = self.diameter_mm
        if not 0 < lo <= hi:
            raise ValueError("diameter_mm must be an increasing positive range")
        wide = self.profile == "wide"
        for name, weights, allowed in (
            ("type_weights", self.type_weights, WIDE_NODULE_KINDS if wide else NODULE_TYPES),
            ("attachment_weights", self.attachment_weights, WIDE_ATTACHMENTS if wide else ATTACHMENTS),
        ):
            unknown = set(weights) - set(allowed)
            if unknown or sum(weights.values()) <= 0:
                raise ValueError(f"{name}: keys must be among {allowed} with a positive sum")

        if self.matrix_weights is not None and (
            not self.matrix_weights or min(self.matrix_weights) < 64 or sum(self.matrix_weights.values()) <= 0
        ):
            raise ValueError("matrix_weights: matrices >= 64 with a positive sum")

    def _apply_wide_defaults(self) -> None:
        base = _DEFAULTS
        for key, value in WIDE_DEFAULTS.items():
            if getattr(self, key) == base[key]:
                setattr(self, key, value() if callable(value) else value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhantomConfig:
        d = dict(d)
        for key in ("pixel_spacing_mm", "slice_spacing_mm", "diameter_mm", "noise_hu", "psf_sigma_mm"):
            if key in d:
                d[key] = tuple(d[key])
        if d.get("matrix_weights") is not None:  # JSON keys are strings
            d["matrix_weights"] = {int(k): float(v) for k, v in d["matrix_weights"].items()}
        return cls(**d)


# What "wide" changes (see docs/phantoms.md). Real scanners: 0.625-5 mm slices, 0.5-1.0 mm pixels,
# mostly 512 matrices; noise from sharp-kernel low-dose (~90 HU in the lung) to soft standard dose.
WIDE_DEFAULTS: dict[str, Any] = {
    "matrix_weights": lambda: {256: 0.06, 384: 0.08, 512: 0.70, 768: 0.08, 1024: 0.08},
    "pixel_spacing_mm": (0.5, 1.0),
    "slice_spacing_mm": (0.625, 5.0),
    "nodules_max": 7,
    "type_weights": lambda: {"solid": 0.38, "part_solid": 0.15, "ground_glass": 0.22, "calcified": 0.15, "cavitary": 0.10},
    "attachment_weights": lambda: {"isolated": 0.40, "juxtavascular": 0.22, "juxtapleural": 0.24, "perifissural": 0.14},
    "noise_hu": (5.0, 90.0),
    "psf_sigma_mm": (0.25, 1.0),
    "p_mass": 0.06,
    "voxel_budget": 512 * 512 * 320,
}
_DEFAULTS: dict[str, Any] = {}


_DEFAULTS.update(asdict(PhantomConfig()))
