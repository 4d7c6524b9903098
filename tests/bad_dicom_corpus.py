"""A corpus of malformed and hostile DICOM requests, built in code (no committed binaries).

Each ``BadCase`` is one *request*: a list of Part-10 byte items (what a client puts in the
``dicom`` tensor) and the substring the refusal reason must contain. ``source`` is what the
message must name: the SOPInstanceUID the case was built with, ``item N`` for bytes that cannot
be parsed far enough to carry a UID, or ``request`` for whole-request refusals.

Cases that need tighter ``Limits`` than the defaults (so that they stay small on the wire) carry
them in ``limits``; the Triton test serves them from a repository configured with exactly those
limits (``limit_*`` parameters of the ``preprocess`` model).

Used by tests/test_reliability_bad_input.py and scripts/make_bad_corpus.py. Importable as a plain
module from tests/ (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pydicom
from dicom_factory import make_slice, series_bytes
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from preprocess_backend.types import Limits

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"  # fixed UIDs: a failing case is easy to find again

# Small limits for the cases that probe them: the request stays a few MB on the wire while the
# refusal path is exactly the one a 2 GB request would take (checked on headers, before decoding).
SMALL_LIMITS = Limits(
    max_request_bytes=4 * 1024 * 1024, max_slices=64, max_pixels_per_slice=1024 * 1024, max_frames=16
)


@dataclass
class BadCase:
    name: str
    items: list[bytes]
    expect: str  # substring of the refusal reason
    source: str  # the file / item / request the message must name
    description: str = ""
    limits: Limits | None = None  # None: the default Limits
    tags: list[str] = field(default_factory=list)
    window: str | None = None  # a per-request ``window`` input sent with the items (None: not sent)


def uid(n: int) -> str:
    return f"{UID_ROOT}.{n}"


def _hu(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 400, (size, size)).astype(np.float32)


def good_item(n: int, size: int = 32, **kwargs: object) -> bytes:
    return make_slice(_hu(size, n), sop_uid=uid(n), **kwargs)  # type: ignore[arg-type]


def _mutate(item: bytes, edit: Callable[[Dataset], None], *, keep_meta: bool = True) -> bytes:
    """Read a valid item, edit its dataset, write it back as Part-10 (pydicom does not validate values)."""
    ds = pydicom.dcmread(io.BytesIO(item))
    edit(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=keep_meta)
    return buf.getvalue()


def _with_transfer_syntax(n: int, syntax: str, pixel_data: bytes, encapsulated: bool = True) -> bytes:
    """A CT slice whose meta says ``syntax`` while PixelData holds ``pixel_data`` (garbage)."""
    ds = pydicom.dcmread(io.BytesIO(good_item(n)))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([pixel_data]) if encapsulated else pixel_data
    # Encapsulated pixel data must be written with undefined length; pydicom does so when it is told
    # the data is compressed. The dataset body stays explicit VR little endian (true of every syntax here).
    ds["PixelData"].is_undefined_length = encapsulated
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _raw_element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element, written by hand (pydicom would refuse some of these)."""
    head = struct.pack("<HH", *tag) + vr
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
        return head + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _splice_before_pixels(item: bytes, extra: bytes) -> bytes:
    """Insert raw element bytes just before the PixelData element (tags stay ascending if extra < 7FE0)."""
    at = item.rfind(b"\xe0\x7f\x10\x00")
    assert at > 0, "no PixelData tag"
    return item[:at] + extra + item[at:]


def _not_part10_dataset() -> bytes:
    """A raw dataset without preamble / meta (what some PACS exports write)."""
    item = good_item(90)
    # Drop preamble, 'DICM' and the (0002,xxxx) meta group: keep from the first (0008,xxxx) element.
    return item[item.index(b"\x08\x00", 132) :]


def _deflate_garbage(n: int) -> bytes:
    """A real deflated file (meta says Deflated) whose body is then replaced by non-deflate bytes."""
    item = _mutate(
        good_item(n), lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", DeflatedExplicitVRLittleEndian)
    )
    # (0002,0000) FileMetaInformationGroupLength is the first element after 'DICM': 4 tag, 2 VR, 2 len, 4 value.
    (meta_len,) = struct.unpack("<I", item[140:144])
    body = 144 + meta_len
    return item[:body] + bytes(range(7, 250)) * 4


def _sr_document() -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    meta.MediaStorageSOPInstanceUID = uid(40)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = uid(40)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.ValueType = "CONTAINER"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _multi_frame(n: int, frames: int, rows: int, cols: int, pixel_bytes: int = 64) -> bytes:
    """Header claims ``frames`` x ``rows`` x ``cols`` while PixelData is tiny (a memory bomb header)."""

    def edit(ds: Dataset) -> None:
        ds.Rows, ds.Columns = rows, cols
        ds.NumberOfFrames = frames
        ds.PixelData = b"\0" * pixel_bytes

    return _mutate(good_item(n), edit)


