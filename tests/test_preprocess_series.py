"""Series assembly: order along the normal, duplicates, gaps, geometry, mixed series, radiographs."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import DX_STORAGE, make_slice, series_bytes

from preprocess_backend.dicom_io import decode_slice
from preprocess_backend.errors import DicomInputError
from preprocess_backend.series import assemble_series


def _vol(z: int) -> np.ndarray:
    return np.stack([np.full((8, 8), 10.0 * i, np.float32) for i in range(z)])


def test_orders_by_position_not_instance_number_or_input_order() -> None:
    items = series_bytes(_vol(7), shuffle_seed=3)
    s = assemble_series([decode_slice(b) for b in items])
    assert [float(x.hu[0, 0]) for x in s.slices] == [10.0 * i for i in range(7)]
    assert np.all(np.diff(s.z) > 0) and s.report.ok and s.report.median_spacing_mm == pytest.approx(1.25)
    geo = s.geometry
    assert geo.slice_spacing == pytest.approx(1.25) and len(geo.sop_instance_uids) == 7


def test_oblique_orientation_orders_along_normal() -> None:
    c, sn = np.cos(0.3), np.sin(0.3)
    iop = (1.0, 0.0, 0.0, 0.0, c, sn)  # tilted: normal has y and z components
    items = series_bytes(_vol(5), orientation=iop, shuffle_seed=1)
    s = assemble_series([decode_slice(b) for b in items])
    assert [float(x.hu[0, 0]) for x in s.slices] == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert not s.report.inconsistent


def test_duplicates_gaps_and_geometry_reported() -> None:
    slices = [decode_slice(b) for b in series_bytes(_vol(6))]
    dup = decode_slice(make_slice(np.zeros((8, 8)), position=slices[2].position, series_uid=slices[0].series_instance_uid))
    del slices[4]  # gap between index 3 and 5
    s = assemble_series([*slices, dup, slices[0]])  # slices[0] twice = same instance repeated
    assert len(s.report.duplicates) == 1 and len(s.report.gaps) == 1
    assert s.report.gaps[0][1] == pytest.approx(2.5)
    assert s.report.repeated_instances == [slices[0].sop_instance_uid]
    assert not s.report.ok

    odd = decode_slice(make_slice(np.zeros((8, 8)), position=(0, 0, 50), spacing=(0.9, 0.9), series_uid=slices[0].series_instance_uid))
    s2 = assemble_series([*slices, odd])
    assert any("PixelSpacing" in m for m in s2.report.inconsistent)


def test_mixed_series_refused_unless_allowed() -> None:
    a = [decode_slice(b) for b in series_bytes(_vol(3), series_uid="1.2.3.1")]
    b = [decode_slice(x) for x in series_bytes(_vol(2), series_uid="1.2.3.2")]
    with pytest.raises(DicomInputError, match="mixed series"):
        assemble_series(a + b)
    s = assemble_series(a + b, allow_mixed=True)
    assert s.series_instance_uid == "1.2.3.1" and s.report.other_series == ["1.2.3.2"]


def test_missing_geometry() -> None:
    xr = decode_slice(make_slice(np.zeros((8, 8)), position=None, orientation=None, modality="DX", sop_class=DX_STORAGE))
    s = assemble_series([xr])
    assert len(s) == 1 and not s.has_geometry
    with pytest.raises(DicomInputError, match="missing"):
        _ = s.geometry
    xr2 = decode_slice(make_slice(np.zeros((8, 8)), position=None, orientation=None))
    with pytest.raises(DicomInputError, match="ImagePositionPatient"):
        assemble_series([xr, xr2])
