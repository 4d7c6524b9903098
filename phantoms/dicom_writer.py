"""Write an HU volume as a real DICOM CT series: one Part-10 file per slice, shuffled file names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from ctlesion_phantoms.truth import CaseTruth
from ctlesion_phantoms.uids import CaseIdentity

RESCALE_INTERCEPT = -1024.0
LUNG_WINDOW = (-600.0, 1500.0)
MEDIASTINUM_WINDOW = (40.0, 400.0)


def to_stored(hu: np.ndarray, signed: bool) -> np.ndarray:
    """HU -> stored values with slope 1, intercept -1024 (uint16, or int16 as some vendors write)."""
    stored = np.rint(hu - RESCALE_INTERCEPT)
    np.clip(stored, 0, 4095, out=stored)
    return stored.astype(np.int16 if signed else np.uint16)


def _template(truth: CaseTruth, identity: CaseIdentity, signed: bool, study_date: str) -> Dataset:
    g = truth.geometry
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = identity.accession
    ds.Modality = "CT"
    ds.Manufacturer = "ctlesion phantom"
    ds.ManufacturerModelName = "synthetic"
    ds.InstitutionName = "SYNTHETIC"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC CHEST CT PHANTOM"
    ds.SeriesDescription = f"PHANTOM {truth.case_id} LUNG"
    # patient module: obviously fake values (and never to be logged by the system anyway)
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom: no patient data"  # Type 1C when identity removed
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = g.slice_thickness
    ds.SpacingBetweenSlices = g.slice_spacing
    ds.KVP = 120
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = identity.study_uid
    ds.SeriesInstanceUID = identity.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [float(v) for v in g.orientation]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = g.rows, g.columns
    ds.PixelSpacing = [float(v) for v in g.pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.WindowCenter = [LUNG_WINDOW[0], MEDIASTINUM_WINDOW[0]]
    ds.WindowWidth = [LUNG_WINDOW[1], MEDIASTINUM_WINDOW[1]]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    ds.ConvolutionKernel = "SYNTH"
    if truth.profile == "wide":  # the protocol of a wide case, as a scanner records it
        sc = truth.scanner
        ds.ManufacturerModelName = "synthetic wide"
        ds.SeriesDescription = f"PHANTOM {truth.case_id} {sc.get('kernel', '')}"
        ds.ConvolutionKernel = str(sc.get("kernel", "SYNTH"))
        ds.KVP = int(sc.get("kvp", 120))
        ds.ReconstructionDiameter = float(sc.get("fov_mm", g.columns * g.pixel_spacing[1]))
        if sc.get("contrast"):
            ds.ContrastBolusAgent = "IODINE"
    return ds


def write_series(
    hu: np.ndarray, truth: CaseTruth, series_dir: Path, signed: bool = False,
    outside: np.ndarray | None = None, padding_hu: float | None = None,
) -> list[Path]:
    """Write hu [Z, H, W] (ascending z) as CT Image Storage files named in a seed-shuffled order.

    InstanceNumber follows position, but file names are random on purpose: a reader must order
    the series by ImagePositionPatient, as with real exports. ``outside`` [H, W] with ``padding_hu``
    (-3024 or -2048, as GE writes): those pixels get PixelPaddingValue (stored, signed int16).
    """
    padded = outside is not None and padding_hu is not None
    if padded:
        signed = True  # the padding value is negative in stored units
    series_dir = Path(series_dir)
    series_dir.mkdir(parents=True, exist_ok=True)
    identity = CaseIdentity.for_seed(truth.seed, truth.case_id)
    rng = np.random.default_rng([truth.seed, 7919])
    study_date = f"2000{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    template = _template(truth, identity, signed, study_date)
    pad_stored = int(round(padding_hu - RESCALE_INTERCEPT)) if padded else 0
    if padded:
        template.PixelPaddingValue = pad_stored  # US/SS follows PixelRepresentation (signed here)
    positions = truth.geometry.slice_positions()
    names = rng.permutation(len(hu))
    paths: list[Path] = []
    for k in range(hu.shape[0]):
        ds = Dataset()
        ds.update(template)
        sop_uid = identity.sop_uid(truth.seed, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in positions[k]]
        ds.SliceLocation = round(float(positions[k][2]), 4)
        stored = to_stored(hu[k], signed)
        if padded:
            stored[outside] = pad_stored
        ds.PixelData = stored.tobytes()
        path = series_dir / f"IM{int(names[k]):05d}_{rng.integers(16**6):06x}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