def _set(**values: object) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        for key, value in values.items():
            setattr(ds, key, value)

    return edit


def _delete(*names: str) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        for name in names:
            delattr(ds, name)

    return edit


def _series(n0: int, z: int = 3, size: int = 32, **kwargs: object) -> list[bytes]:
    vol = np.stack([_hu(size, n0 + i) for i in range(z)])
    items = series_bytes(vol, **kwargs)  # type: ignore[arg-type]
    # Give every slice a fixed SOPInstanceUID so a message can be matched to it.
    return [_mutate(it, _set(SOPInstanceUID=uid(n0 + i))) for i, it in enumerate(items)]


def _deflated(dataset_body: bytes | None, zeros: int, n: int) -> bytes:
    """A Deflated Explicit VR LE file: a good item's data set (or ``dataset_body``) then ``zeros``
    zero bytes, deflated in 1 MB steps (the bomb never exists inflated on this side)."""
    item = good_item(n)
    (meta_len,) = struct.unpack("<I", item[140:144])
    body_at = 144 + meta_len
    head = _mutate(item, lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", DeflatedExplicitVRLittleEndian))
    (new_meta_len,) = struct.unpack("<I", head[140:144])
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(dataset_body if dataset_body is not None else item[body_at:])]
    chunk = b"\0" * (1 << 20)
    for _ in range(zeros >> 20):
        parts.append(deflater.compress(chunk))
    parts.append(deflater.flush())
    return head[: 144 + new_meta_len] + b"".join(parts)


def _empty_elements(n: int, count: int) -> bytes:
    """A good item followed by ``count`` empty private elements (8 bytes each; pydicom ~2.4 us each)."""
    return good_item(n) + struct.pack("<HH", 0x7FE1, 0x0010) + b"LO\0\0" + b"\x09\x00\x10\x00LO\0\0" * count


def _sequence_flood(n: int, items: int) -> bytes:
    """A private SQ of undefined length holding ``items`` empty items, spliced before PixelData."""
    body = b"\xfe\xff\x00\xe0\0\0\0\0" * items + b"\xfe\xff\xdd\xe0\0\0\0\0"
    sq = struct.pack("<HH", 0x0029, 0x1010) + b"SQ\0\0" + b"\xff\xff\xff\xff" + body
    creator = struct.pack("<HH", 0x0029, 0x0010) + b"LO" + struct.pack("<H", 4) + b"FLOD"
    return _splice_before_pixels(good_item(n), creator + sq)


def _per_frame_mismatch(n: int) -> bytes:
    def edit(ds: Dataset) -> None:
        ds.NumberOfFrames = 2
        ds.PixelData = b"\0" * (2 * 32 * 32 * 2)
        ds.PerFrameFunctionalGroupsSequence = [Dataset() for _ in range(3)]

    return _mutate(good_item(n), edit)


