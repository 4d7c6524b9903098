"""The served model's input contract: what it was trained to read, checked per item before decoding.

The detector was trained on axial lung-window CT (phantoms with 0.55-0.95 mm pixels, 2.5D k = 3).
Anything else (MR, ultrasound, radiographs, colour secondary captures, RT dose grids, sagittal
reformats, 4 mm pixels) gives it input it has never seen, and its boxes would be nonsense presented
as findings. The server therefore refuses such items with INVALID_ARGUMENT naming the item and the
rule broken. The contract travels as ``contract_*`` parameters of the ``preprocess`` model's
config.pbtxt (``to_params`` / ``from_params``) so a deployment shows what it enforces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from preprocess_backend.errors import DicomInputError
from preprocess_backend.windowing import WINDOW_PRESETS

if TYPE_CHECKING:
    from preprocess_backend.dicom_io import DicomHeader

# Acquired CT images (classic, enhanced, legacy-converted enhanced). Secondary captures, even with
# Modality CT, are screenshots / dose sheets, not reconstructions in HU.
CT_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
)


# Colour images (the model reads one grey channel in HU); unknown photometrics are refused by dicom_io.
COLOUR_PHOTOMETRICS = ("PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")


@dataclass(frozen=True)
class ModelContract:
    """What the served detector reads. Every field is a ``contract_<name>`` model parameter."""

    modality: str = "CT"
    window: str = "lung"  # the window the detector was trained on (a WINDOW_PRESETS name)
    min_pixel_spacing_mm: float = 0.4
    max_pixel_spacing_mm: float = 1.2
    max_slice_thickness_mm: float = 5.0
    max_tilt_deg: float = 30.0  # angle of the slice normal to the patient's z axis (axial + gantry tilt)

    @property
    def window_values(self) -> tuple[float, float]:
        return WINDOW_PRESETS[self.window]

    def to_params(self) -> dict[str, str]:
        return {f"contract_{k}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> ModelContract:
        values: dict[str, object] = {}
        for f in fields(cls):
            key = f"contract_{f.name}"
            if key in params:
                values[f.name] = str(params[key]) if f.type in ("str", str) else float(params[key])
        contract = cls(**values)  # type: ignore[arg-type]
        if contract.window not in WINDOW_PRESETS:
            raise ValueError(f"contract_window {contract.window!r} is not a preset ({', '.join(WINDOW_PRESETS)})")
        return contract

    def describe(self) -> str:
        c, w = self.window_values
        return (
            f"{self.modality} only, {self.window} window (centre {c:g}, width {w:g}), pixel spacing "
            f"{self.min_pixel_spacing_mm:g}-{self.max_pixel_spacing_mm:g} mm, slice thickness <= "
            f"{self.max_slice_thickness_mm:g} mm, axial within {self.max_tilt_deg:g} deg"
        )

    # ------------------------------------------------------------------------- checks

    def check_window(self, value: str) -> None:
        """A per-request ``window`` must be the trained one (by name or as 'centre,width')."""
        key = (value or "").strip().lower()
        if key == self.window:
            return
        c, w = self.window_values
        if "," in key:
            try:
                vc, vw = (float(v) for v in key.split(",", 1))
            except ValueError:
                vc = vw = math.nan
            if vc == c and vw == w:
                return
        raise DicomInputError(
            "window", f"window {value!r} refused: the model was trained on the {self.window} window "
            f"(centre {c:g}, width {w:g}) only; omit the input or send {self.window!r}"
        )

    def check_kind(self, label: str, modality: str, sop_class_uid: str) -> None:
        """Modality and SOP class, checked first (before any geometry is looked at)."""
        if modality != self.modality:
            raise DicomInputError(label, f"modality {modality or '<none>'!r} refused: the model reads {self.modality} only")
        if sop_class_uid and sop_class_uid not in CT_SOP_CLASSES:
            from pydicom.uid import UID

            raise DicomInputError(
                label, f"SOP class '{UID(sop_class_uid).name}' refused: the model reads acquired CT images only"
            )

    def check_header(self, h: DicomHeader) -> None:
        """Refuse an item the model cannot read; the reason names the rule and the value."""
        label = h.source
        self.check_kind(label, h.modality, h.sop_class_uid)
        if h.samples_per_pixel == 3 or h.photometric in COLOUR_PHOTOMETRICS:
            raise DicomInputError(
                label, f"colour image ({h.photometric or '?'}, {h.samples_per_pixel} samples) refused: "
                "the model reads greyscale CT only"
            )
        if h.pixel_spacing is None:
            raise DicomInputError(label, "no PixelSpacing: the model needs the pixel size (mm)")
        lo, hi = self.min_pixel_spacing_mm, self.max_pixel_spacing_mm
        if not all(lo <= s <= hi for s in h.pixel_spacing):
            spacing = ", ".join(f"{s:g}" for s in h.pixel_spacing)
            raise DicomInputError(
                label, f"pixel spacing {spacing} mm outside the model's {lo:g}-{hi:g} mm (it was not trained on it)"
            )
        if h.slice_thickness is not None and h.slice_thickness > self.max_slice_thickness_mm:
            raise DicomInputError(
                label, f"slice thickness {h.slice_thickness:g} mm above the model's {self.max_slice_thickness_mm:g} mm"
            )
        if h.orientation is not None:
            normal = np.cross(np.asarray(h.orientation[:3]), np.asarray(h.orientation[3:]))
            tilt = math.degrees(math.acos(min(1.0, abs(float(normal[2])) / max(float(np.linalg.norm(normal)), 1e-12))))
            if tilt > self.max_tilt_deg:
                raise DicomInputError(
                    label, f"not an axial slice (normal {tilt:.0f} deg from the patient axis, limit "
                    f"{self.max_tilt_deg:g}): the model reads axial CT only"
                )
