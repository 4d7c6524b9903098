"""VOI windowing per DICOM PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID), output 0..255.

pydicom's ``apply_voi_lut`` outputs in the stored-value range and ignores MONOCHROME1; here the output
range is the model's 0..255 and MONOCHROME1 is inverted by folding the inversion into the linear
coefficients (no extra pass over the pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
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
    hu = sl.modality_values()
    lo, hi = float(hu.min()), float(hu.max())  # no window anywhere: full range
    return (lo + hi) / 2.0, max(hi - lo, 1.0) + 1.0, "LINEAR"


def window_slice(
    sl: DecodedSlice,
    window: str = "lung",
    function: str | None = None,
    dtype: np.dtype | type = np.float32,
    out: np.ndarray | None = None,
    work: np.ndarray | None = None,
) -> np.ndarray:
    """Window one decoded slice to 0..255 with MONOCHROME1 inverted.

    uint8 output from integer stored values goes through a ``StoredWindowPlan`` (bit-identical to
    the float path below, proven per plan over every stored value); ``out`` is then uint8.
    """
    invert = sl.photometric == "MONOCHROME1"
    resolved = resolve_window(sl, window, function)
    if resolved is None:
        assert sl.voi_lut is not None
        return apply_voi_lut_table(sl.modality_values(), sl.voi_lut[0], sl.voi_lut[1], invert=invert, dtype=dtype)
    c, w, fn = resolved
    try:
        out_u8 = out if out is not None and out.dtype == np.uint8 else None
        if np.dtype(dtype) == np.uint8 and sl.stored is not None:
            plan = stored_window_plan(sl.stored.dtype.str, sl.rescale_slope, sl.rescale_intercept, c, w, fn, invert)
            if plan is not None:
                return plan.apply(sl.stored, out=out_u8, work=work)
        y = apply_window(sl.modality_values(), c, w, fn, invert=invert, dtype=dtype, out=None if out_u8 is not None else out)
        if out_u8 is not None:
            np.copyto(out_u8, y)
            return out_u8
        return y
    except DicomInputError as exc:
        raise DicomInputError(sl.source, exc.reason) from None


# ----------------------------------------------------------------------------- stored-value plans

_PLAN_DTYPES = ("|u1", "|i1", "<u2", "<i2", "=u2", "=i2")  # domains small enough to check exhaustively


@dataclass(frozen=True)
class StoredWindowPlan:
    """Stored integers -> uint8 window in one pass chain: clip in the stored dtype, then
    ``trunc(s * scale + offset)`` in float32 (or a table lookup when that formula is not exact).

    Built by ``stored_window_plan``, which proves equality with the reference (modality rescale,
    ``apply_window``, round half up) on every value the stored dtype can hold, so any pixel of any
    slice gives the reference's byte.
    """

    lo: int  # stored values <= lo all map to table[lo]; clipping to [lo, hi] changes nothing
    hi: int
    scale: float  # float32 coefficients of the folded formula (unused when ``table`` is set)
    offset: float
    table: np.ndarray | None  # uint8 lookup indexed by stored - domain_min (fallback)
    domain_min: int

    def apply(self, stored: np.ndarray, out: np.ndarray | None = None, work: np.ndarray | None = None) -> np.ndarray:
        """uint8 window of ``stored``; ``work`` (float32, same shape) saves an allocation per call."""
        if out is None:
            out = np.empty(stored.shape, dtype=np.uint8)
        if self.table is not None:
            idx = stored.astype(np.int32) - self.domain_min if self.domain_min else stored
            return np.take(self.table, idx, out=out)
        if work is None or work.shape != stored.shape or work.dtype != np.float32:
            work = np.empty(stored.shape, dtype=np.float32)
        np.multiply(np.clip(stored, stored.dtype.type(self.lo), stored.dtype.type(self.hi)), np.float32(self.scale), out=work)
        work += np.float32(self.offset)
        np.copyto(out, work, casting="unsafe")  # work is in [0, 256) by construction: truncation = round half up
        return out


def _reference_lut(dom: np.ndarray, slope: float, intercept: float, c: float, w: float, fn: str, invert: bool) -> np.ndarray:
    """What the float path gives for each stored value (same ops as dicom_io._rescale + apply_window)."""
    hu = dom.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return apply_window(hu, c, w, fn, invert=invert, dtype=np.uint8)


@lru_cache(maxsize=64)
def stored_window_plan(
    dtype: str, slope: float, intercept: float, c: float, w: float, fn: str, invert: bool
) -> StoredWindowPlan | None:
    """The fastest exact plan for this stored dtype / rescale / window, or None (use the float path)."""
    if dtype not in _PLAN_DTYPES:
        return None
    info = np.iinfo(np.dtype(dtype))
    dom = np.arange(info.min, info.max + 1, dtype=np.int64).astype(np.dtype(dtype))
    ref = _reference_lut(dom, slope, intercept, c, w, fn, invert)
    changes = np.flatnonzero(ref[1:] != ref[:-1])
    lo_i = int(changes[0]) if changes.size else 0  # last index of the constant run at the bottom
    hi_i = int(changes[-1]) + 1 if changes.size else 0  # first index of the constant run at the top
    lo, hi = int(dom[lo_i]), int(dom[hi_i])
    if fn != "SIGMOID" and hi > lo and not (fn == "LINEAR" and w <= 1):
        # Fold rescale, window and the +0.5 of rounding into one multiply-add on [lo, hi].
        a = Y_MAX / (w - 1.0) if fn == "LINEAR" else Y_MAX / w
        b = (0.5 - (c - 0.5) / (w - 1.0)) * Y_MAX if fn == "LINEAR" else (0.5 - c / w) * Y_MAX
        if invert:
            a, b = -a, Y_MAX - b
        scale, offset = float(np.float32(a * slope)), float(np.float32(a * intercept + b + 0.5))
        y = np.multiply(np.clip(dom, dom.dtype.type(lo), dom.dtype.type(hi)), np.float32(scale), dtype=np.float32)
        y += np.float32(offset)
        if y.min() >= 0 and y.max() < 256 and np.array_equal(y.astype(np.uint8), ref):
            return StoredWindowPlan(lo, hi, scale, offset, None, int(info.min))
    return StoredWindowPlan(lo, hi, 0.0, 0.0, ref, int(info.min))