def _raw_value(n: int, keyword: str, vr: bytes, text: bytes) -> bytes:
    """A good item whose ``keyword`` element is rewritten with raw ``text`` (values pydicom would not write)."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    assert tag is not None
    item = _mutate(good_item(n), _delete(keyword)) if keyword in pydicom.dcmread(io.BytesIO(good_item(n))) else good_item(n)
    element = _raw_element((tag >> 16, tag & 0xFFFF), vr, text + (b" " if len(text) % 2 else b""))
    return _splice_sorted(item, element, tag)


def _splice_sorted(item: bytes, element: bytes, tag: int) -> bytes:
    """Insert a raw element where its tag belongs in ascending order (scan of the top-level elements)."""
    ds = pydicom.dcmread(io.BytesIO(item))
    later = sorted(int(e.tag) for e in ds if e.tag > tag)
    key = struct.pack("<HH", later[0] >> 16, later[0] & 0xFFFF)
    # the first occurrence after the file meta of the next tag's bytes is that element (tags ascend)
    (meta_len,) = struct.unpack("<I", item[140:144])
    at = item.index(key, 144 + meta_len)
    return item[:at] + element + item[at:]


def contract_and_header_cases() -> list[BadCase]:
    """Issue 17: what the model cannot read (the contract) and header values that are impossible."""
    cases: list[BadCase] = []

    def add(name: str, items: list[bytes], expect: str, source: str, description: str, **kw: object) -> None:
        cases.append(BadCase(name, items, expect, source, description, tags=["issue17"], **kw))  # type: ignore[arg-type]

    # --- the model contract: CT, greyscale, acquired, lung-window, 0.4-1.2 mm pixels, axial ----------
    add("mr_slice", [good_item(101, modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4")],
        "modality 'MR' refused", uid(101), "an MR slice")
    add("radiograph_dx", [good_item(102, modality="DX", sop_class="1.2.840.10008.5.1.4.1.1.1.1", position=None,
                                    orientation=None, photometric="MONOCHROME1")],
        "modality 'DX' refused", uid(102), "a digital radiograph (the README used to offer one)")
    add("no_modality", [_mutate(good_item(103), _delete("Modality"))], "modality '<none>' refused", uid(103),
        "no Modality at all")
    add("secondary_capture_labelled_ct", [good_item(104, sop_class=SECONDARY_CAPTURE)],
        "SOP class 'Secondary Capture Image Storage' refused", uid(104), "a screenshot labelled CT")
    add("colour_rgb_ct", [_mutate(good_item(105), _set(SamplesPerPixel=3, PhotometricInterpretation="RGB",
                                                        BitsAllocated=8, BitsStored=8, HighBit=7,
                                                        PlanarConfiguration=0, PixelData=b"\0" * (32 * 32 * 3)))],
        "colour image (RGB, 3 samples) refused", uid(105), "an RGB image with Modality CT")
    add("palette_colour_ct", [_mutate(good_item(106), _set(PhotometricInterpretation="PALETTE COLOR"))],
        "colour image (PALETTE COLOR", uid(106), "a palette-colour image with Modality CT")
    add("pixel_spacing_4mm", [good_item(107, spacing=(4.17, 4.17))], "outside the model's 0.4-1.2 mm", uid(107),
        "4.17 mm pixels (a 64 x 64 downsampled chest)")
    add("pixel_spacing_0_1mm", [good_item(108, spacing=(0.1, 0.1))], "outside the model's 0.4-1.2 mm", uid(108),
        "0.1 mm pixels (a micro-CT)")
    add("no_pixel_spacing", [good_item(109, spacing=None)], "no PixelSpacing", uid(109), "CT without PixelSpacing")
    add("thick_slices_10mm", [good_item(110, slice_thickness=10.0)], "slice thickness 10 mm above", uid(110),
        "10 mm slices")
    add("sagittal_reformat", [good_item(111, orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))], "not an axial slice",
        uid(111), "a sagittal reformat")
    add("window_mediastinum", [good_item(112)], "window 'mediastinum' refused", "window",
        "a per-request window the model was not trained on", window="mediastinum")
    add("window_file", [good_item(113)], "window 'file' refused", "window", "the file's own window", window="file")
    add("window_custom_soft_tissue", [good_item(114)], "window '40,400' refused", "window", "a custom window",
        window="40,400")
    # --- impossible header values ---------------------------------------------------------------
    add("spacing_zero", [good_item(120, spacing=(0.0, 0.0))], "PixelSpacing 0.0\\0.0 mm is impossible", uid(120),
        "PixelSpacing 0 (mm sizes would be 0)")
    add("spacing_negative", [good_item(121, spacing=(-0.7, 0.7))], "mm is impossible", uid(121), "PixelSpacing < 0")
    add("spacing_nan", [_raw_value(122, "PixelSpacing", b"DS", b"nan\\nan")], "is not 2 finite numbers", uid(122),
        "PixelSpacing NaN")
    add("spacing_one_value", [_raw_value(123, "PixelSpacing", b"DS", b"0.7")], "is not 2 finite numbers", uid(123),
        "PixelSpacing with one value")
    add("orientation_not_unit", [good_item(124, orientation=(2.0, 0.0, 0.0, 0.0, 2.0, 0.0))],
        "not two orthogonal unit vectors", uid(124), "direction cosines of length 2")
    add("orientation_not_orthogonal", [good_item(125, orientation=(1.0, 0.0, 0.0, 0.7071, 0.7071, 0.0))],
        "not two orthogonal unit vectors", uid(125), "row and column 45 deg apart")
    add("orientation_zero", [good_item(126, orientation=(0.0,) * 6)], "not two orthogonal unit vectors", uid(126),
        "all-zero orientation")
    add("position_nan", [_raw_value(127, "ImagePositionPatient", b"DS", b"nan\\0\\0")], "is not 3 finite numbers",
        uid(127), "ImagePositionPatient NaN")
    add("position_1e9", [good_item(128, position=(0.0, 0.0, 1e9))], "ImagePositionPatient", uid(128),
        "a position 1000 km away")
    add("slope_nan", [_raw_value(129, "RescaleSlope", b"DS", b"nan")], "RescaleSlope 'nan' is not 1 finite number",
        uid(129), "RescaleSlope NaN (HU would be NaN)")
    add("slope_1e30", [_raw_value(130, "RescaleSlope", b"DS", b"1e30")], "RescaleSlope 1e+30 is implausible",
        uid(130), "RescaleSlope 1e30")
    add("slope_zero", [_raw_value(131, "RescaleSlope", b"DS", b"0")], "RescaleSlope 0 is implausible", uid(131),
        "RescaleSlope 0 (every pixel the same HU)")
    add("intercept_inf", [_raw_value(132, "RescaleIntercept", b"DS", b"inf")], "RescaleIntercept 'inf'", uid(132),
        "RescaleIntercept infinite")
    add("intercept_1e12", [_raw_value(133, "RescaleIntercept", b"DS", b"1e12")], "RescaleIntercept 1e+12 is implausible",
        uid(133), "RescaleIntercept 1e12")
    add("window_width_zero", [good_item(134, window=(-600.0, 0.0))], "WindowWidth '0.0' impossible", uid(134),
        "WindowWidth 0")
    add("window_width_negative", [good_item(135, window=(-600.0, -1500.0))], "WindowWidth '-1500.0' impossible",
        uid(135), "WindowWidth < 0")
    add("window_center_nan", [_raw_value(136, "WindowCenter", b"DS", b"nan")], "WindowCenter 'nan' impossible",
        uid(136), "WindowCenter NaN")
    add("bits_stored_17_of_16", [_mutate(good_item(137), _set(BitsStored=17, HighBit=16))],
        "BitsStored 17 impossible with BitsAllocated 16", uid(137), "BitsStored > BitsAllocated")
    add("bits_stored_zero", [_mutate(good_item(138), _set(BitsStored=0))], "BitsStored 0 impossible", uid(138),
        "BitsStored 0")
    add("high_bit_inconsistent", [_mutate(good_item(139), _set(BitsStored=12, HighBit=7))],
        "HighBit 7 inconsistent with BitsStored 12", uid(139), "HighBit not BitsStored - 1")
    add("photometric_unknown", [_mutate(good_item(140), _set(PhotometricInterpretation="MONOCHROME3"))],
        "unknown PhotometricInterpretation 'MONOCHROME3'", uid(140), "a photometric nobody defines")
    add("photometric_retired_hsv", [_mutate(good_item(141), _set(PhotometricInterpretation="HSV"))],
        "unknown PhotometricInterpretation 'HSV'", uid(141), "a retired photometric")
    add("pixel_representation_2", [_mutate(good_item(142), _set(PixelRepresentation=2))],
        "PixelRepresentation 2 (must be 0 or 1)", uid(142), "PixelRepresentation 2")
    add("per_frame_groups_mismatch", [_per_frame_mismatch(143)],
        "PerFrameFunctionalGroupsSequence has 3 items for NumberOfFrames 2", uid(143), "frame count disagrees")
    # --- work bounded before it is done ---------------------------------------------------------
    # inflating (~0.3 s) and then parsing 25 M empty elements: whichever passes the time bound first refuses
    add("deflate_bomb_200mb", [_deflated(None, 200 << 20, 150)], "time bound", "item 0",
        "200 KB deflated -> 200 MB of empty elements (held an instance 85 s before)")
    add("deflate_bomb_400mb", [_deflated(None, 400 << 20, 151)], "deflated data set", "item 0",
        "deflated data set inflating past the 256 MiB bound")
    add("empty_element_flood", [_empty_elements(152, 1 << 20)], "header parsing exceeded", "item 0",
        "8 MB of empty elements after PixelData (uncompressed)")
    add("sequence_item_flood", [_sequence_flood(153, 400_000)], "header parsing exceeded", "item 0",
        "one private sequence of 400 000 empty items")
    add("compressed_too_large", [_mutate(_with_transfer_syntax(154, JPEG2000Lossless, bytes(range(256)) * 4),
                                         _set(Rows=512, Columns=512, NumberOfFrames=40), keep_meta=True)],
        "compressed pixel data would decode to", uid(154), "40 compressed 512 x 512 frames (~3 s to decode)")
    add("jpeg_extended_garbage", [_with_transfer_syntax(155, JPEGExtended12Bit, bytes(range(256)) * 4)],
        "cannot decode pixel data", uid(155), "12-bit JPEG Extended syntax, garbage fragment (dcmdjpeg fails too)")
    return cases


def build_cases() -> list[BadCase]:
    """Every case, freshly built (a few seconds; items are 32 x 32 unless the case needs otherwise)."""
    good = good_item(1)
    cases: list[BadCase] = []

    def add(name: str, items: list[bytes], expect: str, source: str, description: str, **kw: object) -> None:
        cases.append(BadCase(name, items, expect, source, description, **kw))  # type: ignore[arg-type]

    # --- not DICOM at all -----------------------------------------------------------------------
    add("zero_byte_item", [b""], "not a DICOM Part-10 file", "item 0", "an empty element in the dicom tensor")
    add(
        "text_not_dicom",
        [b"hello, this is not an image\n" * 10],
        "not a DICOM Part-10 file",
        "item 0",
        "plain text",
    )
    add(
        "path_not_opened",
        [b"/etc/passwd"],
        "not a DICOM Part-10 file",
        "item 0",
        "a path string: the server must never open files named by the client",
    )
    add(
        "png_not_dicom",
        [b"\x89PNG\r\n\x1a\n" + b"\0" * 200],
        "not a DICOM Part-10 file",
        "item 0",
        "a PNG header",
    )
    add(
        "raw_dataset_no_preamble",
        [_not_part10_dataset()],
        "not a DICOM Part-10 file",
        "item 0",
        "a dataset without the 128-byte preamble and 'DICM'",
    )
    add(
        "preamble_only", [b"\0" * 128 + b"DICM"], "no PixelData", "item 0", "preamble and magic, nothing else"
    )
    # --- truncated ------------------------------------------------------------------------------
    add("truncated_in_meta", [good[:200]], "no PixelData", "item 0", "cut inside the file meta group")
    add(
        "truncated_in_dataset",
        [good[:600]],
        "no PixelData",
        uid(1),
        "cut inside the dataset, before PixelData",
    )
    add(
        "truncated_in_pixels",
        [good[: len(good) - 700]],
        "truncated PixelData",
        uid(1),
        "cut inside PixelData: its declared length runs past the end of the file",
    )
    add(
        "truncated_second_item",
        [good_item(2), good_item(3)[:-100]],
        "truncated PixelData",
        uid(3),
        "a good first slice, the second cut short: the message names the second",
    )
    # --- header lies about the pixels -----------------------------------------------------------
    add("missing_pixel_data", [_mutate(good, _delete("PixelData"))], "no PixelData", uid(1), "header only")
    add(
        "pixel_data_short",
        [_mutate(good_item(4), _set(PixelData=b"\0" * 100))],
        "truncated PixelData",
        uid(4),
        "32 x 32 x 2 bytes claimed, 100 bytes present",
    )
    add(
        "pixel_data_empty",
        [_mutate(good_item(5), _set(PixelData=b""))],
        "cannot read pixel data",
        uid(5),
        "PixelData present with length 0",
    )
    add("rows_zero", [_mutate(good_item(6), _set(Rows=0))], "bad image size", uid(6), "Rows = 0")
    add(
        "columns_missing", [_mutate(good_item(7), _delete("Columns"))], "bad image size", uid(7), "no Columns"
    )
    add(
        "frames_zero",
        [_mutate(good_item(8), _set(NumberOfFrames=0))],
        "bad NumberOfFrames",
        uid(8),
        "NumberOfFrames = 0",
    )
    add(
        "bits_allocated_12",
        [_mutate(good_item(9), _set(BitsAllocated=12))],
        "unsupported BitsAllocated",
        uid(9),
        "BitsAllocated 12 (only 1, 8, 16, 32 exist)",
    )
    add(
        "bits_allocated_zero",
        [_mutate(good_item(10), _set(BitsAllocated=0))],
        "unsupported BitsAllocated",
        uid(10),
        "BitsAllocated 0",
    )
    add(
        "samples_per_pixel_2",
        [_mutate(good_item(11), _set(SamplesPerPixel=2))],
        "unsupported SamplesPerPixel",
        uid(11),
        "SamplesPerPixel 2",
    )
    add(
        "rgb_grey_sized_pixels",
        [
            _mutate(
                good_item(12),
                _set(
                    SamplesPerPixel=3,
                    PhotometricInterpretation="RGB",
                    BitsAllocated=8,
                    BitsStored=8,
                    HighBit=7,
                    PlanarConfiguration=0,
                    PixelData=b"\0" * (32 * 32),
                ),
            )
        ],
        "colour image (RGB, 3 samples) refused",
        uid(12),
        "RGB where grey is expected, pixel data sized for one grey channel (the contract refuses colour first)",
    )
    add(
        "float_pixel_data",
        [
            _mutate(
                good_item(13),
                lambda ds: (delattr(ds, "PixelData"), setattr(ds, "FloatPixelData", b"\0" * 4096)),
            )
        ],
        "FloatPixelData is not supported",
        uid(13),
        "parametric-map style float pixels",
    )
    # --- wrong VRs (values that do not parse as their VR says) ----------------------------------
    rows_text = _raw_element((0x0028, 0x0010), b"LO", b"many")
    wrong_rows = _mutate(good_item(14), _delete("Rows"))
    add(
        "rows_wrong_vr_text",
        [_splice_before_pixels(wrong_rows, rows_text)],
        "bad image size",
        uid(14),
        "Rows written as LO 'many' instead of US",
    )
    bits_text = _raw_element((0x0028, 0x0100), b"DS", b"sixteen ")
    wrong_bits = _mutate(good_item(15), _delete("BitsAllocated"))
    add(
        "bits_wrong_vr_text",
        [_splice_before_pixels(wrong_bits, bits_text)],
        "unsupported BitsAllocated",
        uid(15),
        "BitsAllocated written as DS 'sixteen'",
    )
    add(
        "element_length_overflow",
        [
            good_item(16)[: -(32 * 32 * 2 + 12)]
            + struct.pack("<HH", 0x7FE0, 0x0010)
            + b"OW\0\0"
            + struct.pack("<I", 0x7FFFFFF0)
            + b"\0" * 64
        ],
        "truncated PixelData",
        uid(16),
        "PixelData length field claims 2 GB, 64 bytes follow",
    )
    # --- headers that claim gigabytes (refused before any allocation) ---------------------------
    add(
        "huge_rows_columns",
        [_multi_frame(20, 1, 65535, 65535)],
        "pixels per slice",
        uid(20),
        "65535 x 65535 = 4.3 G pixels claimed",
    )
    add(
        "huge_number_of_frames",
        [_multi_frame(21, 1_000_000, 32, 32)],
        "frames, limit",
        uid(21),
        "a million frames claimed",
    )
    add(
        "gigabytes_decoded",
        [_multi_frame(22, 2000, 8192, 8192)],
        "would decode to",
        uid(22),
        "2000 frames of 8192 x 8192: 268 GB decoded",
    )
    # --- compressed frames that are not what their transfer syntax says -------------------------
    garbage = bytes(range(256)) * 4
    add(
        "jpeg_baseline_garbage",
        [_with_transfer_syntax(23, JPEGBaseline8Bit, garbage)],
        "cannot decode pixel data",
        uid(23),
        "JPEG Baseline syntax, fragment is not a JPEG stream",
    )
    add(
        "jpeg2000_garbage",
        [_with_transfer_syntax(24, JPEG2000Lossless, garbage)],
        "cannot decode pixel data",
        uid(24),
        "JPEG 2000 syntax, fragment is not a J2K codestream",
    )
    add(
        "jpegls_garbage",
        [_with_transfer_syntax(25, JPEGLSLossless, garbage)],
        "cannot decode pixel data",
        uid(25),
        "JPEG-LS syntax, garbage fragment",
    )
    add(
        "rle_garbage",
        [_with_transfer_syntax(26, RLELossless, b"\x05\0\0\0" + garbage[:60])],
        "cannot decode pixel data",
        uid(26),
        "RLE syntax, header claims 5 segments that are not there",
    )
    # RLE's UID pads to the same 20 bytes as explicit VR little endian's: patch the meta in place, so the
    # native (not encapsulated) pixels stay as written while the file claims RLE.
    native = good_item(27)
    add(
        "rle_syntax_native_pixels",
        [native.replace(b"1.2.840.10008.1.2.1\0", RLELossless.encode() + b"\0", 1)],
        "cannot decode pixel data",
        uid(27),
        "RLE syntax but PixelData is native (not encapsulated)",
    )
    add(
        "unknown_transfer_syntax",
        [_mutate(good_item(28), lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.3.4.5.6"))],
        "unsupported transfer syntax",
        uid(28),
        "a transfer syntax UID nobody defines",
    )
    add(
        "deflate_garbage",
        [_deflate_garbage(29)],
        "unreadable DICOM",
        "item 0",
        "Deflated syntax, but the body after the meta group is not a deflate stream",
    )
    # --- not an image / wrong request shape -----------------------------------------------------
    add("sr_document", [_sr_document()], "non-image SOP class", uid(40), "a Basic Text SR sent as an image")
    mixed = [good_item(41, series_uid=uid(1041)), good_item(42, series_uid=uid(1042))]
    add("mixed_series", mixed, "mixed series in one request", uid(41), "two series in one request")
    same_uid = uid(1050)
    sizes = _series(50, z=2, series_uid=same_uid) + _series(52, z=1, size=64, series_uid=same_uid, z0=10.0)
    add(
        "different_slice_sizes", sizes, "different sizes", uid(50), "32 x 32 and 64 x 64 slices in one series"
    )
    no_geometry = [_mutate(it, _delete("ImagePositionPatient")) for it in _series(60, z=3)]
    add(
        "series_without_positions",
        no_geometry,
        "missing ImagePositionPatient",
        uid(60),
        "3 slices, none with a position",
    )
    add("empty_request", [], "no DICOM items", "request", "a dicom tensor with zero elements")
    # --- limits (small limits keep the request small; the same checks guard the defaults) -------
    add(
        "too_many_slices",
        [b"x"] * 65,
        "items, limit 64 slices",
        "request",
        "65 items against max_slices 64",
        limits=SMALL_LIMITS,
    )
    add(
        "too_many_bytes",
        [b"\0" * (2 * 1024 * 1024 + 1)] * 2,
        "bytes, limit",
        "request",
        "4 MB + 2 bytes against max_request_bytes 4 MB",
        limits=SMALL_LIMITS,
    )
    add(
        "item_too_many_frames",
        [_multi_frame(70, 17, 32, 32, pixel_bytes=17 * 32 * 32 * 2)],
        "frames, limit 16",
        uid(70),
        "17 frames against max_frames 16",
        limits=SMALL_LIMITS,
    )
    add(
        "slice_too_many_pixels",
        [good_item(71, size=1025)],
        "pixels per slice",
        uid(71),
        "1025 x 1025 against max_pixels_per_slice 1024 x 1024",
        limits=SMALL_LIMITS,
    )
    return cases + contract_and_header_cases()


def good_series(z: int = 4, size: int = 256, seed: int = 7) -> list[bytes]:
    """A valid CT series (the request that must keep its answer while bad ones arrive). 256 x 256 at
    0.7 mm: a 180 mm field of view, so a detector that reads physical pixels still finds its 22 mm
    nodule (a 128 matrix is a 90 mm toy chest that only a letterboxing detector magnified)."""
    from dicom_factory import Nodule, chest_phantom, phantom_series

    phantom = chest_phantom(
        z=z, size=size, seed=seed, nodules=[Nodule((z / 2, size * 0.4, size * 0.3), size / 16)]
    )
    return phantom_series(phantom, shuffle_seed=seed)


@dataclass
class ToleratedCase:
    """Odd but valid input: served, and its answer must equal the answer to ``reference``."""

    name: str
    items: list[bytes]
    reference: list[bytes]
    description: str = ""
    window: str | None = None  # a per-request ``window`` input (None: not sent)


def tolerated_cases(series: list[bytes] | None = None) -> list[ToleratedCase]:
    """Duplicates and odd order: nothing refused, no slice lost or counted twice.

    The pipeline drops a repeated SOPInstanceUID (``SeriesReport.repeated_instances``) and orders by
    position, so each of these must answer exactly like the clean series.
    """
    good = series if series is not None else good_series()
    return [
        ToleratedCase("duplicate_slice", [*good, good[1]], good, "one slice sent twice in the same request"),
        ToleratedCase("every_slice_twice", good + good, good, "the whole series repeated in one request"),
        ToleratedCase("reversed_order", good[::-1], good, "slices in reverse order (order is by position)"),
    ]


def _each(series: list[bytes], edit: Callable[[Dataset], None]) -> list[bytes]:
    return [_mutate(item, edit) for item in series]


def _signed(ds: Dataset) -> None:
    """Same HU as signed stored values with intercept 0 (PixelRepresentation 1)."""
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.PixelData = hu.astype("<i2").tobytes()


def _syntax(syntax: str) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        if syntax in (RLELossless, JPEG2000Lossless, JPEGLSLossless):
            ds.compress(syntax, generate_instance_uid=False)  # same instance, re-encoded
        else:
            ds.file_meta.TransferSyntaxUID = syntax

    return edit


def _tilt(degrees: float) -> Callable[[Dataset], None]:
    """Gantry tilt about the patient x axis (positions unchanged: the scanner's own convention)."""
    t = np.radians(degrees)

    def edit(ds: Dataset) -> None:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t))]

    return edit


