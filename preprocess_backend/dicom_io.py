"""DICOM Part-10 bytes or files -> float32 modality values (HU for CT) plus geometry and UIDs.

Every failure is a ``DicomInputError`` naming the file or SOPInstanceUID. Sizes are checked on the
header (``Limits``) before pixel data is decoded: a 2 KB header may claim gigabytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from preprocess_backend.errors import DicomInputError, LimitExceeded
from preprocess_backend.types import Limits

DEFAULT_LIMITS = Limits()

# Little-endian native syntaxes whose PixelData we map with np.frombuffer (the hot path for CT).
_NATIVE_LE = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated: pydicom inflates the whole dataset on read
}
_BIG_ENDIAN = "1.2.840.10008.1.2.2"


@dataclass
class DicomHeader:
    """What the client needs without pixels: geometry and UIDs (``read_header``)."""

    source: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    modality: str
    transfer_syntax_uid: str
    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int
    photometric: str
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    position: tuple[float, float, float] | None  # ImagePositionPatient (LPS mm)
    orientation: tuple[float, float, float, float, float, float] | None  # ImageOrientationPatient
    slice_thickness: float | None
    instance_number: int | None

    @property
    def normal(self) -> np.ndarray | None:
        return None if self.orientation is None else slice_normal(self.orientation)


@dataclass
class DecodedSlice:
    """One decoded frame: modality values (HU for CT) as float32 [H, W] and everything around it."""

    hu: np.ndarray  # float32 [rows, columns], modality LUT applied (grayscale luminance for colour)
    source: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    photometric: str  # MONOCHROME1 is kept as stored; windowing inverts it
    pixel_spacing: tuple[float, float] | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    slice_thickness: float | None = None
    instance_number: int | None = None
    frame_index: int = 0
    window_centers: tuple[float, ...] = ()
    window_widths: tuple[float, ...] = ()
    voi_lut_function: str = "LINEAR"
    voi_lut: tuple[tuple[int, int, int], np.ndarray] | None = None  # (descriptor, data) of the first VOI LUT
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    signed: bool = False
    bits_stored: int = 16
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.hu.shape[0])

    @property
    def columns(self) -> int:
        return int(self.hu.shape[1])

    @property
    def normal(self) -> np.ndarray | None:
        return None if self.orientation is None else slice_normal(self.orientation)

    @property
    def is_ct(self) -> bool:
        return self.modality == "CT"

    def file_window(self) -> tuple[float, float] | None:
        """The file's first (centre, width) pair, if any."""
        if self.window_centers and self.window_widths:
            return self.window_centers[0], self.window_widths[0]
        return None


def slice_normal(orientation: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """Unit normal = row direction x column direction (float64 [3])."""
    iop = np.asarray(orientation, dtype=np.float64)
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else n


# ----------------------------------------------------------------------------- reading


def _read_bytes(data: bytes | bytearray | memoryview | str | Path, source: str | None, limits: Limits) -> tuple[bytes, str]:
    if isinstance(data, str | Path):
        path = Path(data)
        name = source or path.name
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise DicomInputError(name, f"cannot read file ({exc.strerror or exc})") from None
        if size > limits.max_request_bytes:
            raise LimitExceeded(name, f"file is {size} bytes, limit {limits.max_request_bytes}")
        try:
            return path.read_bytes(), name
        except OSError as exc:
            raise DicomInputError(name, f"cannot read file ({exc.strerror or exc})") from None
    if isinstance(data, np.ndarray | np.bytes_):  # Triton TYPE_STRING elements arrive as np.bytes_ / object
        data = bytes(data)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DicomInputError(source, f"expected bytes or a path, got {type(data).__name__}")
    if len(data) > limits.max_request_bytes:
        raise LimitExceeded(source or f"<{len(data)} bytes>", f"item is {len(data)} bytes, limit {limits.max_request_bytes}")
    return bytes(data), source or ""


def _parse(raw: bytes, source: str, stop_before_pixels: bool) -> Dataset:
    label = source or f"<{len(raw)} bytes>"
    if len(raw) < 132 or raw[128:132] != b"DICM":
        raise DicomInputError(label, "not a DICOM Part-10 file (no 'DICM' preamble)")
    try:
        # Raw element bytes are read now; values convert lazily, so every later access goes via _get.
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=stop_before_pixels)
    except DicomInputError:
        raise
    except Exception as exc:  # pydicom raises many types (EOFError, struct.error, ValueError, ...)
        raise DicomInputError(label, f"unreadable DICOM ({_why(exc)})") from None
    return ds


