"""decode_slice / read_header on pydicom's real test files and on synthetic CT."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from dicom_factory import DX_STORAGE, make_slice
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from preprocess_backend.dicom_io import decode_frames, decode_slice, read_header
from preprocess_backend.errors import DicomInputError, LimitExceeded
from preprocess_backend.types import Limits

MR_VARIANTS = [
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_expb.dcm",
]


def _reference(path: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float32)


def test_ct_small_is_hu_with_geometry() -> None:
    path = get_testdata_file("CT_small.dcm")
    s = decode_slice(path)
    ds = pydicom.dcmread(path)
    assert s.hu.dtype == np.float32 and s.hu.shape == (128, 128)
    np.testing.assert_array_equal(s.hu, _reference(path))
    assert s.modality == "CT" and s.is_ct
    assert s.sop_instance_uid == ds.SOPInstanceUID and s.series_instance_uid == ds.SeriesInstanceUID
    assert s.pixel_spacing == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
    assert s.position == pytest.approx(tuple(float(v) for v in ds.ImagePositionPatient))
    assert s.orientation == pytest.approx(tuple(float(v) for v in ds.ImageOrientationPatient))
    assert -1100 < s.hu.min() < -800  # air / lung in HU, not raw stored values


@pytest.mark.parametrize("name", MR_VARIANTS)
def test_mr_variants_decode_identically(name: str) -> None:
    ref = decode_slice(get_testdata_file("MR_small.dcm")).hu
    s = decode_slice(get_testdata_file(name))
    np.testing.assert_array_equal(s.hu, ref)
    assert s.window_centers == (600.0,) and s.window_widths == (1600.0,)


@pytest.mark.parametrize(
    "name",
    ["JPGExtended.dcm", "JPEG2000.dcm", "693_J2KI.dcm", "image_dfl.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm",
     "JPEGLSNearLossless_16.dcm", "examples_palette.dcm", "examples_ybr_color.dcm"],
)
def test_compressed_and_colour_files_decode(name: str) -> None:
    frames = decode_frames(get_testdata_file(name))
    ds = pydicom.dcmread(get_testdata_file(name))
    assert frames and all(f.hu.dtype == np.float32 for f in frames)
    assert frames[0].hu.shape == (ds.Rows, ds.Columns)
    assert np.isfinite(frames[0].hu).all() and frames[0].hu.std() > 0
    if ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation.startswith("MONO"):
        np.testing.assert_allclose(frames[0].hu, _reference(get_testdata_file(name)).reshape(-1, ds.Rows, ds.Columns)[0])


def test_multi_window_values_and_read_header() -> None:
    path = get_testdata_file("J2K_pixelrep_mismatch.dcm")
    s = decode_slice(path)
    assert len(s.window_centers) == 3 and s.file_window()[0] == 40.0
    h = read_header(path)
    assert (h.rows, h.columns) == (512, 512) and h.sop_instance_uid == s.sop_instance_uid
    assert h.position == pytest.approx(s.position) and h.normal is not None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rtplan.dcm", "non-image SOP class"),
        ("test-SR.dcm", "non-image SOP class"),
        ("rtdose.dcm", "non-image SOP class"),
        ("liver_1frame.dcm", "non-image SOP class"),
        ("no_meta.dcm", "not a DICOM Part-10"),
        ("MR_truncated.dcm", "truncated"),
        ("UN_sequence.dcm", "no PixelData"),
    ],
)
def test_bad_files_raise_named_errors(name: str, reason: str) -> None:
    with pytest.raises(DicomInputError) as info:
        decode_slice(get_testdata_file(name))
    assert reason in str(info.value)
    assert str(info.value).startswith(name + ": ")


def test_error_names_sop_uid_for_bytes() -> None:
    data = make_slice(np.zeros((8, 8)), sop_uid="1.2.3.4.5")
    cut = data[:-10]
    with pytest.raises(DicomInputError) as info:
        decode_slice(cut)
    assert "1.2.3.4.5" in str(info.value) or "bytes" in str(info.value)
    with pytest.raises(DicomInputError, match="not a DICOM"):
        decode_slice(b"hello")


def test_absurd_dimensions_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_slice(np.zeros((16, 16)), sop_uid="1.2.3.99", extra={"NumberOfFrames": 100000})
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(lambda self: pytest.fail("decoded")))
    with pytest.raises(LimitExceeded, match=r"1\.2\.3\.99: .*frames"):
        decode_slice(data)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 60000  # header claims 7 GB
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(LimitExceeded, match="pixels per slice"):
        decode_slice(buf.getvalue())
    with pytest.raises(LimitExceeded, match="bytes"):
        decode_slice(make_slice(np.zeros((16, 16))), limits=Limits(max_request_bytes=100))


def test_synthetic_signed_unsigned_and_monochrome1() -> None:
    hu = np.linspace(-1000, 1000, 64 * 64, dtype=np.float32).reshape(64, 64)
    for signed, intercept in ((False, -1024.0), (True, 0.0)):
        s = decode_slice(make_slice(hu, signed=signed, intercept=intercept))
        np.testing.assert_allclose(s.hu, np.rint(hu), atol=0.5)
        assert s.signed == signed
    s = decode_slice(make_slice(hu, slope=0.5, intercept=-1024.0))
    np.testing.assert_allclose(s.hu, hu, atol=0.25)
    s1 = decode_slice(make_slice(hu, photometric="MONOCHROME1"))
    assert s1.photometric == "MONOCHROME1"


def test_bits_stored_high_bits_masked() -> None:
    data = make_slice(np.zeros((8, 8)), intercept=0.0, extra={"BitsStored": 12, "HighBit": 11})
    ds = pydicom.dcmread(io.BytesIO(data))
    arr = np.full((8, 8), 0xF123, dtype=np.uint16)  # overlay garbage in the top 4 bits
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    assert decode_slice(buf.getvalue()).hu.max() == 0x123


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_synthetic_ct_compressed_roundtrip(syntax: str) -> None:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, (64, 64)).astype(np.float32)
    s = decode_slice(make_slice(hu, transfer_syntax=syntax))
    np.testing.assert_array_equal(s.hu, hu)


def test_modality_lut_sequence() -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.ModalityLUTType = "HU"
    item["LUTDescriptor"].VR = "US"
    item.LUTData = [0, 100, 200, 300]
    item["LUTData"].VR = "US"
    data = make_slice(np.array([[0, 1], [2, 9]], dtype=np.float32), modality="OT", intercept=0.0, window=None)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.ModalityLUTSequence = Sequence([item])
    buf = io.BytesIO()
    ds.save_as(buf)
    np.testing.assert_array_equal(decode_slice(buf.getvalue()).hu, [[0, 100], [200, 300]])


def test_radiograph_single_image_with_imager_spacing() -> None:
    data = make_slice(
        np.zeros((32, 40)), position=None, orientation=None, spacing=None, modality="DX", sop_class=DX_STORAGE,
        intercept=0.0, photometric="MONOCHROME1", extra={"ImagerPixelSpacing": [0.15, 0.15]},
    )
    s = decode_slice(data)
    assert s.position is None and s.orientation is None and s.pixel_spacing == (0.15, 0.15)


def test_enhanced_ct_functional_groups() -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    vol = np.stack([np.full((8, 8), v, np.float32) for v in (10.0, 20.0)])
    data = make_slice(vol[0], sop_class="1.2.840.10008.5.1.4.1.1.2.1", position=None, orientation=None, spacing=None)
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.NumberOfFrames = 2
    ds.PixelData = (vol.astype(np.uint16) + 1024).tobytes()

    def group(z: float) -> Dataset:
        g = Dataset()
        pos, meas, pvt = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, z]
        g.PlanePositionSequence = Sequence([pos])
        meas.PixelSpacing = [0.5, 0.5]
        meas.SliceThickness = 1.0
        g.PixelMeasuresSequence = Sequence([meas])
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, -1024, "HU"
        g.PixelValueTransformationSequence = Sequence([pvt])
        return g

    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([ori])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([group(5.0), group(7.5)])
    buf = io.BytesIO()
    ds.save_as(buf)
    frames = decode_frames(buf.getvalue())
    assert [f.hu[0, 0] for f in frames] == [10.0, 20.0]
    assert [f.position[2] for f in frames] == [5.0, 7.5] and frames[1].pixel_spacing == (0.5, 0.5)
    with pytest.raises(DicomInputError, match="frames"):
        decode_slice(buf.getvalue())


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
def test_native_pixels_are_read_in_place_from_the_request(syntax: str) -> None:
    """The hot path maps PixelData from the item's own bytes (no per-slice copy by pydicom), with the
    values pydicom gives; a PixelData element running past the end is refused as before."""
    hu = np.arange(64 * 48, dtype=np.float64).reshape(64, 48) - 1000.0
    raw = make_slice(hu)
    if syntax != "1.2.840.10008.1.2.1":  # re-encode as implicit VR
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.file_meta.TransferSyntaxUID = syntax
        buf = io.BytesIO()
        ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=True)
        raw = buf.getvalue()
        assert pydicom.dcmread(io.BytesIO(raw)).original_encoding == (True, True)
    (s,) = decode_frames(raw, source="in-place.dcm")
    assert s.stored is not None and np.shares_memory(s.stored, np.frombuffer(raw, np.uint8))
    ds = pydicom.dcmread(io.BytesIO(raw))
    np.testing.assert_array_equal(s.stored, ds.pixel_array)
    np.testing.assert_array_equal(s.modality_values(), hu.astype(np.float32))
    with pytest.raises(DicomInputError, match="in-place.dcm"):
        decode_frames(raw[:-100], source="in-place.dcm")
