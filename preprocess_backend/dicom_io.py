"""DICOM Part-10 bytes or files -> float32 modality values (HU for CT) plus geometry and UIDs.

Every failure is a ``DicomInputError`` naming the file or SOPInstanceUID. Work is bounded before it
is done: sizes are checked on the header (``Limits``) before pixel data is decoded (a 2 KB header may
claim gigabytes), a deflated data set is inflated incrementally up to a byte bound, header parsing
runs under a deadline (200 MB of empty elements would otherwise take pydicom a minute), and
compressed pixel data is decoded only when its decoded size fits about a second of decoding.

Every header value the pipeline computes with is validated (``_geometry``, ``_check_image``,
``_modality_lut``, ``_voi``): impossible values refuse the item, odd but legal ones are kept and,
where a real archive needs leniency (an empty SOPInstanceUID), the item carries a warning.
"""

from __future__ import annotations

import io
import math
import struct
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from preprocess_backend.errors import DicomInputError, LimitExceeded
from preprocess_backend.types import Limits

if TYPE_CHECKING:
    from preprocess_backend.contract import ModelContract

DEFAULT_LIMITS = Limits()

# Work bounds per item that hold whatever the Limits say (a Limits attribute of the same name wins).
PARSE_DEADLINE_S = 1.0  # header parsing; a real CT header parses in milliseconds
MAX_INFLATED_BYTES = 256 * 1024 * 1024  # a deflated data set may inflate to at most this (zlib: ~0.3 s)
# Compressed pixel data decodes at ~14 MB/s of output here (JPEG 2000, 512 x 512 x 16 bit: 37 ms),
# so 16 MiB is about a second; larger compressed items (long Enhanced CT) are refused before decoding.
MAX_COMPRESSED_DECODED_BYTES = 16 * 1024 * 1024
DCMDJPEG_TIMEOUT_S = 5.0  # dcmtk's decoder for 12-bit JPEG Extended, run as a subprocess
JPEG_EXTENDED_12BIT = "1.2.840.10008.1.2.4.51"
DEFLATED = "1.2.840.10008.1.2.1.99"

PHOTOMETRICS = (  # PS3.3 C.7.6.3.1.2 defined terms (retired ones refused as unknown)
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420",
    "YBR_ICT", "YBR_RCT",
)
MAX_SPACING_MM = 500.0  # physically plausible pixel / slice size bounds (the model contract is tighter)
MIN_SPACING_MM = 1e-3
MAX_ABS_SLOPE = 1e4  # rescale slopes of real images are 1e-3..1e2; 1e30 or NaN is a broken header
MIN_ABS_SLOPE = 1e-8
MAX_ABS_INTERCEPT = 1e6
MAX_ABS_POSITION_MM = 1e6
DIRECTION_TOL = 1e-2  # |row|, |col| within 1 % of unit length and |row . col| below this

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
    warnings: list[str] = field(default_factory=list)  # leniency applied to this item (say it in results)

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
    pixel_padding_value: float | None = None  # PixelPaddingValue in modality units (kept as stored, HU for CT)
    warnings: list[str] = field(default_factory=list)  # leniency applied to this item (say it in results)
    extra: dict[str, Any] = field(default_factory=dict)
    # Integer stored values (BitsStored applied) when hu = stored * rescale_slope + rescale_intercept
    # (grayscale, no Modality LUT Sequence), else None: preprocessing windows them with one lookup
    # plan instead of a float pass. With ``decode_frames(with_hu=False)`` ``hu`` is not computed
    # (``hu_deferred``; a zero-stride NaN of the right shape): call ``modality_values()``.
    stored: np.ndarray | None = None
    hu_deferred: bool = False

    def modality_values(self) -> np.ndarray:
        """``hu``, computed from ``stored`` on first use when decoding deferred it."""
        if self.hu_deferred and self.stored is not None:
            self.hu = _rescale(self.stored, self.rescale_slope, self.rescale_intercept)
            self.hu_deferred = False
        return self.hu

    def modality_values_in(self, rows: slice, cols: slice) -> np.ndarray:
        """Modality values of one crop; when decoding deferred them, computed for that crop only
        (cube cutting reads a few small crops of each slice, not the whole slice)."""
        if self.hu_deferred and self.stored is not None:
            return _rescale(self.stored[rows, cols], self.rescale_slope, self.rescale_intercept)
        return self.hu[rows, cols]

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


