"""Write a CT volume (MetaImage and the like) as a real DICOM series, once, into a cache folder.

The detector then reads it through the server's own DICOM path (decode, HU, window, 2.5D stack),
so a model trained or scored on LUNA16 sees exactly what it will see from a scanner. Geometry is
carried over exactly: ImageOrientationPatient = the first two columns of the image direction,
ImagePositionPatient of slice k = origin + k * spacing_z * third column (LPS mm, as ITK and DICOM
both use). Pixels are stored as int16 HU (slope 1, intercept 0), so nothing is clipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

CACHE_VERSION = 1  # bump when the written series changes


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=[str(CACHE_VERSION), *parts])


def write_volume_series(
    hu: np.ndarray,
    origin: tuple[float, float, float],
    spacing: tuple[float, float, float],
    direction: np.ndarray,
    out_dir: Path,
    case_id: str,
) -> list[Path]:
    """hu int/float [Z, Y, X] (SimpleITK's array order); spacing and origin in (x, y, z) mm."""
    direction = np.asarray(direction, np.float64).reshape(3, 3)
    out_dir.mkdir(parents=True, exist_ok=True)
    stored = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    ds0 = Dataset()
    ds0.SOPClassUID = CTImageStorage
    ds0.Modality = "CT"
    ds0.StudyInstanceUID = _uid(case_id, "study")
    ds0.SeriesInstanceUID = _uid(case_id, "series")
    ds0.FrameOfReferenceUID = _uid(case_id, "frame")
    ds0.PatientID = case_id[-64:]
    ds0.SeriesDescription = f"from volume {case_id}"[:64]
    ds0.ImageOrientationPatient = [round(float(v), 8) for v in (*direction[:, 0], *direction[:, 1])]
    ds0.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (row spacing = y, column spacing = x)
    ds0.SliceThickness = float(spacing[2])
    ds0.Rows, ds0.Columns = int(hu.shape[1]), int(hu.shape[2])
    ds0.SamplesPerPixel = 1
    ds0.PhotometricInterpretation = "MONOCHROME2"
    ds0.BitsAllocated = ds0.BitsStored = 16
    ds0.HighBit = 15
    ds0.PixelRepresentation = 1
    ds0.RescaleIntercept = 0.0
    ds0.RescaleSlope = 1.0
    paths = []
    for k in range(hu.shape[0]):
        ds = Dataset()
        ds.update(ds0)
        ds.SOPInstanceUID = _uid(case_id, "slice", str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, np.float64) + k * float(spacing[2]) * direction[:, 2]]
        ds.PixelData = stored[k].tobytes()
        path = out_dir / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _stamp(source: Path) -> dict[str, object]:
    st = source.stat()
    return {"version": CACHE_VERSION, "source": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached_series(source: Path, cache_root: Path, case_id: str) -> Path:
    """The DICOM series of the MetaImage ``source`` under ``cache_root``, written when missing or stale."""
    import SimpleITK as sitk

    name = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
    target = Path(cache_root) / f"{case_id[-40:]}-{name}"
    stamp_file = target / "source.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == _stamp(source):
        return target
    image = sitk.ReadImage(str(source))
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_volume_series(
        sitk.GetArrayFromImage(image), image.GetOrigin(), image.GetSpacing(), np.asarray(image.GetDirection()), tmp, case_id
    )
    (tmp / "source.json").write_text(json.dumps(_stamp(source)))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # whole or not at all: an interrupted write leaves no half series
    return target