def _why(exc: BaseException) -> str:
    """One short line for a library exception (some span many lines)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:240]}"


def _get(ds: Dataset, name: str, default: Any = None) -> Any:
    try:
        value = ds.get(name, default)
    except Exception:  # a malformed value raises on access
        return default
    return default if value is None or value == "" else value


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    items = value if hasattr(value, "__iter__") and not isinstance(value, str | bytes) else [value]
    try:
        vals = tuple(float(v) for v in items)
    except (TypeError, ValueError, OverflowError):
        return None
    if len(vals) != n or not all(math.isfinite(v) for v in vals):
        return None
    return vals


def _multi(value: Any) -> tuple[float, ...]:
    if value is None:
        return ()
    items = value if hasattr(value, "__iter__") and not isinstance(value, str | bytes) else [value]
    out = []
    for v in items:
        try:
            f = float(v)
        except (TypeError, ValueError, OverflowError):
            return ()
        if math.isfinite(f):
            out.append(f)
    return tuple(out)


def _int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _functional(ds: Dataset, frame: int, seq: str) -> Dataset | None:
    """Enhanced multi-frame: the per-frame functional group item, else the shared one."""
    if 0x52009230 not in ds and 0x52009229 not in ds:  # classic image: skip the keyword lookups (hot path)
        return None
    for groups_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = _get(ds, groups_name)
        try:
            item = groups[index] if groups is not None and len(groups) > index else None
            inner = _get(item, seq) if item is not None else None
            if inner is not None and len(inner) > 0:
                return inner[0]
        except Exception:
            continue
    return None


def _geometry(ds: Dataset, frame: int) -> dict[str, Any]:
    position_src = _functional(ds, frame, "PlanePositionSequence") or ds
    orient_src = _functional(ds, frame, "PlaneOrientationSequence") or ds
    measures = _functional(ds, frame, "PixelMeasuresSequence") or ds
    spacing = _floats(_get(measures, "PixelSpacing"), 2) or _floats(_get(ds, "PixelSpacing"), 2)
    if spacing is None:  # projection radiographs: spacing at the detector
        spacing = _floats(_get(ds, "ImagerPixelSpacing"), 2)
    if spacing is not None and not all(s > 0 for s in spacing):
        spacing = None
    orientation = _floats(_get(orient_src, "ImageOrientationPatient"), 6)
    if orientation is not None and not np.any(slice_normal(orientation)):
        orientation = None
    thickness = _floats(_get(measures, "SliceThickness") or _get(ds, "SliceThickness"), 1)
    return {
        "pixel_spacing": spacing,
        "position": _floats(_get(position_src, "ImagePositionPatient"), 3),
        "orientation": orientation,
        "slice_thickness": thickness[0] if thickness else None,
    }


def _identity(ds: Dataset) -> dict[str, str]:
    return {
        "sop_instance_uid": str(_get(ds, "SOPInstanceUID", "")),
        "series_instance_uid": str(_get(ds, "SeriesInstanceUID", "")),
        "study_instance_uid": str(_get(ds, "StudyInstanceUID", "")),
        "frame_of_reference_uid": str(_get(ds, "FrameOfReferenceUID", "")),
        "modality": str(_get(ds, "Modality", "")).upper(),
    }


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(_get(meta, "TransferSyntaxUID", "")) if meta is not None else ""


def read_header(data: bytes | str | Path, source: str | None = None, limits: Limits | None = None) -> DicomHeader:
    """Geometry and UIDs without touching pixel data (fast: pydicom stops before PixelData)."""
    limits = limits or DEFAULT_LIMITS
    raw, name = _read_bytes(data, source, limits)
    ds = _parse(raw, name, stop_before_pixels=True)
    ident = _identity(ds)
    label = name or ident["sop_instance_uid"] or f"<{len(raw)} bytes>"
    geo = _geometry(ds, 0)
    return DicomHeader(
        source=label,
        sop_class_uid=str(_get(ds, "SOPClassUID", "")),
        transfer_syntax_uid=_transfer_syntax(ds),
        rows=_int(_get(ds, "Rows"), 0) or 0,
        columns=_int(_get(ds, "Columns"), 0) or 0,
        frames=_int(_get(ds, "NumberOfFrames"), 1) or 1,
        samples_per_pixel=_int(_get(ds, "SamplesPerPixel"), 1) or 1,
        bits_allocated=_int(_get(ds, "BitsAllocated"), 0) or 0,
        photometric=str(_get(ds, "PhotometricInterpretation", "")).upper(),
        instance_number=_int(_get(ds, "InstanceNumber")),
        **ident,
        **geo,
    )


# ----------------------------------------------------------------------------- checks


def _check_image(ds: Dataset, label: str, limits: Limits) -> tuple[int, int, int, int, int]:
    sop_class = _get(ds, "SOPClassUID")
    if sop_class is not None:
        name = UID(str(sop_class)).name
        if name != str(sop_class) and "Image" not in name:  # a known UID that is not an image
            raise DicomInputError(label, f"non-image SOP class '{name}'")
    if "PixelData" not in ds:
        for alt in ("FloatPixelData", "DoubleFloatPixelData"):
            if alt in ds:
                raise DicomInputError(label, f"{alt} is not supported (integer PixelData only)")
        raise DicomInputError(label, "no PixelData")
    rows = _int(_get(ds, "Rows"), 0) or 0
    cols = _int(_get(ds, "Columns"), 0) or 0
    frames = _int(_get(ds, "NumberOfFrames"), 1)
    samples = _int(_get(ds, "SamplesPerPixel"), 1)
    bits = _int(_get(ds, "BitsAllocated"), 0) or 0
    if rows <= 0 or cols <= 0:
        raise DicomInputError(label, f"bad image size Rows={rows} Columns={cols}")
    if frames is None or frames < 1:
        raise DicomInputError(label, f"bad NumberOfFrames={_get(ds, 'NumberOfFrames')}")
    if samples not in (1, 3):
        raise DicomInputError(label, f"unsupported SamplesPerPixel={samples}")
    if bits not in (1, 8, 16, 32):
        raise DicomInputError(label, f"unsupported BitsAllocated={bits}")
    if rows * cols > limits.max_pixels_per_slice:
        raise LimitExceeded(label, f"{rows}x{cols} pixels per slice, limit {limits.max_pixels_per_slice}")
    if frames > limits.max_frames:
        raise LimitExceeded(label, f"{frames} frames, limit {limits.max_frames}")
    decoded = rows * cols * frames * samples * max(bits, 8) // 8
    if decoded > limits.max_decoded_bytes:
        raise LimitExceeded(label, f"pixel data would decode to {decoded} bytes, limit {limits.max_decoded_bytes}")
    tsyntax = _transfer_syntax(ds)
    if tsyntax and tsyntax not in _NATIVE_LE and tsyntax != _BIG_ENDIAN:
        try:
            from pydicom.pixels import get_decoder

            decoder = get_decoder(UID(tsyntax))
            available = decoder.is_available
        except Exception:
            available = False
        if not available:
            raise DicomInputError(label, f"unsupported transfer syntax {UID(tsyntax).name} ({tsyntax})")
    return rows, cols, frames, samples, bits


# ----------------------------------------------------------------------------- pixels


def _native_pixels(ds: Dataset, rows: int, cols: int, frames: int, bits: int, label: str) -> np.ndarray | None:
    """np.frombuffer on little-endian native grayscale PixelData (no pydicom pixel pipeline)."""
    if bits not in (8, 16, 32):
        return None
    signed = _int(_get(ds, "PixelRepresentation"), 0) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}").newbyteorder("<")
    raw = ds.PixelData
    need = rows * cols * frames * dtype.itemsize
    if len(raw) < need:
        raise DicomInputError(label, f"truncated PixelData: {len(raw)} bytes, expected {need}")
    arr = np.frombuffer(raw, dtype=dtype, count=rows * cols * frames).reshape(frames, rows, cols)
    stored = _int(_get(ds, "BitsStored"), bits) or bits
    if 0 < stored < bits:  # high bits may carry overlays or garbage: keep only the stored bits
        shift = bits - stored
        arr = (arr << shift) >> shift if signed else arr & np.array((1 << stored) - 1, dtype=arr.dtype)
    return arr


def _decoded_pixels(ds: Dataset, rows: int, cols: int, frames: int, samples: int, label: str) -> np.ndarray:
    try:
        arr = ds.pixel_array
        photometric = str(_get(ds, "PhotometricInterpretation", "")).upper()
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
            samples = 3
    except DicomInputError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # Rust decoders (pylibjpeg-rle) panic with a BaseException subclass
        raise DicomInputError(label, f"cannot decode pixel data ({_why(exc)})") from None
    arr = np.asarray(arr)
    if samples == 3:  # colour (RGB after pydicom's YBR conversion): luminance, ITU-R BT.601
        arr = arr.reshape(frames, rows, cols, 3).astype(np.float32)
        arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return arr.reshape(frames, rows, cols)


def _modality_lut(ds: Dataset, frame: int) -> tuple[float, float, Dataset | None]:
    src = _functional(ds, frame, "PixelValueTransformationSequence") or ds
    slope = _floats(_get(src, "RescaleSlope"), 1)
    intercept = _floats(_get(src, "RescaleIntercept"), 1)
    lut_seq = _get(ds, "ModalityLUTSequence")
    if slope is None and intercept is None and lut_seq is not None and len(lut_seq) > 0:
        return 1.0, 0.0, lut_seq[0]
    s = slope[0] if slope and slope[0] != 0 else 1.0
    return s, intercept[0] if intercept else 0.0, None


def _apply_lut_item(arr: np.ndarray, item: Dataset, label: str) -> np.ndarray:
    """Modality / VOI LUT data lookup with the descriptor's first mapped value and clamping."""
    try:
        desc = [int(v) for v in item.LUTDescriptor]
        data = _lut_data(item)
    except Exception as exc:
        raise DicomInputError(label, f"bad LUT sequence ({_why(exc)})") from None
    first = desc[1] if desc[1] < 32768 else desc[1] - 65536  # signed first value (PS3.3 C.11.1.1)
    idx = np.clip(arr.astype(np.int64) - first, 0, len(data) - 1)
    return data[idx].astype(np.float32)


