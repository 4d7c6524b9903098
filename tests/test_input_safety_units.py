"""Issue 17 without a server: the model contract's parameters and checks, series keys for empty
SeriesInstanceUIDs, the client's header path on real files with empty UID tags, padding values."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from bad_dicom_corpus import _deflated, good_item
from dicom_factory import make_slice
from test_input_safety_corpus import LIDC, TOTALSEG, _dicom_files, _jpeg_extended_ct

from ctlesion_client.core import collect_items, select_series
from preprocess_backend.contract import ModelContract
from preprocess_backend.dicom_io import decode_frames, read_header
from preprocess_backend.errors import DicomInputError, LimitExceeded
from preprocess_backend.series import assemble_series, series_key


def test_contract_parameters_round_trip_and_reject_unknown_windows() -> None:
    contract = ModelContract(max_pixel_spacing_mm=1.5)
    params = contract.to_params()
    assert params["contract_modality"] == "CT" and params["contract_window"] == "lung"
    assert ModelContract.from_params(params) == contract
    assert ModelContract.from_params({}) == ModelContract()
    with pytest.raises(ValueError, match="not a preset"):
        ModelContract.from_params({"contract_window": "file"})
    assert "lung window (centre -600, width 1500)" in contract.describe()


@pytest.mark.parametrize("value", ["lung", " LUNG ", "-600,1500", "-600.0,1500.0"])
def test_trained_window_is_accepted(value: str) -> None:
    ModelContract().check_window(value)


@pytest.mark.parametrize("value", ["mediastinum", "bone", "file", "40,400", "-600,1400", "", "lung,1500"])
def test_other_windows_are_refused_with_the_reason(value: str) -> None:
    with pytest.raises(DicomInputError, match="trained on the lung window"):
        ModelContract().check_window(value)


def test_empty_series_uids_group_by_frame_of_reference_orientation_and_spacing() -> None:
    hu = np.zeros((16, 16))
    a = [decode_frames(make_slice(hu, series_uid=None, position=(0, 0, z), extra={"SeriesInstanceUID": ""}))[0]
         for z in (0.0, 1.0)]
    for s in a:
        s.series_instance_uid = ""
    other_frame = decode_frames(make_slice(hu, frame_of_reference_uid="1.2.3.9", position=(0, 0, 2.0)))[0]
    other_frame.series_instance_uid = ""
    assert series_key(a[0]) == series_key(a[1]) != series_key(other_frame)
    assert series_key(a[0]).startswith("derived:1.2.826.0.1.3680043.8.498.1:1.000/0.000/0.000/0.000/1.000/0.000:0.7000")
    series = assemble_series(a)
    assert len(series) == 2 and any("SeriesInstanceUID empty" in w for w in series.report.warnings)
    with pytest.raises(DicomInputError, match="mixed series"):
        assemble_series([*a, other_frame])


def test_client_collects_real_files_with_empty_uid_tags() -> None:
    """TotalSegmentator's slices: one series (derived key), every SOPInstanceUID from the file meta."""
    items, warnings = collect_items(TOTALSEG)
    assert len(items) == 20 and not warnings
    chosen, more = select_series(items)
    assert len(chosen) == 20 and not more
    assert all(it.header.sop_instance_uid and not it.header.series_instance_uid for it in chosen)
    assert all(any("MediaStorageSOPInstanceUID" in w for w in it.header.warnings) for it in chosen)


def test_real_lidc_padding_value_is_kept_and_the_slab_accepted() -> None:
    """GE pads outside the reconstruction circle (PixelPaddingValue -2000): accepted, padding reported in HU."""
    files = _dicom_files(LIDC)
    s = decode_frames(files[0], contract=ModelContract())[0]
    assert s.pixel_padding_value is not None and s.pixel_padding_value < -1024
    assert float(s.hu.min()) <= s.pixel_padding_value  # the padded pixels are there, unchanged


def test_read_header_of_a_deflated_bomb_is_bounded(tmp_path: Path) -> None:
    """The client's header read goes through the same bounds as the server's decode."""
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(_deflated(None, 400 << 20, 160))
    started = time.perf_counter()
    with pytest.raises(LimitExceeded, match="inflates to more than|time bound"):
        read_header(bomb)
    assert time.perf_counter() - started < 10.0
    ok = tmp_path / "deflated.dcm"
    ok.write_bytes(_deflated(None, 0, 161))
    assert read_header(ok).rows == 32


def test_header_warnings_travel_to_decoded_slices() -> None:
    item = good_item(170, extra={"SOPInstanceUID": ""})
    h = read_header(item)
    s = decode_frames(item)[0]
    assert h.sop_instance_uid == s.sop_instance_uid != ""
    assert h.warnings == s.warnings and "MediaStorageSOPInstanceUID" in h.warnings[0]


def test_client_header_says_a_12bit_jpeg_extended_item_may_need_dcmtk() -> None:
    (item,), _ = collect_items([_jpeg_extended_ct()])
    assert any("dcmdjpeg" in w for w in item.header.warnings)
    assert not any("dcmdjpeg" in w for w in read_header(good_item(171)).warnings)
