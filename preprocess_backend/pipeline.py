"""The two halves the Triton Python models call: ``preprocess_slab`` and ``postprocess_slab``.

preprocess: DICOM items (any order) -> decode each once -> series order -> window -> onto the model
grid (letterbox, or one pixel size in mm with ``Options.pixel_mm``) -> 2.5D stack (neighbour slices,
or planes at fixed mm offsets with ``Options.context_mm``) -> ``Slab`` (model images + a few small
per-slice metadata arrays).
postprocess: detector output [N, A, C] / [N, A, 4] + those metadata arrays -> ``Detection`` list.

The metadata crosses Triton's shared memory between two Python models, so it is a handful of small
C-contiguous arrays (``SLAB_META_TENSORS``; ``SlabMeta.to_arrays`` / ``from_arrays``) instead of
full-size tensors: HU and the anatomy mask travel on a 1/4 grid (128 x 128 for a 512 model).
With a halo the client adds context slices at the slab ends; here every slice is treated alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from preprocess_backend.contract import ModelContract
from preprocess_backend.dicom_io import DecodedSlice, decode_frames
from preprocess_backend.errors import DicomInputError, LimitExceeded
from preprocess_backend.letterbox import LetterboxTransform, block_mean, letterbox, resample_uint8, resize
from preprocess_backend.masks import BODY, LUNG, anatomy_mask
from preprocess_backend.postprocess import (
    batched_threshold_nms,
    mean_in_boxes,
    plausible_in_mask,
)
from preprocess_backend.series import SeriesReport, assemble_series
from preprocess_backend.stacking import stack_indices
from preprocess_backend.types import Detection, Options
from preprocess_backend.windowing import window_slice

AIR_HU = -1024  # fill value of the letterbox padding on the HU grid
MODALITY_CT = 1

# name, dtype, dims (per request; -1 = variable). Triton model configs are generated from this.
SLAB_META_TENSORS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("meta_info", "int32", (-1, 6)),  # rows, columns, model_size, lowres_factor, is_ct, frame_index
    ("meta_spacing", "float32", (-1, 2)),  # PixelSpacing (row, column) mm; NaN if unknown
    ("meta_position", "float32", (-1, 3)),  # ImagePositionPatient mm (LPS); NaN if unknown
    ("meta_orientation", "float32", (-1, 6)),  # ImageOrientationPatient; NaN if unknown
    ("meta_sop_uid", "bytes", (-1,)),  # SOPInstanceUID per slice
    ("meta_hu", "int16", (-1, -1, -1)),  # HU on the letterboxed 1/lowres_factor grid
    ("meta_anatomy", "uint8", (-1, -1, -1)),  # same grid: bit 0 body, bit 1 lung
    ("meta_transform", "int32", (-1, 8)),  # model grid new_h, new_w, pad_x, pad_y; then the same for the 1/f grid
)


@dataclass
class SlabMeta:
    """Per-slice metadata of a slab, in slab order (ascending along the slice normal)."""

    info: np.ndarray  # int32 [N, 6]
    spacing: np.ndarray  # float32 [N, 2]
    position: np.ndarray  # float32 [N, 3]
    orientation: np.ndarray  # float32 [N, 6]
    sop_uid: np.ndarray  # object [N] of bytes
    hu: np.ndarray  # int16 [N, s, s]
    anatomy: np.ndarray  # uint8 [N, s, s]
    transform_ints: np.ndarray  # int32 [N, 8]: ``LetterboxTransform.as_ints()`` of the model and 1/f grids

    _FIELDS = ("info", "spacing", "position", "orientation", "sop_uid", "hu", "anatomy", "transform_ints")

    def __len__(self) -> int:
        return int(self.info.shape[0])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Triton output tensors (names = ``SLAB_META_TENSORS``), C-contiguous."""
        return {name: np.ascontiguousarray(getattr(self, f)) for (name, _, _), f in zip(SLAB_META_TENSORS, self._FIELDS, strict=True)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> SlabMeta:
        try:
            values = {f: np.asarray(arrays[name]) for (name, _, _), f in zip(SLAB_META_TENSORS, cls._FIELDS, strict=True)}
        except KeyError as exc:
            raise DicomInputError("slab_meta", f"missing tensor {exc.args[0]}") from None
        values["sop_uid"] = np.array([u if isinstance(u, bytes) else str(u).encode() for u in values["sop_uid"].ravel()], dtype=object)
        meta = cls(**values)
        n = len(meta)
        for f in cls._FIELDS:
            if getattr(meta, f).shape[0] != n:
                raise DicomInputError("slab_meta", f"{f} has {getattr(meta, f).shape[0]} rows, expected {n}")
        return meta

    def uid(self, i: int) -> str:
        u = self.sop_uid[i]
        return u.decode() if isinstance(u, bytes) else str(u)

    def transform(self, i: int) -> LetterboxTransform:
        rows, cols, size = (int(v) for v in self.info[i, :3])
        return LetterboxTransform(rows, cols, size, *(int(v) for v in self.transform_ints[i, :4]))

    def lowres_transform(self, i: int) -> LetterboxTransform:
        rows, cols, size, f = (int(v) for v in self.info[i, :4])
        return LetterboxTransform(rows, cols, size // f, *(int(v) for v in self.transform_ints[i, 4:]))


@dataclass
class Slab:
    """Model input of one request plus what postprocess needs."""

    images: np.ndarray  # [N, k, S, S] float32 (or uint8) 0..255, C-contiguous
    meta: SlabMeta
    report: SeriesReport
    series_instance_uid: str

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"images": self.images, **self.meta.to_arrays()}


# ----------------------------------------------------------------------------- preprocess


def decode_items(dicom_items: Sequence[bytes], options: Options, with_hu: bool = True, contract: ModelContract | None = None) -> list[DecodedSlice]:
    """Decode each item exactly once; errors name the SOPInstanceUID, or the item number if unreadable.

    ``with_hu=False`` (the serving path) skips the full-resolution float HU where the stored integers
    are kept: ``preprocess_decoded`` works from those (``DecodedSlice.modality_values()`` otherwise).
    """
    limits = options.limits
    if len(dicom_items) == 0:
        raise DicomInputError("request", "no DICOM items")
    if len(dicom_items) > limits.max_slices:
        raise LimitExceeded("request", f"{len(dicom_items)} items, limit {limits.max_slices} slices")
    total = sum(len(x) for x in dicom_items if isinstance(x, bytes | bytearray | memoryview | np.bytes_))
    if total > limits.max_request_bytes:
        raise LimitExceeded("request", f"{total} bytes, limit {limits.max_request_bytes}")
    slices: list[DecodedSlice] = []
    for i, item in enumerate(dicom_items):
        try:
            slices.extend(decode_frames(item, None, limits, with_hu=with_hu, contract=contract))
        except DicomInputError as exc:
            if exc.source.startswith("<"):  # nothing better than a byte count: add the item number
                raise type(exc)(f"item {i} {exc.source}", exc.reason) from None
            raise
        if len(slices) > limits.max_slices:
            raise LimitExceeded("request", f"more than {limits.max_slices} slices (multi-frame items)")
    return slices


def _lowres_hu(hu: np.ndarray, t: LetterboxTransform, f: int) -> np.ndarray:
    """float32 [Z, s, s] HU on the model grid shrunk f times (``t.lowres(f)``)."""
    if t.is_identity and t.src_h % f == 0 and t.src_w % f == 0:
        return block_mean(hu, f)  # the common 512 -> 512 case: exact 4 x 4 means
    return _place_float(hu, t.lowres(f))


def _place_float(images: np.ndarray, lo: LetterboxTransform) -> np.ndarray:
    """float32 [Z, H, W] -> [Z, s, s] through ``lo`` (dense ``resize``: the grids here are small)."""
    out = np.full((images.shape[0], lo.size, lo.size), AIR_HU, dtype=np.float32)
    ox0, oy0 = max(0, lo.pad_x), max(0, lo.pad_y)
    ox1, oy1 = min(lo.size, lo.pad_x + lo.new_w), min(lo.size, lo.pad_y + lo.new_h)
    resized = resize(images, lo.new_h, lo.new_w)
    out[:, oy0:oy1, ox0:ox1] = resized[:, oy0 - lo.pad_y : oy1 - lo.pad_y, ox0 - lo.pad_x : ox1 - lo.pad_x]
    return out


def _block_sum(stored: np.ndarray, f: int, out: np.ndarray) -> None:
    """Sums of f x f blocks of an integer [H, W] slice (H, W multiples of f) into int32 ``out``
    (rows first, strided adds: what ``block_mean`` does, in integers). Unsigned values whose block
    sums fit 16 bits (12-bit CT: 16 x 4095 < 65536) are added in uint16: half the bytes."""
    narrow = stored.dtype.kind == "u" and stored.dtype.itemsize <= 2 and int(stored.max()) * f * f <= 0xFFFF
    rows = stored[0::f].astype(np.uint16 if narrow else np.int32)
    for d in range(1, f):
        rows += stored[d::f]
    r = rows.reshape(rows.shape[0], -1, f)
    np.copyto(out, r[:, :, 0])
    for d in range(1, f):
        out += r[:, :, d]


def _lowres_hu_stored(ordered: Sequence[DecodedSlice], f: int) -> np.ndarray | None:
    """``block_mean`` of HU made from block sums of the stored integers, or None where that is not
    bit-identical: it is when HU are integers (integer slope and intercept) whose f x f sums float32
    holds exactly, the common CT case (slope 1, intercept -1024)."""
    z = len(ordered)
    h, w = ordered[0].stored.shape if ordered[0].stored is not None else (0, 0)
    if h == 0 or h % f or w % f:
        return None
    sums = np.empty((z, h // f, w // f), dtype=np.int32)
    scale, shift = np.empty(z), np.empty(z)
    for i, s in enumerate(ordered):
        st = s.stored
        slope, intercept = float(s.rescale_slope), float(s.rescale_intercept)
        if st is None or st.shape != (h, w) or not slope.is_integer() or not intercept.is_integer():
            return None
        info = np.iinfo(st.dtype)
        if (max(abs(info.min), abs(info.max)) * abs(slope) + abs(intercept)) * f * f >= 2**24 or info.bits > 16:
            return None
        _block_sum(st, f, sums[i])
        scale[i], shift[i] = slope, intercept * f * f
    hu_sum = sums.astype(np.float64)
    hu_sum *= scale[:, None, None]
    hu_sum += shift[:, None, None]  # exact integers: the float32 sum block_mean forms from HU
    out = hu_sum.astype(np.float32)
    out *= np.float32(1.0 / (f * f))
    return out


def model_transform(rows: int, cols: int, pixel_spacing: Sequence[float] | None, options: Options) -> LetterboxTransform:
    """The slice -> model grid mapping ``options`` asks for: one pixel size in mm where
    ``options.pixel_mm`` is set and the slice has a PixelSpacing, else the letterbox fit."""
    if options.pixel_mm is not None and pixel_spacing is not None:
        row_mm, col_mm = (float(np.float32(v)) for v in pixel_spacing)  # as the slab metadata holds them
        return LetterboxTransform.physical(rows, cols, options.model_size, row_mm, col_mm, options.pixel_mm)
    return LetterboxTransform.fit(rows, cols, options.model_size)


def context_planes(n: int, z_mm: np.ndarray | None, k: int, context_mm: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Where each slice's 2.5D channels come from: int64 [Z, k, 2] source slices and float32 [Z, k]
    weight of the second one (channel = (1 - w) x first + w x second).

    ``context_mm`` set and positions known: channel c of slice i is the plane at ``z_i + (c - k // 2) x
    context_mm``, linearly interpolated between the two slices around it (clamped at the ends), so
    the detector sees the same anatomy whatever the slice spacing. Else the neighbouring slices.
    """
    z = n
    if context_mm is None or z_mm is None or z < 2 or not np.all(np.isfinite(z_mm)) or np.any(np.diff(z_mm) <= 0):
        idx = stack_indices(n, k)
        return np.stack([idx, idx], axis=-1), np.zeros(idx.shape, np.float32)
    offsets = (np.arange(k) - k // 2) * float(context_mm)
    f = np.interp(z_mm[:, None] + offsets[None, :], z_mm, np.arange(z, dtype=np.float64))
    first = np.clip(np.floor(f).astype(np.int64), 0, z - 1)
    w = f - first
    # snap weights within 1 % of a slice onto it: a copy instead of a blend, and exact at spacing == context
    first = np.where(w > 0.99, np.minimum(first + 1, z - 1), first)
    w = np.where((w < 0.01) | (w > 0.99), 0.0, w)
    second = np.minimum(first + 1, z - 1)
    return np.stack([first, second], axis=-1), w.astype(np.float32)


def blend_plane(windowed: np.ndarray, a: int, b: int, w: float, out: np.ndarray, work: np.ndarray | None = None) -> np.ndarray:
    """One 2.5D channel: uint8 ``(1 - w) x windowed[a] + w x windowed[b]``, rounded half up (a copy when w == 0)."""
    if w == 0.0:
        np.copyto(out, windowed[a], casting="unsafe")
        return out
    work = np.empty(windowed.shape[1:], np.float32) if work is None else work
    np.multiply(windowed[a], np.float32(1.0 - w), out=work, dtype=np.float32)
    work += np.float32(w) * windowed[b]
    work += np.float32(0.5)
    np.floor(work, out=work)
    np.copyto(out, work, casting="unsafe")  # 0..255 by construction (a convex blend of uint8 values)
    return out


def _fill_channels(images: np.ndarray, windowed: np.ndarray, src: np.ndarray, w: np.ndarray, skip_mid: bool) -> None:
    """images[i, c] from ``context_planes``; the middle channel is left alone where it already holds
    the slice (``skip_mid``: it was windowed in place)."""
    mid = images.shape[1] // 2
    work = np.empty(windowed.shape[1:], np.float32) if np.any(w) else None
    for c in range(images.shape[1]):
        for i in range(images.shape[0]):
            a = int(src[i, c, 0])
            if skip_mid and c == mid and a == i and w[i, c] == 0:
                continue
            blend_plane(windowed, a, int(src[i, c, 1]), float(w[i, c]), images[i, c], work)


def preprocess_decoded(slices: Sequence[DecodedSlice], options: Options) -> Slab:
    """Everything after decoding (training and calibration call this on slices they decoded)."""
    series = assemble_series(slices, allow_mixed=options.group_series)
    ordered = series.slices
    shapes = {s.hu.shape for s in ordered}
    if len(shapes) != 1:
        raise DicomInputError(ordered[0].source, f"slices of different sizes {sorted(shapes)} in one slab")
    if options.model_size % 32 or options.model_size < 32:
        raise DicomInputError("options", f"model_size {options.model_size} must be a positive multiple of 32")
    f = options.lowres_factor
    if f < 1 or options.model_size % f:
        raise DicomInputError("options", f"lowres_factor {f} must divide model_size {options.model_size}")
    if options.pixel_mm is not None and not options.pixel_mm > 0:
        raise DicomInputError("options", f"pixel_mm must be > 0, got {options.pixel_mm}")
    if options.context_mm is not None and not options.context_mm > 0:
        raise DicomInputError("options", f"context_mm must be > 0, got {options.context_mm}")
    z = len(ordered)
    h, w = ordered[0].hu.shape
    size = options.model_size
    t = model_transform(h, w, ordered[0].pixel_spacing, options)
    lo = t.lowres(f)
    uint8 = np.dtype(options.image_dtype) == np.uint8
    if options.image_dtype not in ("float32", "uint8"):
        raise DicomInputError("options", f"image_dtype must be float32 or uint8, not {options.image_dtype!r}")

    # Window to integers 0..255 in both dtypes, so float32 training and uint8 serving see the same values.
    # uint8 at native size: each slice is windowed straight into its own channel of the output
    # (stored integers -> one exact multiply-add plan, windowing.StoredWindowPlan), the neighbours'
    # channels are copies of it (or blends, for planes at fixed mm offsets).
    src, weight = context_planes(z, series.z if series.has_geometry else None, options.k, options.context_mm)
    images = np.empty((z, options.k, size, size), dtype=np.uint8 if uint8 else np.float32)
    mid = options.k // 2
    in_place = uint8 and t.is_identity
    if t.is_identity or options.pixel_mm is not None:
        # native pixels, or one pixel size in mm: window at native size (uint8), then resample once
        windowed = images[:, mid] if in_place else np.empty((z, size, size), dtype=np.uint8)
        native = None if t.is_identity else np.empty((h, w), dtype=np.uint8)
        work = np.empty((h, w), dtype=np.float32)
        for i, s in enumerate(ordered):
            if native is None:
                window_slice(s, options.window, options.window_function, dtype=np.uint8, out=windowed[i], work=work)
            else:
                window_slice(s, options.window, options.window_function, dtype=np.uint8, out=native, work=work)
                resample_uint8(native, t, windowed[i])
    else:
        full = np.empty((z, h, w), dtype=np.float32)
        for i, s in enumerate(ordered):
            window_slice(s, options.window, options.window_function, out=full[i])
        boxed, _ = letterbox(full, size)
        boxed += np.float32(0.5)
        np.clip(boxed, 0, 255, out=boxed)
        windowed = boxed.astype(np.uint8)
    _fill_channels(images, windowed, src, weight, skip_mid=in_place)

    hu_lo = None
    if t.is_identity or options.pixel_mm is not None:
        blocks = _lowres_hu_stored(ordered, f)  # exact f x f means of the original grid, from stored integers
        if blocks is not None:
            hu_lo = blocks if t.is_identity else _place_float(blocks, LetterboxTransform(h // f, w // f, lo.size, *lo.as_ints()))
    if hu_lo is None:
        hu = np.stack([s.modality_values() for s in ordered]) if z > 1 else ordered[0].modality_values()[None]
        hu_lo = _lowres_hu(hu, t, f)
    is_ct = all(s.is_ct for s in ordered)
    image_box = (lo.pad_y, lo.pad_y + lo.new_h, lo.pad_x, lo.pad_x + lo.new_w)  # the image on the canvas
    anatomy = anatomy_mask(hu_lo, image_box=image_box) if is_ct else np.zeros(hu_lo.shape, dtype=np.uint8)
    np.clip(hu_lo, -32768, 32767, out=hu_lo)

    nan2, nan3, nan6 = (math.nan,) * 2, (math.nan,) * 3, (math.nan,) * 6
    meta = SlabMeta(
        info=np.array([[h, w, size, f, int(is_ct), s.frame_index] for s in ordered], dtype=np.int32),
        spacing=np.array([s.pixel_spacing or nan2 for s in ordered], dtype=np.float32),
        position=np.array([s.position or nan3 for s in ordered], dtype=np.float32),
        orientation=np.array([s.orientation or nan6 for s in ordered], dtype=np.float32),
        sop_uid=np.array([s.sop_instance_uid.encode() for s in ordered], dtype=object),
        hu=np.rint(hu_lo).astype(np.int16),
        anatomy=np.ascontiguousarray(anatomy),
        transform_ints=np.tile(np.array([*t.as_ints(), *lo.as_ints()], dtype=np.int32), (z, 1)),
    )
    return Slab(images=images, meta=meta, report=series.report, series_instance_uid=series.series_instance_uid)


def preprocess_slab(
    dicom_items: Sequence[bytes], options: Options | None = None, contract: ModelContract | None = None
) -> Slab:
    """DICOM Part-10 items of one series (any order) -> model images [N, k, S, S] + slab metadata.

    ``contract``: the served model's input contract (``preprocess_backend.contract``), checked per item.
    """
    options = options or Options()
    return preprocess_decoded(decode_items(dicom_items, options, with_hu=False, contract=contract), options)


# ----------------------------------------------------------------------------- postprocess


def _anatomy_bit(name: str) -> np.uint8 | None:
    if name == "lung":
        return LUNG
    if name == "body":
        return BODY
    if name in ("none", "", None):
        return None
    raise DicomInputError("options", f"unknown anatomy filter {name!r} (lung | body | none)")


@dataclass
class SlabFindings:
    """Kept detections of a slab as arrays (by slice, then descending score within a slice)."""

    slice_index: np.ndarray  # int64 [K]
    boxes_px: np.ndarray  # float64 [K, 4] original pixels
    boxes_mm: np.ndarray  # float64 [K, 4] in-plane mm (NaN without PixelSpacing)
    scores: np.ndarray  # float32 [K]
    classes: np.ndarray  # int32 [K]
    mean_hu: np.ndarray  # float32 [K] (NaN when not CT)
    diameter_mm: np.ndarray  # float64 [K] (NaN without PixelSpacing)
    centres_mm: np.ndarray  # float64 [K, 3] patient LPS (NaN rows where the geometry is unknown)
    meta: SlabMeta

    def __len__(self) -> int:
        return int(self.slice_index.size)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The ensemble's output tensors (docs/contracts.md); equal to ``detections_to_arrays(self.detections())``."""
        return {
            "boxes_px": self.boxes_px.astype(np.float32).reshape(-1, 4),
            "boxes_mm": self.boxes_mm.astype(np.float32).reshape(-1, 4),
            "scores": self.scores.astype(np.float32),
            "classes": self.classes.astype(np.int32),
            "slice_index": self.slice_index.astype(np.int32),
            "sop_instance_uid": np.array([self.meta.uid(int(i)).encode() for i in self.slice_index], dtype=object),
            "mean_hu": self.mean_hu.astype(np.float32),
        }

    def detections(self) -> list[Detection]:
        frame = self.meta.info[:, 5]
        known = np.all(np.isfinite(self.centres_mm), axis=1)
        out = []
        for j in range(len(self)):
            i = int(self.slice_index[j])
            out.append(
                Detection(
                    slice_index=i,
                    sop_instance_uid=self.meta.uid(i),
                    box_px=tuple(float(v) for v in self.boxes_px[j]),  # type: ignore[arg-type]
                    box_mm=tuple(float(v) for v in self.boxes_mm[j]),  # type: ignore[arg-type]
                    score=float(self.scores[j]),
                    class_id=int(self.classes[j]),
                    mean_hu=float(self.mean_hu[j]),
                    diameter_mm=float(self.diameter_mm[j]),
                    centre_mm=tuple(float(v) for v in self.centres_mm[j]) if known[j] else None,  # type: ignore[arg-type]
                    frame_index=int(frame[i]),
                )
            )
        return out


def postprocess_findings(
    scores: np.ndarray,
    boxes: np.ndarray,
    slab_meta: SlabMeta | Mapping[str, np.ndarray],
    options: Options | None = None,
) -> SlabFindings:
    """Detector output (model-input pixels) -> kept detections in original pixels and mm, as arrays.

    Per slice, vectorised over the slab: score threshold + class-aware NMS, back through the
    letterbox, size filter in mm (skipped where PixelSpacing is unknown), anatomical filter on the
    box centre / overlap (CT only), mean HU over the box's central half, LPS centre where position /
    orientation are known.
    """
    options = options or Options()
    meta = slab_meta if isinstance(slab_meta, SlabMeta) else SlabMeta.from_arrays(slab_meta)
    scores = np.asarray(scores, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    if scores.ndim == 2:
        scores = scores[..., None]
    n = len(meta)
    if scores.ndim != 3 or boxes.shape != (*scores.shape[:2], 4) or scores.shape[0] != n:
        raise DicomInputError("postprocess", f"scores {scores.shape} / boxes {boxes.shape} do not fit {n} slices")

    sl, kb, ks, kc = batched_threshold_nms(
        scores, boxes, options.score_threshold, options.nms_iou, options.max_detections, options.class_aware_nms
    )
    slices, first, count = np.unique(sl, return_index=True, return_counts=True)  # boxes come grouped by slice
    slot = np.repeat(np.arange(slices.size), count)  # each box's row among the slices that have boxes
    orig = np.empty(kb.shape, dtype=np.float64)
    lo_boxes = np.empty(kb.shape, dtype=np.float64)
    for i, a, c in zip(slices.tolist(), first.tolist(), count.tolist(), strict=True):  # the letterbox maths stays in one place
        t = meta.transform(i)
        o = t.to_original(kb[a : a + c])
        o[:, 0::2] = np.clip(o[:, 0::2], 0, t.src_w)
        o[:, 1::2] = np.clip(o[:, 1::2], 0, t.src_h)
        orig[a : a + c] = o
        lo_boxes[a : a + c] = meta.lowres_transform(i).to_model(o)

    spacing = meta.spacing[slices].astype(np.float64)
    has_spacing = np.all(np.isfinite(spacing) & (spacing > 0), axis=1)
    row_sp, col_sp = spacing[slot, 0], spacing[slot, 1]
    w_mm, h_mm = (orig[:, 2] - orig[:, 0]) * col_sp, (orig[:, 3] - orig[:, 1]) * row_sp
    diam = np.maximum(w_mm, h_mm)
    keep = ~has_spacing[slot] | ((diam >= options.min_size_mm) & (diam <= options.max_size_mm))

    is_ct = meta.info[slices, 4].astype(bool)
    for cls in np.unique(kc):
        bit = _anatomy_bit(options.anatomy_for(int(cls)))
        sel = np.flatnonzero((kc == cls) & is_ct[slot] & keep)
        if bit is None or sel.size == 0:
            continue
        mask = (meta.anatomy[slices] & bit) > 0
        keep[sel] &= plausible_in_mask(mask, lo_boxes[sel], min_overlap=options.anatomy_min_overlap, which=slot[sel])

    sl, slot, orig, lo_boxes, ks, kc = sl[keep], slot[keep], orig[keep], lo_boxes[keep], ks[keep], kc[keep]
    mean_hu = np.full(ks.size, np.nan, np.float32)
    ct = is_ct[slot]
    if ct.any():
        mean_hu[ct] = mean_in_boxes(meta.hu, lo_boxes[ct], which=sl[ct])
    spaced = has_spacing[slot]
    row_sp, col_sp = np.where(spaced, spacing[slot, 0], np.nan), np.where(spaced, spacing[slot, 1], np.nan)
    box_mm = np.stack([orig[:, 0] * col_sp, orig[:, 1] * row_sp, orig[:, 2] * col_sp, orig[:, 3] * row_sp], axis=1)
    diam = np.maximum((orig[:, 2] - orig[:, 0]) * col_sp, (orig[:, 3] - orig[:, 1]) * row_sp)
    pos = meta.position[sl].astype(np.float64)
    iop = meta.orientation[sl].astype(np.float64)
    cx, cy = (orig[:, 0] + orig[:, 2]) / 2, (orig[:, 1] + orig[:, 3]) / 2
    centres = pos + (cx * col_sp)[:, None] * iop[:, :3] + (cy * row_sp)[:, None] * iop[:, 3:]
    centres[~(spaced & np.all(np.isfinite(pos), axis=1) & np.all(np.isfinite(iop), axis=1))] = np.nan
    return SlabFindings(sl, orig, box_mm, ks, kc, mean_hu, diam, centres, meta)


def postprocess_slab(
    scores: np.ndarray,
    boxes: np.ndarray,
    slab_meta: SlabMeta | Mapping[str, np.ndarray],
    options: Options | None = None,
) -> list[Detection]:
    """Detector output (model-input pixels) -> detections in original pixels and mm, filtered
    (``postprocess_findings`` as ``Detection`` objects)."""
    return postprocess_findings(scores, boxes, slab_meta, options).detections()


FINDING_TENSORS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("boxes_px", "float32", (-1, 4)),
    ("boxes_mm", "float32", (-1, 4)),
    ("scores", "float32", (-1,)),
    ("classes", "int32", (-1,)),
    ("slice_index", "int32", (-1,)),
    ("sop_instance_uid", "bytes", (-1,)),
    ("mean_hu", "float32", (-1,)),
)


def detections_to_arrays(detections: Sequence[Detection]) -> dict[str, np.ndarray]:
    """The ensemble's output tensors (docs/contracts.md), one row per detection."""
    return {
        "boxes_px": np.array([d.box_px for d in detections], dtype=np.float32).reshape(-1, 4),
        "boxes_mm": np.array([d.box_mm for d in detections], dtype=np.float32).reshape(-1, 4),
        "scores": np.array([d.score for d in detections], dtype=np.float32),
        "classes": np.array([d.class_id for d in detections], dtype=np.int32),
        "slice_index": np.array([d.slice_index for d in detections], dtype=np.int32),
        "sop_instance_uid": np.array([d.sop_instance_uid.encode() for d in detections], dtype=object),
        "mean_hu": np.array([d.mean_hu for d in detections], dtype=np.float32),
    }


def detections_from_arrays(arrays: Mapping[str, np.ndarray]) -> list[Detection]:
    """Inverse of ``detections_to_arrays`` (the client side of the ensemble outputs)."""
    uids = [u.decode() if isinstance(u, bytes) else str(u) for u in np.asarray(arrays["sop_instance_uid"]).ravel()]
    bpx = np.asarray(arrays["boxes_px"], dtype=np.float64).reshape(-1, 4)
    bmm = np.asarray(arrays["boxes_mm"], dtype=np.float64).reshape(-1, 4)
    out = []
    for j, uid in enumerate(uids):
        w, h = bmm[j, 2] - bmm[j, 0], bmm[j, 3] - bmm[j, 1]
        out.append(
            Detection(
                slice_index=int(arrays["slice_index"][j]),
                sop_instance_uid=uid,
                box_px=tuple(float(v) for v in bpx[j]),  # type: ignore[arg-type]
                box_mm=tuple(float(v) for v in bmm[j]),  # type: ignore[arg-type]
                score=float(arrays["scores"][j]),
                class_id=int(arrays["classes"][j]),
                mean_hu=float(arrays["mean_hu"][j]),
                diameter_mm=float(max(w, h)),
            )
        )
    return out
