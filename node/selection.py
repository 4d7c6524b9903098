"""Which received series go to the model: the served model's own contract, plus series-level rules.

Per instance, ``preprocess_backend.contract.ModelContract`` decides (modality, acquired-CT SOP class,
greyscale, pixel spacing, slice thickness <= max, axial within the tilt limit): the same rules the
server enforces, so the node drops what the server would refuse instead of sending it. On top, per
series: localizers / scouts (ImageType), dose screens (Secondary Capture, dose SR, named as such),
the slice count and a minimum slice thickness. The reason goes to the log and the audit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import Dataset

from ctlesion_node.config import SelectionConfig
from preprocess_backend.contract import ModelContract
from preprocess_backend.dicom_io import read_header
from preprocess_backend.errors import DicomInputError

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC and its multi-frame variants
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"


@dataclass(frozen=True)
class Selection:
    selected: bool
    reason: str  # why it was dropped, or a one-line description of what is sent


def _dataset(item: Path | bytes | Dataset) -> Dataset:
    if isinstance(item, Dataset):
        return item
    return pydicom.dcmread(item if isinstance(item, Path) else BytesIO(item), stop_before_pixels=True)


def _part10(item: Path | bytes | Dataset) -> Path | bytes:
    if not isinstance(item, Dataset):
        return item
    buf = BytesIO()
    pydicom.dcmwrite(buf, item, enforce_file_format=False)
    return buf.getvalue()


def select_series(items: Sequence[Path | bytes | Dataset], config: SelectionConfig,
                  contract: ModelContract | None = None) -> Selection:
    """``items``: the series' files (paths, Part-10 bytes or headers)."""
    if not items:
        return Selection(False, "no instances")
    contract = contract or ModelContract(max_slice_thickness_mm=config.thickness_mm[1],
                                         max_tilt_deg=config.axial_tolerance_deg)
    headers = [_dataset(i) for i in items]
    sop_class = str(headers[0].get("SOPClassUID", ""))
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX) or sop_class == DOSE_SR:
        return Selection(False, f"dose screen / secondary capture (SOP class {sop_class})")
    modality = str(headers[0].get("Modality", ""))
    if modality not in config.modalities:
        return Selection(False, f"modality {modality or '?'} not in {list(config.modalities)}")
    image_types = {str(v).upper() for ds in headers for v in (ds.get("ImageType") or [])}
    if image_types & {"LOCALIZER", "SCOUT"}:
        return Selection(False, "localizer / scout (ImageType)")
    if len(headers) < config.min_slices:
        return Selection(False, f"{len(headers)} slices, fewer than {config.min_slices}")
    if len(headers) > config.max_slices:
        return Selection(False, f"{len(headers)} slices, more than {config.max_slices}")
    thickness = headers[0].get("SliceThickness")
    if thickness not in (None, "") and float(thickness) < config.thickness_mm[0]:
        return Selection(False, f"slice thickness {float(thickness):g} mm below {config.thickness_mm[0]:g}")
    try:
        for item in items:
            contract.check_header(read_header(_part10(item)))
    except DicomInputError as exc:
        return Selection(False, f"outside the model contract: {exc.reason}")
    return Selection(True, f"axial CT, {len(headers)} slices, {float(thickness or 0):g} mm")
