"""VOI windowing per DICOM PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID), output 0..255.

pydicom's ``apply_voi_lut`` outputs in the stored-value range and ignores MONOCHROME1; here the output
range is the model's 0..255 and MONOCHROME1 is inverted by folding the inversion into the linear
coefficients (no extra pass over the pixels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from preprocess_backend.errors import DicomInputError

if TYPE_CHECKING:
    from preprocess_backend.dicom_io import DecodedSlice

WINDOW_PRESETS: dict[str, tuple[float, float]] = {  # name -> (centre, width) in HU
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "soft_tissue": (50.0, 350.0),
}
FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
Y_MAX = 255.0


def _finish(y: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    if np.dtype(dtype) == np.uint8:  # round half up; y is already clipped to 0..255
        y += np.float32(0.5)
        return y.astype(np.uint8)
    return y


def apply_window(
    values: np.ndarray,
    center: float,
    width: float,
    function: str = "LINEAR",
    invert: bool = False,
    dtype: np.dtype | type = np.float32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Window ``values`` (HU / modality values) to 0..255 float32 (or uint8 with ``dtype=np.uint8``).

    ``invert=True`` gives MONOCHROME1 display (low values bright). ``out`` (float32, same shape) avoids an
    allocation in the hot path.
    """
    function = (function or "LINEAR").upper()
    if function not in FUNCTIONS:
        raise DicomInputError("window", f"unknown VOI LUT function {function!r} (use one of {FUNCTIONS})")
    c, w = float(center), float(width)
    if not np.isfinite(c) or not np.isfinite(w) or w <= 0 or (function == "LINEAR" and w < 1):
        raise DicomInputError("window", f"bad window centre {center} / width {width} for {function}")
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    if function == "SIGMOID":
        np.multiply(values, np.float32(-4.0 / w), out=out)
        out += np.float32(4.0 * c / w)
        with np.errstate(over="ignore"):  # exp overflow -> inf -> 0 after the division: correct
            np.exp(out, out=out)
        out += np.float32(1.0)
        np.divide(np.float32(Y_MAX), out, out=out)
        if invert:
            np.subtract(np.float32(Y_MAX), out, out=out)
        return _finish(out, dtype)
    if function == "LINEAR" and w == 1:  # degenerate: a step at c - 0.5
        step = values > np.float32(c - 0.5)
        out[...] = np.where(step != invert, np.float32(Y_MAX), np.float32(0.0))
        return _finish(out, dtype)
    if function == "LINEAR":  # y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
        a = Y_MAX / (w - 1.0)
        b = (0.5 - (c - 0.5) / (w - 1.0)) * Y_MAX
    else:  # LINEAR_EXACT: y = ((x - c) / w + 0.5) * 255
        a = Y_MAX / w
        b = (0.5 - c / w) * Y_MAX
    if invert:
        a, b = -a, Y_MAX - b
    np.multiply(values, np.float32(a), out=out)
    out += np.float32(b)
    np.clip(out, np.float32(0.0), np.float32(Y_MAX), out=out)
    return _finish(out, dtype)


def apply_voi_lut_table(
    values: np.ndarray, descriptor: tuple[int, int, int], data: np.ndarray, invert: bool = False, dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """VOI LUT Sequence (radiographs): table lookup, scaled from the LUT's bit depth to 0..255."""
    first = descriptor[1] if descriptor[1] < 32768 else descriptor[1] - 65536
    table = np.asarray(data, dtype=np.float32)
    top = max(float(2 ** int(descriptor[2]) - 1), float(table.max()) if table.size else 1.0, 1.0)
    scaled = table * np.float32(Y_MAX / top)
    if invert:
        scaled = np.float32(Y_MAX) - scaled
    idx = np.clip(np.rint(values).astype(np.int64) - first, 0, len(table) - 1)
    return _finish(scaled[idx], dtype)


def resolve_window(sl: DecodedSlice, window: str = "lung", function: str | None = None) -> tuple[float, float, str] | None:
    """Which (centre, width, function) to use for this slice.

    A preset name overrides the file's window on CT (presets are HU); on other modalities, and for
    ``"file"``, the file's first window is used, then its full value range. ``"c,w"`` is a custom window.
    Returns None when the slice should use its VOI LUT Sequence instead.
    """
    key = (window or "lung").strip().lower()
    if key in WINDOW_PRESETS and sl.modality == "CT":
        c, w = WINDOW_PRESETS[key]
        return c, w, (function or "LINEAR").upper()
    if "," in key:
        try:
            c_text, w_text = key.split(",", 1)
            return float(c_text), float(w_text), (function or "LINEAR").upper()
        except ValueError:
            raise DicomInputError(sl.source, f"bad custom window {window!r} (expected 'centre,width')") from None
    if key not in WINDOW_PRESETS and key != "file":
        raise DicomInputError(sl.source, f"unknown window {window!r} (presets: {', '.join(WINDOW_PRESETS)}, 'file', 'c,w')")
    fw = sl.file_window()
    if fw is not None and fw[1] > 0:
        return fw[0], fw[1], (function or sl.voi_lut_function).upper()
    if sl.voi_lut is not None:
        return None
    lo, hi = float(sl.hu.min()), float(sl.hu.max())  # no window anywhere: full range
    return (lo + hi) / 2.0, max(hi - lo, 1.0) + 1.0, "LINEAR"


def window_slice(
    sl: DecodedSlice,
    window: str = "lung",
    function: str | None = None,
    dtype: np.dtype | type = np.float32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Window one decoded slice to 0..255 with MONOCHROME1 inverted."""
    invert = sl.photometric == "MONOCHROME1"
    resolved = resolve_window(sl, window, function)
    if resolved is None:
        assert sl.voi_lut is not None
        return apply_voi_lut_table(sl.hu, sl.voi_lut[0], sl.voi_lut[1], invert=invert, dtype=dtype)
    c, w, fn = resolved
    try:
        return apply_window(sl.hu, c, w, fn, invert=invert, dtype=dtype, out=out)
    except DicomInputError as exc:
        raise DicomInputError(sl.source, exc.reason) from None
