"""The objects sent back for one series: the TID 1500 SR and one key-image Secondary Capture per finding.

UIDs are derived, not random, so that building or sending twice yields the same objects:
- the SR series UID and the key-image series UID follow from (source series UID, algorithm);
- the SR SOP Instance UID also from the sorted source SOP Instance UIDs: a re-send of the same
  images (or a crash and a retry) produces the *same* SR, which the PACS stores once; a re-send
  with different images produces a new SR in the same SR series that names the earlier one in
  PredecessorDocumentsSequence (it supersedes it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from ctlesion_client.pacs import order_by_position
from ctlesion_client.pacs_types import PacsError
from ctlesion_client.report import findings_of, render_overlay
from ctlesion_client.result import SeriesResult
from ctlesion_client.sr_report import (
    DEFAULT_ALGORITHM,
    AlgorithmInfo,
    build_sr,
    finding_from_lesion,
    validate_sr,
)

KEY_IMAGE_SERIES_NUMBER = 9902
KEY_IMAGE_DESCRIPTION = "ctlesion AI key images"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def derived_uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


@dataclass(frozen=True)
class ReportUids:
    sr_series: str
    sr_sop: str
    sc_series: str

    def sc_sop(self, index: int) -> str:
        return derived_uid(self.sr_sop, "key-image", str(index))


def report_uids(series_uid: str, source_sop_uids: Sequence[str], algorithm: AlgorithmInfo) -> ReportUids:
    return ReportUids(
        sr_series=derived_uid(series_uid, algorithm.name, "sr-series"),
        sr_sop=derived_uid(series_uid, algorithm.name, algorithm.version, *sorted(source_sop_uids)),
        sc_series=derived_uid(series_uid, algorithm.name, "key-image-series"),
    )


def _add_predecessor(sr: Dataset, study_uid: str, series_uid: str, sop_uid: str) -> None:
    ref_sop = Dataset()
    ref_sop.ReferencedSOPClassUID, ref_sop.ReferencedSOPInstanceUID = COMPREHENSIVE_3D_SR, sop_uid
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series_uid
    ref_series.ReferencedSOPSequence = DicomSequence([ref_sop])
    ref_study = Dataset()
    ref_study.StudyInstanceUID = study_uid
    ref_study.ReferencedSeriesSequence = DicomSequence([ref_series])
    sr.PredecessorDocumentsSequence = DicomSequence([ref_study])


def _key_image(path: Path, result: SeriesResult, finding: object, uids: ReportUids, index: int,
               algorithm: AlgorithmInfo) -> hd.sc.SCImage:
    """The key slice in the lung window with the box and caption burnt in (8-bit RGB)."""
    with tempfile.TemporaryDirectory() as tmp:
        png = render_overlay(path, result, finding, Path(tmp) / "key.png")  # type: ignore[arg-type]
        pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.uint8)
    ref = pydicom.dcmread(path, stop_before_pixels=True)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.sc_series,
        series_number=KEY_IMAGE_SERIES_NUMBER,
        sop_instance_uid=uids.sc_sop(index),
        instance_number=index,
        manufacturer=algorithm.manufacturer,
        patient_orientation=("L", "P"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = KEY_IMAGE_DESCRIPTION
    sc.BurnedInAnnotation = "YES"  # the box and the caption are part of the pixels
    sc.ImageComments = f"Lesion {index}: key slice {ref.SOPInstanceUID}"
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = ref.SOPClassUID, ref.SOPInstanceUID
    sc.SourceImageSequence = DicomSequence([source])
    return sc


def build_outputs(result: SeriesResult, files: Sequence[Path], *, key_images: bool = True,
                  predecessor_sr: str | None = None,
                  algorithm: AlgorithmInfo = DEFAULT_ALGORITHM) -> list[Dataset]:
    """[SR, key image 1, key image 2, ...] for one series' result and its Part-10 files."""
    raw = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in files]
    by_uid = {str(h.SOPInstanceUID): p for p, h in raw}
    headers = order_by_position([h for _, h in raw])
    ordered = [str(h.SOPInstanceUID) for h in headers]
    uids = report_uids(result.series_instance_uid, ordered, algorithm)
    findings = [finding_from_lesion(les, i + 1, ordered) for i, les in enumerate(result.lesions)]
    sr = build_sr(findings, headers, algorithm, series_instance_uid=uids.sr_series, sop_instance_uid=uids.sr_sop)
    if predecessor_sr and predecessor_sr != uids.sr_sop:
        _add_predecessor(sr, str(headers[0].StudyInstanceUID), uids.sr_series, predecessor_sr)
    check = validate_sr(sr)
    if not check.ok:
        raise PacsError(f"SR failed {check.tool} validation: {check.messages[:5]}")
    out: list[Dataset] = [sr]
    if key_images:
        for i, f in enumerate(findings_of(result), start=1):
            path = by_uid.get(f.key_sop_instance_uid)
            if path is not None and f.key_box_px is not None:
                out.append(_key_image(path, result, f, uids, i, algorithm))
    return out