def _rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """float32 modality values of integer stored values (the one place this arithmetic lives)."""
    hu = stored.astype(np.float32)  # one float32 copy; the in-place ops below reuse it
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return hu


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


def _bound(limits: Limits, name: str, default: float) -> float:
    """A work bound: the Limits attribute of that name if a deployment configures one, else the default."""
    return float(getattr(limits, name, default))


class _ParseTimeout(BaseException):  # noqa: N818 -- BaseException: pydicom wraps Exceptions raised inside sequences
    pass


class _DeadlineReader:
    """A binary stream whose reads fail after a deadline: pydicom reads every element (nested
    sequence items included) through ``read``, so parsing any header is bounded in time."""

    def __init__(self, stream: BinaryIO, deadline: float) -> None:
        self._stream = stream
        self._deadline = deadline  # time.monotonic() value
        self.elements_read = 0
        self.expired = False  # pydicom turns any exception inside a sequence item into OSError: check this

    def read(self, size: int = -1) -> bytes:
        self.elements_read += 1
        if self.expired or time.monotonic() > self._deadline:
            self.expired = True
            raise _ParseTimeout
        return self._stream.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()


def _inflate(body: bytes, label: str, max_bytes: int, deadline: float) -> list[bytes]:
    """Raw-deflate ``body`` in 16 MiB steps, refusing before more than ``max_bytes`` are produced or
    after the ``deadline`` (a ``time.monotonic()`` value) has passed."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    size, pending = 0, body
    try:
        while pending and size <= max_bytes:
            part = inflater.decompress(pending, min(16 << 20, max_bytes + 1 - size))
            parts.append(part)
            size += len(part)
            pending = inflater.unconsumed_tail
            if time.monotonic() > deadline:
                raise LimitExceeded(label, f"inflating the deflated data set exceeded the time bound ({size} bytes so far); refused")
        if size <= max_bytes:
            rest = inflater.flush(max_bytes + 1 - size)
            parts.append(rest)
            size += len(rest)
    except zlib.error as exc:
        raise DicomInputError(label, f"unreadable DICOM (deflated data set: zlib error: {exc})") from None
    if size > max_bytes or inflater.unconsumed_tail:
        raise LimitExceeded(
            label, f"deflated data set inflates to more than {max_bytes} bytes ({len(body)} bytes compressed); refused"
        )
    if time.monotonic() > deadline:
        raise LimitExceeded(label, f"inflating the deflated data set exceeded the time bound ({size} bytes); refused")
    return parts  # joined once by the caller (each copy of a 200 MB body costs ~0.1 s)


def _parse(
    src: bytes | BinaryIO, source: str, stop_before_pixels: bool, limits: Limits | None = None, pixels_in_place: bool = False
) -> Dataset:
    """Parse a Part-10 stream, bounded: deflate inflated up to a byte bound, the parse under a deadline.

    ``pixels_in_place`` (bytes in a native little-endian syntax): pydicom copies a 512 x 512 slice's
    512 KiB PixelData when it reads it, and its per-element work around that copy cost more than
    the copy (dcmread 0.44 -> 0.25 ms per slice without it). So the header is parsed up to
    PixelData and the value is left in ``src`` as a memoryview (``_pixel_bytes``). When the element
    is not one defined-length PixelData that ends the item, the item is parsed whole, as without
    the flag, so pydicom's handling and messages stay for every unusual file.
    """
    limits = limits or DEFAULT_LIMITS
    started = time.monotonic()  # one budget for inflation and parsing together
    fp: BinaryIO = io.BytesIO(src) if isinstance(src, bytes | bytearray) else src
    head = fp.read(132)
    label = source or (f"<{len(src)} bytes>" if isinstance(src, bytes | bytearray) else "<stream>")
    if len(head) < 132 or head[128:132] != b"DICM":
        raise DicomInputError(label, "not a DICOM Part-10 file (no 'DICM' preamble)")
    syntax = ""
    try:
        from pydicom.filereader import _read_file_meta_info

        meta = _read_file_meta_info(fp)
        syntax = str(meta.get("TransferSyntaxUID", ""))
    except Exception:  # let dcmread report a broken meta group its own way
        meta = None
    deadline = _bound(limits, "parse_deadline_s", PARSE_DEADLINE_S)
    if syntax == DEFLATED and meta is not None:
        # pydicom would zlib.decompress the whole body at once (a 200 KB bomb -> 200 MB): inflate here,
        # bounded, and hand pydicom the equivalent explicit VR little endian stream.
        max_inflated = int(min(_bound(limits, "max_inflated_bytes", MAX_INFLATED_BYTES), limits.max_decoded_bytes))
        body = fp.read(limits.max_request_bytes + 1)
        inflated = _inflate(body, label, max_inflated, started + deadline)
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_file_meta_info

        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        buf = DicomBytesIO()
        write_file_meta_info(buf, meta, enforce_standard=False)
        fp = io.BytesIO(b"".join([head, buf.getvalue(), *inflated]))
    else:
        fp.seek(0)
    in_place = pixels_in_place and not stop_before_pixels and isinstance(src, bytes) and syntax in _IN_PLACE_SYNTAXES
    reader = _DeadlineReader(fp, started + deadline)
    try:
        # Raw element bytes are read now; values convert lazily, so every later access goes via _get.
        ds = pydicom.dcmread(reader, stop_before_pixels=stop_before_pixels or in_place)  # type: ignore[arg-type]
    except DicomInputError:
        raise
    except (_ParseTimeout, Exception) as exc:  # pydicom raises many types (EOFError, struct.error, ...)
        if reader.expired:
            raise LimitExceeded(
                label, f"header parsing exceeded the {deadline:g} s time bound ({reader.elements_read} reads); refused"
            ) from None
        raise DicomInputError(label, f"unreadable DICOM ({_why(exc)})") from None
    if syntax == DEFLATED:
        ds.file_meta.TransferSyntaxUID = DEFLATED  # what the sender wrote; pixels are native after inflation
    if in_place:
        view = _pixel_element_view(src, fp.tell(), explicit=syntax == ExplicitVRLittleEndian)  # type: ignore[arg-type]
        if view is None:  # empty, encapsulated, truncated, elements after PixelData, ...: parse it whole
            return _parse(src, source, stop_before_pixels, limits)
        object.__setattr__(ds, _PIXEL_VIEW, view)
    return ds


_PIXEL_VIEW = "_ctlesion_pixel_view"  # instance attribute: PixelData's bytes as a view of the request
_IN_PLACE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}


def _pixel_element_view(raw: bytes, pos: int, explicit: bool) -> memoryview | None:
    """The value of the (7FE0,0010) element starting at ``pos`` in ``raw``, or None when that is
    not a non-empty, defined-length PixelData element that ends ``raw``."""
    if pos + 8 > len(raw) or struct.unpack_from("<HH", raw, pos) != (0x7FE0, 0x0010):
        return None
    if explicit:
        if raw[pos + 4 : pos + 6] not in (b"OB", b"OW") or pos + 12 > len(raw):
            return None
        length, start = struct.unpack_from("<I", raw, pos + 8)[0], pos + 12
    else:
        if raw[pos + 4 : pos + 6] in (b"OB", b"OW") and raw[pos + 6 : pos + 8] == b"\0\0":
            return None  # explicit VR in an implicit-VR file: pydicom detects it, let it
        length, start = struct.unpack_from("<I", raw, pos + 4)[0], pos + 8
    if length in (0, 0xFFFFFFFF) or start + length != len(raw):
        # empty, encapsulated, truncated, or elements after PixelData (padding, signatures, or a
        # flood the parse deadline refuses): the whole parse reads them and says what is wrong
        return None
    return memoryview(raw)[start : start + length]


def _pixel_bytes(ds: Dataset) -> bytes | memoryview:
    """PixelData's value: the view ``_parse_with_pixel_view`` left, else the parsed element's."""
    view = ds.__dict__.get(_PIXEL_VIEW)
    return view if view is not None else ds.PixelData


def _why(exc: BaseException) -> str:
    """One short line for a library exception (some span many lines)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:240]}"