def _lut_data(item: Dataset) -> np.ndarray:
    desc = [int(v) for v in item.LUTDescriptor]
    n = desc[0] or 65536
    raw = item["LUTData"].value
    if isinstance(raw, bytes | bytearray):
        data = np.frombuffer(raw, dtype="<u2" if desc[2] > 8 or len(raw) >= 2 * n else "u1")
    else:
        data = np.asarray(raw if hasattr(raw, "__len__") else [raw], dtype=np.float64)
    if data.size == 0:
        raise ValueError("empty LUTData")
    return data[:n].astype(np.float32)


def _voi(ds: Dataset, frame: int, label: str) -> dict[str, Any]:
    src = _functional(ds, frame, "FrameVOILUTSequence") or ds
    centers = _multi(_get(src, "WindowCenter"))
    widths = _multi(_get(src, "WindowWidth"))
    n = min(len(centers), len(widths))
    function = str(_get(src, "VOILUTFunction", "LINEAR")).upper()
    voi_lut = None
    seq = _get(ds, "VOILUTSequence")
    if seq is not None and len(seq) > 0:
        try:
            desc = tuple(int(v) for v in seq[0].LUTDescriptor)
            voi_lut = (desc, _lut_data(seq[0]))  # type: ignore[assignment]
        except Exception:
            voi_lut = None  # a broken VOI LUT only loses the display default, not the image
    return {
        "window_centers": centers[:n],
        "window_widths": widths[:n],
        "voi_lut_function": function if function in ("LINEAR", "LINEAR_EXACT", "SIGMOID") else "LINEAR",
        "voi_lut": voi_lut,
    }


