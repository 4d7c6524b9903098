"""VOI windowing per PS3.3 C.11.2.1.2, presets, MONOCHROME1, VOI LUT Sequence."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import make_slice

from preprocess_backend.dicom_io import decode_slice
from preprocess_backend.errors import DicomInputError
from preprocess_backend.windowing import (
    WINDOW_PRESETS,
    apply_voi_lut_table,
    apply_window,
    resolve_window,
    window_slice,
)


def _linear_ref(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """The standard's pseudo-code, literally, in float64."""
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0, y)
    return np.where(x > c - 0.5 + (w - 1) / 2, 255, y)


def test_presets() -> None:
    assert WINDOW_PRESETS["lung"] == (-600, 1500)
    assert WINDOW_PRESETS["mediastinum"] == (40, 400)
    assert WINDOW_PRESETS["bone"] == (400, 1800)
    assert WINDOW_PRESETS["soft_tissue"] == (50, 350)


@pytest.mark.parametrize(("c", "w"), [(-600, 1500), (40, 400), (0, 2), (10.5, 7)])
def test_linear_matches_standard(c: float, w: float) -> None:
    x = np.linspace(-2000, 2000, 40001, dtype=np.float32)
    np.testing.assert_allclose(apply_window(x, c, w), _linear_ref(x.astype(np.float64), c, w), atol=2e-3)


def test_linear_exact_and_sigmoid() -> None:
    x = np.array([-1350, -600, 150, 1000], dtype=np.float32)
    np.testing.assert_allclose(apply_window(x, -600, 1500, "LINEAR_EXACT"), [0, 127.5, 255, 255], atol=1e-3)
    s = apply_window(x, -600, 1500, "SIGMOID")
    np.testing.assert_allclose(s, 255 / (1 + np.exp(-4 * (x.astype(np.float64) + 600) / 1500)), rtol=1e-5)
    assert apply_window(np.array([-1e6, 1e6], np.float32), 0, 10, "SIGMOID").tolist() == [0.0, 255.0]


def test_monochrome1_inverts_and_uint8_rounds() -> None:
    x = np.linspace(-1500, 500, 1001, dtype=np.float32)
    y = apply_window(x, -600, 1500)
    np.testing.assert_allclose(apply_window(x, -600, 1500, invert=True), 255 - y, atol=1e-3)
    u = apply_window(x, -600, 1500, dtype=np.uint8)
    assert u.dtype == np.uint8
    np.testing.assert_array_equal(u, np.floor(y + 0.5).astype(np.uint8))


def test_bad_windows_are_typed_errors() -> None:
    with pytest.raises(DicomInputError):
        apply_window(np.zeros(3, np.float32), 0, 0.5)
    with pytest.raises(DicomInputError):
        apply_window(np.zeros(3, np.float32), 0, 10, "GAMMA")


def test_window_slice_preset_overrides_file_and_file_window_used_when_asked() -> None:
    hu = np.full((4, 4), -600, np.float32)
    s = decode_slice(make_slice(hu, window=([40.0, -500.0], [400.0, 1400.0]), voi_function="LINEAR_EXACT"))
    assert s.window_centers == (40.0, -500.0) and s.voi_lut_function == "LINEAR_EXACT"
    assert resolve_window(s, "lung") == (-600, 1500, "LINEAR")
    assert resolve_window(s, "file") == (40.0, 400.0, "LINEAR_EXACT")
    assert resolve_window(s, "-600,1500")[:2] == (-600.0, 1500.0)
    np.testing.assert_allclose(window_slice(s, "lung"), (0.5 / 1499 + 0.5) * 255, atol=1e-3)
    with pytest.raises(DicomInputError, match="unknown window"):
        resolve_window(s, "brain")


def test_monochrome1_slice_is_inverted() -> None:
    hu = np.array([[-1000, 200]], np.float32)
    m2 = window_slice(decode_slice(make_slice(hu)), "lung")
    m1 = window_slice(decode_slice(make_slice(hu, photometric="MONOCHROME1")), "lung")
    np.testing.assert_allclose(m1, 255 - m2, atol=1e-3)


def test_voi_lut_table_for_radiographs() -> None:
    data = np.array([0, 1000, 4095], dtype=np.float32)
    out = apply_voi_lut_table(np.array([[100, 101, 102, 500]], np.float32), (3, 100, 12), data)
    np.testing.assert_allclose(out, [[0, 1000 / 4095 * 255, 255, 255]], rtol=1e-5)
    inv = apply_voi_lut_table(np.array([[100]], np.float32), (3, 100, 12), data, invert=True)
    assert inv[0, 0] == 255