_MISSING = object()


def _get(ds: Dataset, name: str, default: Any = None) -> Any:
    """``ds.name``, ``default`` when absent, empty or unreadable.

    Remembered per dataset (nothing here writes to one): decoding a slice reads ~40 header values,
    a third of them twice or more (the contract's checks, the geometry, the bit checks), and each
    pydicom keyword read costs microseconds even once converted.
    """
    memo = ds.__dict__.get("_ctlesion_values")
    if memo is None:
        memo = {}
        object.__setattr__(ds, "_ctlesion_values", memo)  # a plain attribute, not a DICOM element
    value = memo.get(name, _MISSING)
    if value is _MISSING:
        try:
            value = ds.get(name)
        except Exception:  # a malformed value raises on access
            value = None
        memo[name] = value
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


def _show(value: Any) -> str:
    """A header value as it reads in a refusal (multi-values joined, at most 60 characters)."""
    items = value if hasattr(value, "__iter__") and not isinstance(value, str | bytes) else [value]
    return "\\".join(str(v) for v in items)[:60]


def _numbers(src: Dataset, name: str, n: int, label: str) -> tuple[float, ...] | None:
    """``n`` finite numbers, None when absent; present but not ``n`` finite numbers refuses the item."""
    value = _get(src, name)
    if value is None:
        return None
    vals = _floats(value, n)
    if vals is None:
        raise DicomInputError(label, f"{name} '{_show(value)}' is not {n} finite number{'s' if n > 1 else ''}")
    return vals