def decode_frames(data: bytes | str | Path, source: str | None = None, limits: Limits | None = None) -> list[DecodedSlice]:
    """Decode every frame of one item (classic single-frame CT gives one; Enhanced CT gives many)."""
    limits = limits or DEFAULT_LIMITS
    raw, name = _read_bytes(data, source, limits)
    ds = _parse(raw, name, stop_before_pixels=False)
    ident = _identity(ds)
    label = name or ident["sop_instance_uid"] or f"<{len(raw)} bytes>"
    rows, cols, frames, samples, bits = _check_image(ds, label, limits)

    tsyntax = _transfer_syntax(ds)
    arr = None
    if samples == 1 and (tsyntax in _NATIVE_LE or not tsyntax):
        photometric = str(_get(ds, "PhotometricInterpretation", "")).upper()
        if photometric != "PALETTE COLOR":
            try:
                arr = _native_pixels(ds, rows, cols, frames, bits, label)
            except DicomInputError:
                raise
            except Exception as exc:
                raise DicomInputError(label, f"cannot read pixel data ({_why(exc)})") from None
    if arr is None:
        arr = _decoded_pixels(ds, rows, cols, frames, samples, label)

    photometric = str(_get(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples == 3 or photometric == "PALETTE COLOR":
        photometric = "MONOCHROME2"  # converted to luminance above
    signed = _int(_get(ds, "PixelRepresentation"), 0) == 1
    stored = _int(_get(ds, "BitsStored"), bits) or bits
    out = []
    for f in range(frames):
        slope, intercept, lut_item = _modality_lut(ds, f)
        if lut_item is not None:
            hu = _apply_lut_item(arr[f], lut_item, label)
        else:
            hu = arr[f].astype(np.float32)  # one float32 copy; the in-place ops below reuse it
            if slope != 1.0:
                hu *= np.float32(slope)
            if intercept != 0.0:
                hu += np.float32(intercept)
        out.append(
            DecodedSlice(
                hu=hu,
                source=label,
                photometric=photometric,
                instance_number=_int(_get(ds, "InstanceNumber")),
                frame_index=f,
                rescale_slope=slope,
                rescale_intercept=intercept,
                signed=signed,
                bits_stored=stored,
                **ident,
                **_geometry(ds, f),
                **_voi(ds, f, label),
            )
        )
    return out


def decode_slice(
    data: bytes | str | Path, source: str | None = None, limits: Limits | None = None, frame: int | None = None
) -> DecodedSlice:
    """Decode one single-frame image (or ``frame`` of a multi-frame one) to float32 HU / modality values."""
    frames = decode_frames(data, source, limits)
    if frame is None:
        if len(frames) != 1:
            raise DicomInputError(frames[0].source, f"{len(frames)} frames: pass frame= or use decode_frames")
        return frames[0]
    if not 0 <= frame < len(frames):
        raise DicomInputError(frames[0].source, f"frame {frame} out of range (0..{len(frames) - 1})")
    return frames[frame]
