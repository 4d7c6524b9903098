"""Which received series the model can read: axial CT, enough slices, a sane slice thickness.

Localizers / scouts, dose screens (Secondary Capture, dose SR) and reformats in other planes are
dropped with the reason, which goes to the log and the audit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

from ctlesion_node.config import SelectionConfig

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC and its multi-frame variants
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")  # CT, Enhanced CT


@dataclass(frozen=True)
class Selection:
    selected: bool
    reason: str  # why it was dropped, or a one-line description of what is sent


def _axial_angle_deg(iop: Sequence[float]) -> float:
    """Angle between the slice normal and the patient's head-foot axis."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:6], float)
    normal = np.cross(row, col)
    n = float(np.linalg.norm(normal))
    if n == 0:
        return 90.0
    return math.degrees(math.acos(min(1.0, abs(normal[2]) / n)))


def select_series(headers: Sequence[Dataset], config: SelectionConfig) -> Selection:
    if not headers:
        return Selection(False, "no instances")
    first = headers[0]
    modality = str(first.get("Modality", ""))
    sop_class = str(first.get("SOPClassUID", ""))
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX) or sop_class == DOSE_SR:
        return Selection(False, f"dose screen / secondary capture (SOP class {sop_class})")
    if modality not in config.modalities:
        return Selection(False, f"modality {modality or '?'} not in {list(config.modalities)}")
    if sop_class not in CT_STORAGE:
        return Selection(False, f"SOP class {sop_class} is not a CT image")
    image_types = {str(v).upper() for ds in headers for v in (ds.get("ImageType") or [])}
    if "LOCALIZER" in image_types or "SCOUT" in image_types:
        return Selection(False, "localizer / scout (ImageType)")
    if len(headers) < config.min_slices:
        return Selection(False, f"{len(headers)} slices, fewer than {config.min_slices}")
    if len(headers) > config.max_slices:
        return Selection(False, f"{len(headers)} slices, more than {config.max_slices}")
    iop = first.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return Selection(False, "no ImageOrientationPatient")
    angle = _axial_angle_deg([float(v) for v in iop])
    if angle > config.axial_tolerance_deg:
        return Selection(False, f"not axial: normal {angle:.1f} deg from head-foot (tolerance {config.axial_tolerance_deg})")
    thickness = first.get("SliceThickness")
    if thickness in (None, ""):
        return Selection(False, "no SliceThickness")
    lo, hi = config.thickness_mm
    if not lo <= float(thickness) <= hi:
        return Selection(False, f"slice thickness {float(thickness):g} mm outside [{lo:g}, {hi:g}]")
    return Selection(True, f"axial CT, {len(headers)} slices, {float(thickness):g} mm")