def _geometry(ds: Dataset, frame: int, label: str = "", warnings: list[str] | None = None) -> dict[str, Any]:
    """Spacing, position, orientation, thickness: absent -> None; impossible -> ``DicomInputError``."""
    position_src = _functional(ds, frame, "PlanePositionSequence") or ds
    orient_src = _functional(ds, frame, "PlaneOrientationSequence") or ds
    measures = _functional(ds, frame, "PixelMeasuresSequence") or ds
    spacing = _numbers(measures, "PixelSpacing", 2, label)
    if spacing is None and measures is not ds:
        spacing = _numbers(ds, "PixelSpacing", 2, label)
    if spacing is None:  # projection radiographs: spacing at the detector
        spacing = _numbers(ds, "ImagerPixelSpacing", 2, label)
    if spacing is not None and not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise DicomInputError(
            label, f"PixelSpacing {_show(spacing)} mm is impossible (each must be in {MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm)"
        )
    orientation = _numbers(orient_src, "ImageOrientationPatient", 6, label)
    if orientation is not None:
        row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
        nr, nc, dot = float(np.linalg.norm(row)), float(np.linalg.norm(col)), float(abs(row @ col))
        if abs(nr - 1) > DIRECTION_TOL or abs(nc - 1) > DIRECTION_TOL or dot > DIRECTION_TOL:
            raise DicomInputError(
                label, f"ImageOrientationPatient {_show(orientation)} is not two orthogonal unit vectors "
                f"(|row| {nr:.3g}, |column| {nc:.3g}, row . column {dot:.3g})"
            )
    position = _numbers(position_src, "ImagePositionPatient", 3, label)
    if position is not None and max(abs(v) for v in position) > MAX_ABS_POSITION_MM:
        raise DicomInputError(label, f"ImagePositionPatient {_show(position)} is implausible (> {MAX_ABS_POSITION_MM:g} mm)")
    thickness = _floats(_get(measures, "SliceThickness") or _get(ds, "SliceThickness"), 1)
    if thickness is not None and not MIN_SPACING_MM <= thickness[0] <= MAX_SPACING_MM:
        if warnings is not None:  # 0 is common in converted data: unknown, not a reason to refuse
            warnings.append(f"SliceThickness {thickness[0]:g} ignored (not a thickness)")
        thickness = None
    return {
        "pixel_spacing": spacing,
        "position": position,
        "orientation": orientation,
        "slice_thickness": thickness[0] if thickness else None,
    }