def accepted_variants(series: list[bytes]) -> list[ToleratedCase]:
    """Issue 17: what the standard allows (odd but legal) and what real archives need (leniency).

    Every variant carries exactly the pixels and order of ``series``, so the server's answer must
    equal the answer to ``series`` itself: nothing refused, nothing changed by the leniency.
    """
    from pydicom.uid import ImplicitVRLittleEndian

    def empty(*names: str) -> Callable[[Dataset], None]:
        return _set(**{n: "" for n in names})

    cases = [
        ("signed_pixels", _signed, "PixelRepresentation 1, intercept 0 (same HU)"),
        ("implicit_vr", _syntax(ImplicitVRLittleEndian), "Implicit VR Little Endian"),
        ("deflated", _syntax(DeflatedExplicitVRLittleEndian), "Deflated Explicit VR Little Endian"),
        ("rle_lossless", _syntax(RLELossless), "RLE Lossless"),
        ("jpeg2000_lossless", _syntax(JPEG2000Lossless), "JPEG 2000 Lossless"),
        ("jpegls_lossless", _syntax(JPEGLSLossless), "JPEG-LS Lossless"),
        ("empty_sop_instance_uid", empty("SOPInstanceUID"), "empty SOPInstanceUID, the file meta carries it"),
        ("empty_series_instance_uid", empty("SeriesInstanceUID"), "empty SeriesInstanceUID: derived series key"),
        ("empty_sop_and_series_uids", empty("SOPInstanceUID", "SeriesInstanceUID"), "both empty (TotalSegmentator)"),
        ("no_photometric", _delete("PhotometricInterpretation"), "PhotometricInterpretation missing"),
        ("slice_thickness_zero", _set(SliceThickness=0), "SliceThickness 0 (converted data)"),
        ("spacing_below_thickness", _set(SliceThickness=3.0), "3 mm slices every 1.25 mm (overlapping)"),
        ("gantry_tilt_15deg", _tilt(15.0), "15 deg gantry tilt"),
        ("pixel_padding_value", lambda ds: ds.add_new(0x00280120, "US", 0), "PixelPaddingValue (CT outside the FOV)"),
        ("window_tags_absent", _delete("WindowCenter", "WindowWidth"), "no window in the file"),
    ]
    out = [ToleratedCase(name, _each(series, edit), series, description) for name, edit, description in cases]
    out.append(ToleratedCase("window_lung_by_name", list(series), series, "window input 'lung'", window="lung"))
    out.append(ToleratedCase("window_lung_by_values", list(series), series, "window input '-600,1500'",
                             window="-600,1500"))
    return out


