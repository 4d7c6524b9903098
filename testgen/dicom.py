"""The test generator's DICOM writer (pydicom), with its own conventions varied per case.

Pixel encodings seen from real scanners: unsigned 12-bit with intercept -1024; signed HU with
intercept 0; signed with intercept -1024 and PixelPaddingValue -2000 outside the reconstruction
circle (GE). Instance numbers run head-first or feet-first, transfer syntax explicit or implicit
little endian. File names are UIDs (no order in them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

IMPLEMENTATION_UID = "2.25.300963474298373487302842131617232810817"
STYLES = ("uint12", "int16_hu", "int16_pad")


def uid(seed: int, role: str) -> str:
    h = hashlib.sha256(f"ctlesion-testgen|{seed}|{role}".encode()).digest()
    return "2.25." + str(int.from_bytes(h[:15], "big"))


@dataclass
class SeriesLayout:
    style: str
    head_first: bool
    implicit_vr: bool

    @classmethod
    def sample(cls, rng: np.random.Generator) -> SeriesLayout:
        return cls(str(rng.choice(STYLES, p=[0.4, 0.3, 0.3])), bool(rng.random() < 0.6), bool(rng.random() < 0.25))

    @property
    def intercept(self) -> float:
        return 0.0 if self.style == "int16_hu" else -1024.0

    @property
    def padding_stored(self) -> int | None:
        return -2000 if self.style == "int16_pad" else None


def stored_values(hu: np.ndarray, layout: SeriesLayout, outside: np.ndarray | None) -> np.ndarray:
    s = np.rint(hu - layout.intercept)
    if layout.style == "uint12":
        return np.clip(s, 0, 4095).astype(np.uint16)
    out = np.clip(s, -32768, 32767).astype(np.int16)
    if layout.padding_stored is not None and outside is not None:
        out[outside] = layout.padding_stored
    return out


def outside_circle(n: int) -> np.ndarray:
    ii, jj = np.ogrid[0:n, 0:n]
    c = (n - 1) / 2
    return (ii - c) ** 2 + (jj - c) ** 2 > (n / 2) ** 2


def write_series(vol: np.ndarray, truth: dict[str, Any], series_dir: Path, layout: SeriesLayout) -> list[Path]:
    """vol [Z, H, W] HU, ascending z as truth['geometry'] describes it."""
    g = truth["geometry"]
    seed = int(truth["seed"])
    series_dir = Path(series_dir)
    series_dir.mkdir(parents=True, exist_ok=True)
    outside = outside_circle(g["rows"]) if layout.padding_stored is not None else None
    study, series, frame = uid(seed, "study"), uid(seed, "series"), uid(seed, "frame")
    truth["study_instance_uid"], truth["series_instance_uid"], truth["frame_of_reference_uid"] = study, series, frame
    n = vol.shape[0]
    paths = []
    for k in range(n):
        ds = Dataset()
        sop = uid(seed, f"sop{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if layout.implicit_vr else ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Manufacturer = "ctlesion testgen"
        ds.ManufacturerModelName = "independent test generator"
        ds.PatientName = f"TESTGEN^SYNTHETIC^{seed % 100000:05d}"
        ds.PatientID = f"TESTGEN-{truth['case_id']}"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "synthetic test data: no patient"
        ds.StudyDate = ds.SeriesDate = "20010101"
        ds.StudyTime = ds.SeriesTime = "090000"
        ds.AccessionNumber = f"TG{seed % 10**10:010d}"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PositionReferenceIndicator = ""
        ds.BodyPartExamined = "CHEST"
        ds.PatientPosition = "FFS" if layout.head_first else "HFS"
        ds.StudyDescription = "TESTGEN CHEST"
        ds.SeriesDescription = f"TESTGEN {truth['case_id']} {truth['scanner']['kernel'].upper()}"
        ds.ConvolutionKernel = truth["scanner"]["kernel"].upper()
        ds.KVP = 120
        ds.SliceThickness = g["slice_thickness"]
        ds.SpacingBetweenSlices = g["slice_spacing"]
        ds.ImageOrientationPatient = [float(v) for v in g["orientation"]]
        z = g["origin"][2] + k * g["slice_spacing"]
        ds.ImagePositionPatient = [round(g["origin"][0], 4), round(g["origin"][1], 4), round(z, 4)]
        ds.SliceLocation = round(z, 4)
        ds.InstanceNumber = (n - k) if layout.head_first else (k + 1)
        ds.Rows, ds.Columns = g["rows"], g["columns"]
        ds.PixelSpacing = [float(v) for v in g["pixel_spacing"]]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12 if layout.style == "uint12" else 16
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0 if layout.style == "uint12" else 1
        if layout.padding_stored is not None:
            ds.PixelPaddingValue = layout.padding_stored
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = layout.intercept, 1.0, "HU"
        ds.WindowCenter, ds.WindowWidth = -500, 1400
        ds.PixelData = stored_values(vol[k], layout, outside).tobytes()
        path = series_dir / f"{sop}.dcm"
        ds.save_as(path, enforce_file_format=True, implicit_vr=layout.implicit_vr, little_endian=True)
        paths.append(path)
    return paths