def _identity(ds: Dataset, warnings: list[str] | None = None) -> dict[str, str]:
    sop = str(_get(ds, "SOPInstanceUID", ""))
    if not sop:  # real archives (TotalSegmentator's DICOM) leave it empty; the file meta must carry it
        meta = getattr(ds, "file_meta", None)
        sop = str(_get(meta, "MediaStorageSOPInstanceUID", "")) if meta is not None else ""
        if sop and warnings is not None:
            warnings.append("SOPInstanceUID empty: MediaStorageSOPInstanceUID of the file meta used")
    return {
        "sop_instance_uid": sop,
        "series_instance_uid": str(_get(ds, "SeriesInstanceUID", "")),
        "study_instance_uid": str(_get(ds, "StudyInstanceUID", "")),
        "frame_of_reference_uid": str(_get(ds, "FrameOfReferenceUID", "")),
        "modality": str(_get(ds, "Modality", "")).upper(),
    }


def _sop_class(ds: Dataset) -> str:
    value = str(_get(ds, "SOPClassUID", ""))
    if not value:
        meta = getattr(ds, "file_meta", None)
        value = str(_get(meta, "MediaStorageSOPClassUID", "")) if meta is not None else ""
    return value


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(_get(meta, "TransferSyntaxUID", "")) if meta is not None else ""


def _header_of(ds: Dataset, label: str, warnings: list[str]) -> DicomHeader:
    ident = _identity(ds, warnings)
    label = label or ident["sop_instance_uid"]
    geo = _geometry(ds, 0, label, warnings)
    if _transfer_syntax(ds) == JPEG_EXTENDED_12BIT and (_int(_get(ds, "BitsStored"), 8) or 8) > 8:
        # the server's decode may fall back to dcmtk (decode_frames says so); the client can only predict it
        warnings.append("12-bit JPEG Extended: decoded with dcmtk's dcmdjpeg where pydicom's decoders refuse it")
    return DicomHeader(
        source=label,
        sop_class_uid=_sop_class(ds),
        transfer_syntax_uid=_transfer_syntax(ds),
        rows=_int(_get(ds, "Rows"), 0) or 0,
        columns=_int(_get(ds, "Columns"), 0) or 0,
        frames=_int(_get(ds, "NumberOfFrames"), 1) or 1,
        samples_per_pixel=_int(_get(ds, "SamplesPerPixel"), 1) or 1,
        bits_allocated=_int(_get(ds, "BitsAllocated"), 0) or 0,
        photometric=str(_get(ds, "PhotometricInterpretation", "")).upper(),
        instance_number=_int(_get(ds, "InstanceNumber")),
        warnings=warnings,
        **ident,
        **geo,
    )


def read_header(data: bytes | str | Path, source: str | None = None, limits: Limits | None = None) -> DicomHeader:
    """Geometry and UIDs without touching pixel data.

    A file is read only up to its PixelData element (pydicom ``stop_before_pixels`` on the open
    file), so a client reads each file's pixels once, when it sends them.
    """
    limits = limits or DEFAULT_LIMITS
    if isinstance(data, str | Path):
        path = Path(data)
        name = source or path.name
        try:
            size = path.stat().st_size
            if size > limits.max_request_bytes:
                raise LimitExceeded(name, f"file is {size} bytes, limit {limits.max_request_bytes}")
            with path.open("rb") as f:
                ds = _parse(f, name, stop_before_pixels=True, limits=limits)  # type: ignore[arg-type]
        except OSError as exc:
            raise DicomInputError(name, f"cannot read file ({exc.strerror or exc})") from None
        return _header_of(ds, name, [])
    raw, name = _read_bytes(data, source, limits)
    ds = _parse(raw, name, stop_before_pixels=True, limits=limits)
    return _header_of(ds, name or _identity(ds)["sop_instance_uid"] or f"<{len(raw)} bytes>", [])