def time_cases(repeats: int = 3) -> list[tuple[str, int, float, str]]:
    """(name, items, best-of-``repeats`` seconds, outcome) of the server's preprocessing of every
    hostile case and every pydicom bundled file, in this process: ``preprocess_slab`` under the
    served model's contract is exactly what a preprocess instance runs for one request."""
    import os
    import time
    import warnings

    from pydicom.data import get_testdata_file

    from preprocess_backend.contract import ModelContract
    from preprocess_backend.errors import DicomInputError
    from preprocess_backend.pipeline import preprocess_slab
    from preprocess_backend.types import Options

    contract = ModelContract()
    requests = [(c.name, c.items, c.limits, c.window) for c in build_cases()]
    folder = os.path.dirname(get_testdata_file("CT_small.dcm"))
    for root, _, names in os.walk(folder):
        for name in sorted(n for n in names if n.endswith(".dcm")):
            with open(os.path.join(root, name), "rb") as f:
                requests.append((f"pydicom/{name}", [f.read()], None, None))
    rows = []
    for name, items, limits, window in requests:
        best, outcome = float("inf"), ""
        for _ in range(repeats):
            started = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if window is not None:
                        contract.check_window(window)
                    preprocess_slab(items, Options(limits=limits or Limits()), contract=contract)
                outcome = "answered"
            except DicomInputError as exc:
                outcome = exc.reason[:70]
            best = min(best, time.perf_counter() - started)
        rows.append((name, len(items), best, outcome))
    return rows


if __name__ == "__main__":  # a listing, or with --time the per-request preprocessing times
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="List the bad-DICOM corpus, or time its preprocessing.")
    parser.add_argument("--time", action="store_true", help="time every case and pydicom file (best of 3)")
    if parser.parse_args().time:
        timed = sorted(time_cases(), key=lambda r: -r[2])
        for name, n, seconds, outcome in timed[:12]:
            print(f"{name:40s} {n:3d} items {seconds * 1000:8.1f} ms  {outcome}")
        print(f"{len(timed)} requests; longest {timed[0][0]}: {timed[0][2]:.2f} s; "
              f"median {sorted(r[2] for r in timed)[len(timed) // 2] * 1000:.1f} ms")
        sys.exit(0)
    for case in build_cases():
        print(f"{case.name:28s} {len(case.items):3d} items  expect {case.expect!r}")
    for tolerated in tolerated_cases():
        print(f"{tolerated.name:28s} {len(tolerated.items):3d} items  tolerated")
