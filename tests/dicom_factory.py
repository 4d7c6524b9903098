"""Build real DICOM Part-10 bytes for tests: single slices, CT series with a given geometry, a chest-like
phantom with nodules. Reusable by any test: ``from dicom_factory import ...`` (pytest puts tests/ on
sys.path, since tests/ has no __init__.py).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_slice(
    hu: np.ndarray,
    *,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = AXIAL,
    spacing: Sequence[float] | None = (0.7, 0.7),
    series_uid: str | None = None,
    study_uid: str | None = None,
    sop_uid: str | None = None,
    frame_of_reference_uid: str = "1.2.826.0.1.3680043.8.498.1",
    instance_number: int = 1,
    slope: float = 1.0,
    intercept: float = -1024.0,
    signed: bool = False,
    modality: str = "CT",
    sop_class: str = CTImageStorage,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | tuple[list[float], list[float]] | None = (-600.0, 1500.0),
    voi_function: str | None = None,
    slice_thickness: float = 1.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    extra: dict[str, object] | None = None,
) -> bytes:
    """One Part-10 image whose modality values (after slope / intercept) equal ``hu`` (rounded)."""
    stored = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    stored = np.clip(stored, info.min, info.max).astype(dtype)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = series_uid or "1.2.826.0.1.3680043.8.498.3"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.Modality = modality
    ds.PatientID = "TEST"
    ds.InstanceNumber = instance_number
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if modality == "CT" or slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    if spacing is not None:
        ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = slice_thickness
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function:
        ds.VOILUTFunction = voi_function
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.PixelData = stored.tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class Nodule:
    centre_vox: tuple[float, float, float]  # (z index, row, column)
    radius_px: float
    hu: float = 40.0


@dataclass
class ChestPhantom:
    volume: np.ndarray  # float32 HU [Z, H, W]
    spacing: tuple[float, float]
    slice_spacing: float
    z0: float
    nodules: list[Nodule] = field(default_factory=list)


def chest_phantom(z: int = 8, size: int = 128, nodules: Sequence[Nodule] = (), seed: int = 0, noise: float = 10.0) -> ChestPhantom:
    """Body ellipse (soft tissue) with two lungs (-850 HU) and spherical nodules; air outside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c = size / 2
    vol = np.full((z, size, size), -1000.0, dtype=np.float32)
    body = ((yy - c) / (0.38 * size)) ** 2 + ((xx - c) / (0.45 * size)) ** 2 <= 1
    vol[:, body] = 40.0
    for side in (-1, 1):
        lung = ((yy - c) / (0.25 * size)) ** 2 + ((xx - c - side * 0.2 * size) / (0.14 * size)) ** 2 <= 1
        vol[:, lung] = -850.0
    zz = np.arange(z, dtype=np.float32)[:, None, None]
    for n in nodules:
        d2 = (zz - n.centre_vox[0]) ** 2 + (yy - n.centre_vox[1]) ** 2 + (xx - n.centre_vox[2]) ** 2
        vol[d2 <= n.radius_px**2] = n.hu
    vol += rng.normal(0, noise, vol.shape).astype(np.float32)
    return ChestPhantom(vol, (0.7, 0.7), 1.25, -100.0, list(nodules))


def series_bytes(
    volume: np.ndarray,
    *,
    spacing: tuple[float, float] = (0.7, 0.7),
    slice_spacing: float = 1.25,
    z0: float = -100.0,
    origin_xy: tuple[float, float] | None = None,
    series_uid: str | None = None,
    orientation: Sequence[float] = AXIAL,
    shuffle_seed: int | None = None,
    **kwargs: object,
) -> list[bytes]:
    """One Part-10 item per slice; slice i at z0 + i * slice_spacing along the normal (optionally shuffled)."""
    series_uid = series_uid or generate_uid()
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    h, w = volume.shape[1:]
    if origin_xy is None:  # centre the field of view on the patient axis, as scanners do
        origin_xy = (-w / 2 * spacing[1], -h / 2 * spacing[0])
    origin = np.array([origin_xy[0], origin_xy[1], 0.0])
    items = [
        make_slice(
            volume[i],
            position=tuple(origin + normal * (z0 + i * slice_spacing)),
            orientation=orientation,
            spacing=spacing,
            series_uid=series_uid,
            instance_number=int(volume.shape[0] - i),  # deliberately reversed: order must not come from it
            **kwargs,  # type: ignore[arg-type]
        )
        for i in range(volume.shape[0])
    ]
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(items))
        items = [items[i] for i in order]
    return items


def phantom_series(phantom: ChestPhantom, **kwargs: object) -> list[bytes]:
    return series_bytes(phantom.volume, spacing=phantom.spacing, slice_spacing=phantom.slice_spacing, z0=phantom.z0, **kwargs)  # type: ignore[arg-type]


@dataclass
class AirwayPhantom:
    volume: np.ndarray  # float32 HU [Z, H, W]
    structures: dict[str, tuple[tuple[float, float, float], float]]  # name -> (centre LPS mm, outer diameter mm)
    spacing: tuple[float, float] = (0.7, 0.7)
    slice_spacing: float = 1.5
    z0: float = -100.0


def airway_phantom(z: int = 80, size: int = 128) -> AirwayPhantom:
    """Lung-density field (-850 HU) in soft tissue with a trachea-like tube (20 mm lumen, 3 mm wall)
    along the whole series, a 24 mm cavitary nodule (2.5 mm wall), a 10 mm solid nodule and a
    16 mm cavitary nodule cut by the first slice. 0.7 mm pixels, 1.5 mm slices, slice i at
    z0 + 1.5 i (the geometry ``series_bytes`` writes)."""
    px, dz, z0 = 0.7, 1.5, -100.0
    zz, yy, xx = np.meshgrid(np.arange(z) * dz + z0, (np.arange(size) - size / 2) * px, (np.arange(size) - size / 2) * px, indexing="ij")
    vol = np.full(zz.shape, -850.0, np.float32)
    vol[np.hypot(yy, xx) > 42] = 40.0
    tube = np.hypot(yy, xx + 20.0)
    vol[tube <= 13.0] = 40.0
    vol[tube <= 10.0] = -1000.0
    r = np.sqrt((zz + 40.0) ** 2 + (yy - 20.0) ** 2 + (xx - 20.0) ** 2)
    vol[r <= 12.0] = 40.0
    vol[r <= 9.5] = -1000.0
    r = np.sqrt((zz + 60.0) ** 2 + (yy + 20.0) ** 2 + (xx - 20.0) ** 2)
    vol[r <= 5.0] = 40.0
    r = np.sqrt((zz - z0) ** 2 + (yy - 20.0) ** 2 + (xx + 20.0) ** 2)
    vol[(r <= 8.0) & (tube > 13.0)] = 40.0
    vol[(r <= 6.0) & (tube > 13.0)] = -1000.0
    structures = {"tube": ((-20.0, 0.0, -40.0), 26.0), "cavity": ((20.0, 20.0, -40.0), 24.0),
                  "solid": ((20.0, -20.0, -60.0), 10.0), "cut cavity": ((-20.0, 20.0, z0), 16.0)}  # fmt: skip
    return AirwayPhantom(vol, structures, (px, px), dz, z0)