# ----------------------------------------------------------------------------- checks


def _check_is_image(ds: Dataset, label: str) -> None:
    """An image at all (checked before the model contract: 'no PixelData' says more than 'modality')."""
    sop_class = _sop_class(ds) or None
    if sop_class is not None:
        name = UID(str(sop_class)).name
        if name != str(sop_class) and "Image" not in name:  # a known UID that is not an image
            raise DicomInputError(label, f"non-image SOP class '{name}'")
    if "PixelData" not in ds and _PIXEL_VIEW not in ds.__dict__:
        for alt in ("FloatPixelData", "DoubleFloatPixelData"):
            if alt in ds:
                raise DicomInputError(label, f"{alt} is not supported (integer PixelData only)")
        raise DicomInputError(label, "no PixelData")


def _check_image(
    ds: Dataset, label: str, limits: Limits, warnings: list[str] | None = None
) -> tuple[int, int, int, int, int]:
    _check_is_image(ds, label)
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
    _check_bits(ds, label, bits)
    photometric = str(_get(ds, "PhotometricInterpretation", "")).upper()
    if not photometric:
        if samples != 1:
            raise DicomInputError(label, f"no PhotometricInterpretation for {samples} samples per pixel")
        if warnings is not None:
            warnings.append("PhotometricInterpretation missing: MONOCHROME2 assumed")
    elif photometric not in PHOTOMETRICS:
        raise DicomInputError(label, f"unknown PhotometricInterpretation '{photometric}'")
    elif (samples == 1) != (photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")):
        raise DicomInputError(label, f"PhotometricInterpretation {photometric} with SamplesPerPixel {samples}")
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != frames:
        raise DicomInputError(
            label, f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for NumberOfFrames {frames}"
        )
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
        bound = int(_bound(limits, "max_compressed_decoded_bytes", MAX_COMPRESSED_DECODED_BYTES))
        if decoded > bound:  # decoders cannot be interrupted: refuse what would hold the instance > ~1 s
            raise LimitExceeded(
                label, f"compressed pixel data would decode to {decoded} bytes, limit {bound} per item "
                "(about 1 s of decoding); send the frames as single-frame items"
            )
    return rows, cols, frames, samples, bits


def _check_bits(ds: Dataset, label: str, bits: int) -> None:
    """BitsStored <= BitsAllocated, HighBit = BitsStored - 1, PixelRepresentation 0 or 1."""
    stored = _int(_get(ds, "BitsStored"))
    if "BitsStored" in ds and _get(ds, "BitsStored") is not None and (stored is None or not 1 <= stored <= bits):
        raise DicomInputError(label, f"BitsStored {_show(_get(ds, 'BitsStored'))} impossible with BitsAllocated {bits}")
    high = _int(_get(ds, "HighBit"))
    if _get(ds, "HighBit") is not None and (high is None or high != (stored or bits) - 1):
        raise DicomInputError(
            label, f"HighBit {_show(_get(ds, 'HighBit'))} inconsistent with BitsStored {stored or bits} (must be BitsStored - 1)"
        )
    rep = _get(ds, "PixelRepresentation")
    if rep is not None and _int(rep) not in (0, 1):
        raise DicomInputError(label, f"PixelRepresentation {_show(rep)} (must be 0 or 1)")


# ----------------------------------------------------------------------------- pixels


def _native_pixels(ds: Dataset, rows: int, cols: int, frames: int, bits: int, label: str) -> np.ndarray | None:
    """np.frombuffer on little-endian native grayscale PixelData (no pydicom pixel pipeline)."""
    if bits not in (8, 16, 32):
        return None
    signed = _int(_get(ds, "PixelRepresentation"), 0) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}").newbyteorder("<")
    raw = _pixel_bytes(ds)
    need = rows * cols * frames * dtype.itemsize
    if len(raw) < need:
        raise DicomInputError(label, f"truncated PixelData: {len(raw)} bytes, expected {need}")
    arr = np.frombuffer(raw, dtype=dtype, count=rows * cols * frames).reshape(frames, rows, cols)
    stored = _int(_get(ds, "BitsStored"), bits) or bits
    if 0 < stored < bits:  # high bits may carry overlays or garbage: keep only the stored bits
        # Checking first costs a read; masking a fresh copy costs ~10x that (new pages): copy only if needed.
        shift = bits - stored
        if signed:
            if arr.min() < -(1 << (stored - 1)) or arr.max() >= 1 << (stored - 1):
                arr = (arr << shift) >> shift
        elif arr.max() >> stored:
            arr = arr & np.array((1 << stored) - 1, dtype=arr.dtype)
    return arr


def _dcmtk_pixels(raw: bytes, rows: int, cols: int, frames: int, label: str) -> np.ndarray:
    """12-bit JPEG Extended through dcmtk's ``dcmdjpeg`` (GDCM, pylibjpeg and Pillow refuse some
    real files of it): a subprocess under a timeout, in a private temporary directory."""
    with tempfile.TemporaryDirectory(prefix="ctlesion-dcmdjpeg-") as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        src.write_bytes(raw)
        try:
            done = subprocess.run(
                ["dcmdjpeg", str(src), str(dst)], capture_output=True, timeout=DCMDJPEG_TIMEOUT_S, check=False
            )
        except FileNotFoundError:
            raise DicomInputError(label, "cannot decode 12-bit JPEG Extended (dcmtk's dcmdjpeg is not installed)") from None
        except subprocess.TimeoutExpired:
            raise LimitExceeded(label, f"dcmdjpeg took longer than {DCMDJPEG_TIMEOUT_S:g} s") from None
        if done.returncode != 0 or not dst.exists():
            why = " ".join(done.stderr.decode("utf-8", "replace").split())[:200]
            raise DicomInputError(label, f"cannot decode pixel data (dcmdjpeg: {why or done.returncode})")
        out = pydicom.dcmread(dst)
    signed = _int(_get(out, "PixelRepresentation"), 0) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{(_int(_get(out, 'BitsAllocated'), 16) or 16) // 8}").newbyteorder("<")
    data = out.PixelData
    if len(data) < rows * cols * frames * dtype.itemsize:
        raise DicomInputError(label, "cannot decode pixel data (dcmdjpeg output too short)")
    return np.frombuffer(data, dtype=dtype, count=rows * cols * frames).reshape(frames, rows, cols)


def _decoded_pixels(
    ds: Dataset, rows: int, cols: int, frames: int, samples: int, label: str,
    raw: bytes = b"", warnings: list[str] | None = None,
) -> np.ndarray:
    view = ds.__dict__.get(_PIXEL_VIEW)
    if view is not None and "PixelData" not in ds:  # pydicom's pixel pipeline reads the element itself
        ds.add_new(0x7FE00010, "OW" if (_int(_get(ds, "BitsAllocated"), 8) or 8) > 8 else "OB", bytes(view))
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
        if _transfer_syntax(ds) != JPEG_EXTENDED_12BIT or samples != 1 or not raw:
            raise DicomInputError(label, f"cannot decode pixel data ({_why(exc)})") from None
        arr = _dcmtk_pixels(raw, rows, cols, frames, label)
        if warnings is not None:
            warnings.append("12-bit JPEG Extended decoded with dcmtk's dcmdjpeg (pydicom's decoders refused it)")
    arr = np.asarray(arr)
    if samples == 3:  # colour (RGB after pydicom's YBR conversion): luminance, ITU-R BT.601
        arr = arr.reshape(frames, rows, cols, 3).astype(np.float32)
        arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return arr.reshape(frames, rows, cols)


def _modality_lut(ds: Dataset, frame: int, label: str = "") -> tuple[float, float, Dataset | None]:
    src = _functional(ds, frame, "PixelValueTransformationSequence") or ds
    slope = _numbers(src, "RescaleSlope", 1, label)
    intercept = _numbers(src, "RescaleIntercept", 1, label)
    lut_seq = _get(ds, "ModalityLUTSequence")
    if slope is None and intercept is None and lut_seq is not None and len(lut_seq) > 0:
        return 1.0, 0.0, lut_seq[0]
    s = slope[0] if slope else 1.0
    if not MIN_ABS_SLOPE <= abs(s) <= MAX_ABS_SLOPE:
        raise DicomInputError(label, f"RescaleSlope {s:g} is implausible (|slope| must be in {MIN_ABS_SLOPE:g}..{MAX_ABS_SLOPE:g})")
    b = intercept[0] if intercept else 0.0
    if abs(b) > MAX_ABS_INTERCEPT:
        raise DicomInputError(label, f"RescaleIntercept {b:g} is implausible (|intercept| <= {MAX_ABS_INTERCEPT:g})")
    return s, b, None


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
    centers, widths = _multi(_get(src, "WindowCenter")), _multi(_get(src, "WindowWidth"))
    for name, values, ok in (("WindowCenter", centers, lambda v: True), ("WindowWidth", widths, lambda v: v > 0)):
        raw = _get(src, name)
        count = len(raw) if hasattr(raw, "__len__") and not isinstance(raw, str | bytes) else int(raw is not None)
        if len(values) != count or not all(ok(v) for v in values):
            raise DicomInputError(label, f"{name} '{_show(raw)}' impossible (finite numbers{', > 0' if name == 'WindowWidth' else ''})")
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


def decode_frames(
    data: bytes | str | Path,
    source: str | None = None,
    limits: Limits | None = None,
    *,
    with_hu: bool = True,
    contract: ModelContract | None = None,
) -> list[DecodedSlice]:
    """Decode every frame of one item (classic single-frame CT gives one; Enhanced CT gives many).

    ``with_hu=False`` leaves float ``hu`` uncomputed where ``stored`` holds the integer values
    (``DecodedSlice.modality_values()`` computes it on demand): the serving path never needs it.
    ``contract`` (the served model's, ``preprocess_backend.contract``) refuses what the model cannot
    read before any pixel is decoded.
    """
    limits = limits or DEFAULT_LIMITS
    raw, name = _read_bytes(data, source, limits)
    ds = _parse(raw, name, stop_before_pixels=False, limits=limits, pixels_in_place=True)
    warnings: list[str] = []
    ident = _identity(ds, warnings)
    label = name or ident["sop_instance_uid"] or f"<{len(raw)} bytes>"
    if contract is not None:
        _check_is_image(ds, label)
        contract.check_kind(label, ident["modality"], _sop_class(ds))
        contract.check_header(_header_of(ds, label, []))
    rows, cols, frames, samples, bits = _check_image(ds, label, limits, warnings)

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
        arr = _decoded_pixels(ds, rows, cols, frames, samples, label, raw, warnings)

    photometric = str(_get(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples == 3 or photometric == "PALETTE COLOR":
        photometric = "MONOCHROME2"  # converted to luminance above
    signed = _int(_get(ds, "PixelRepresentation"), 0) == 1
    stored = _int(_get(ds, "BitsStored"), bits) or bits
    out = []
    padding = _floats(_get(ds, "PixelPaddingValue"), 1)
    for f in range(frames):
        slope, intercept, lut_item = _modality_lut(ds, f, label)
        stored_f = arr[f] if lut_item is None and arr.dtype.kind in "iu" else None
        if lut_item is not None:
            hu = _apply_lut_item(arr[f], lut_item, label)
        elif stored_f is not None and not with_hu:
            hu = np.broadcast_to(np.float32(np.nan), stored_f.shape)
        else:
            hu = _rescale(arr[f], slope, intercept)
        geo = _geometry(ds, f, label, warnings if f == 0 else None)
        out.append(
            DecodedSlice(
                hu=hu,
                stored=stored_f,
                hu_deferred=stored_f is not None and not with_hu,
                source=label,
                photometric=photometric,
                instance_number=_int(_get(ds, "InstanceNumber")),
                frame_index=f,
                rescale_slope=slope,
                rescale_intercept=intercept,
                signed=signed,
                bits_stored=stored,
                pixel_padding_value=None if padding is None or lut_item is not None else padding[0] * slope + intercept,
                warnings=list(warnings),
                **ident,
                **geo,
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
