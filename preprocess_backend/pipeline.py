"""The two halves the Triton Python models call: ``preprocess_slab`` and ``postprocess_slab``.

preprocess: DICOM items (any order) -> decode each once -> series order -> window -> letterbox ->
2.5D stack -> ``Slab`` (model images + a few small per-slice metadata arrays).
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
from preprocess_backend.letterbox import LetterboxTransform, block_mean, letterbox, resize
from preprocess_backend.masks import BODY, LUNG, anatomy_mask
from preprocess_backend.postprocess import (
    box_sizes_mm,
    mean_in_boxes,
    plausible_in_mask,
    size_filter,
    threshold_nms,
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

    _FIELDS = ("info", "spacing", "position", "orientation", "sop_uid", "hu", "anatomy")

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
        return LetterboxTransform.fit(rows, cols, size)

    def lowres_transform(self, i: int) -> LetterboxTransform:
        rows, cols, size, f = (int(v) for v in self.info[i, :4])
        return LetterboxTransform.fit(rows, cols, size // f)


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


def decode_items(dicom_items: Sequence[bytes], options: Options, contract: ModelContract | None = None) -> list[DecodedSlice]:
    """Decode each item exactly once; errors name the SOPInstanceUID, or the item number if unreadable."""
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
            slices.extend(decode_frames(item, None, limits, contract=contract))
        except DicomInputError as exc:
            if exc.source.startswith("<"):  # nothing better than a byte count: add the item number
                raise type(exc)(f"item {i} {exc.source}", exc.reason) from None
            raise
        if len(slices) > limits.max_slices:
            raise LimitExceeded("request", f"more than {limits.max_slices} slices (multi-frame items)")
    return slices


def _lowres_hu(hu: np.ndarray, t: LetterboxTransform, f: int) -> np.ndarray:
    """float32 [Z, s, s] HU on the letterboxed grid of size ``size // f``."""
    lo = LetterboxTransform.fit(t.src_h, t.src_w, t.size // f)
    if t.is_identity and t.src_h % f == 0 and t.src_w % f == 0:
        return block_mean(hu, f)  # the common 512 -> 512 case: exact 4 x 4 means
    out = np.full((hu.shape[0], lo.size, lo.size), AIR_HU, dtype=np.float32)
    out[:, lo.pad_y : lo.pad_y + lo.new_h, lo.pad_x : lo.pad_x + lo.new_w] = resize(hu, lo.new_h, lo.new_w)
    return out


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
    z = len(ordered)
    h, w = ordered[0].hu.shape
    size = options.model_size
    t = LetterboxTransform.fit(h, w, size)
    uint8 = np.dtype(options.image_dtype) == np.uint8
    if options.image_dtype not in ("float32", "uint8"):
        raise DicomInputError("options", f"image_dtype must be float32 or uint8, not {options.image_dtype!r}")

    # Window to integers 0..255 in both dtypes, so float32 training and uint8 serving see the same values.
    if t.is_identity:
        windowed = np.empty((z, h, w), dtype=np.uint8)
        for i, s in enumerate(ordered):
            windowed[i] = window_slice(s, options.window, options.window_function, dtype=np.uint8)
    else:
        full = np.empty((z, h, w), dtype=np.float32)
        for i, s in enumerate(ordered):
            window_slice(s, options.window, options.window_function, out=full[i])
        boxed, _ = letterbox(full, size)
        boxed += np.float32(0.5)
        np.clip(boxed, 0, 255, out=boxed)
        windowed = boxed.astype(np.uint8)

    idx = stack_indices(z, options.k)
    images = np.empty((z, options.k, size, size), dtype=np.uint8 if uint8 else np.float32)
    for c in range(options.k):  # one gather + cast per channel, straight into the output
        images[:, c] = windowed[idx[:, c]]

    hu = np.stack([s.hu for s in ordered]) if z > 1 else ordered[0].hu[None]
    hu_lo = _lowres_hu(hu, t, f)
    is_ct = all(s.is_ct for s in ordered)
    anatomy = anatomy_mask(hu_lo) if is_ct else np.zeros(hu_lo.shape, dtype=np.uint8)
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
    )
    return Slab(images=images, meta=meta, report=series.report, series_instance_uid=series.series_instance_uid)


def preprocess_slab(
    dicom_items: Sequence[bytes], options: Options | None = None, contract: ModelContract | None = None
) -> Slab:
    """DICOM Part-10 items of one series (any order) -> model images [N, k, S, S] + slab metadata.

    ``contract``: the served model's input contract (``preprocess_backend.contract``), checked per item.
    """
    options = options or Options()
    return preprocess_decoded(decode_items(dicom_items, options, contract=contract), options)


# ----------------------------------------------------------------------------- postprocess


def _anatomy_bit(name: str) -> np.uint8 | None:
    if name == "lung":
        return LUNG
    if name == "body":
        return BODY
    if name in ("none", "", None):
        return None
    raise DicomInputError("options", f"unknown anatomy filter {name!r} (lung | body | none)")


def postprocess_slab(
    scores: np.ndarray,
    boxes: np.ndarray,
    slab_meta: SlabMeta | Mapping[str, np.ndarray],
    options: Options | None = None,
) -> list[Detection]:
    """Detector output (model-input pixels) -> detections in original pixels and mm, filtered.

    Per slice: score threshold + class-aware NMS, back through the letterbox, size filter in mm
    (skipped where PixelSpacing is unknown), anatomical filter on the box centre (CT only), mean HU
    over the box's central half, LPS centre where position / orientation are known.
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

    candidates = np.nonzero((scores > np.float32(options.score_threshold)).any(axis=(1, 2)))[0]
    out: list[Detection] = []
    for i in candidates:  # only slices with something above threshold
        kb, ks, kc = threshold_nms(
            scores[i], boxes[i], options.score_threshold, options.nms_iou, options.max_detections, options.class_aware_nms
        )
        if ks.size == 0:
            continue
        t = meta.transform(i)
        orig = t.to_original(kb)
        orig[:, 0::2] = np.clip(orig[:, 0::2], 0, t.src_w)
        orig[:, 1::2] = np.clip(orig[:, 1::2], 0, t.src_h)
        spacing = meta.spacing[i].astype(np.float64)
        has_spacing = bool(np.all(np.isfinite(spacing)) and np.all(spacing > 0))
        keep = np.ones(ks.size, dtype=bool)
        if has_spacing:
            keep &= size_filter(orig, spacing, options.min_size_mm, options.max_size_mm)
        is_ct = bool(meta.info[i, 4])
        lo = meta.lowres_transform(i)
        lo_boxes = lo.to_model(orig)
        if is_ct:
            for cls in np.unique(kc):
                bit = _anatomy_bit(options.anatomy_for(int(cls)))
                if bit is None:
                    continue
                sel = kc == cls
                keep[sel] &= plausible_in_mask((meta.anatomy[i] & bit) > 0, lo_boxes[sel], min_overlap=options.anatomy_min_overlap)
        if not keep.any():
            continue
        orig, ks, kc, lo_boxes = orig[keep], ks[keep], kc[keep], lo_boxes[keep]
        mean_hu = mean_in_boxes(meta.hu[i], lo_boxes) if is_ct else np.full(ks.size, np.nan, np.float32)
        if has_spacing:
            w_mm, h_mm = box_sizes_mm(orig, spacing)
            box_mm = np.stack([orig[:, 0] * spacing[1], orig[:, 1] * spacing[0], orig[:, 2] * spacing[1], orig[:, 3] * spacing[0]], axis=1)
            diam = np.maximum(w_mm, h_mm)
        else:
            box_mm = np.full_like(orig, np.nan)
            diam = np.full(ks.size, np.nan)
        pos, iop = meta.position[i].astype(np.float64), meta.orientation[i].astype(np.float64)
        centres = None
        if has_spacing and np.all(np.isfinite(pos)) and np.all(np.isfinite(iop)):
            cx, cy = (orig[:, 0] + orig[:, 2]) / 2, (orig[:, 1] + orig[:, 3]) / 2
            centres = pos + (cx * spacing[1])[:, None] * iop[:3] + (cy * spacing[0])[:, None] * iop[3:]
        uid = meta.uid(i)
        for j in range(ks.size):
            out.append(
                Detection(
                    slice_index=int(i),
                    sop_instance_uid=uid,
                    box_px=tuple(float(v) for v in orig[j]),  # type: ignore[arg-type]
                    box_mm=tuple(float(v) for v in box_mm[j]),  # type: ignore[arg-type]
                    score=float(ks[j]),
                    class_id=int(kc[j]),
                    mean_hu=float(mean_hu[j]),
                    diameter_mm=float(diam[j]),
                    centre_mm=None if centres is None else tuple(float(v) for v in centres[j]),  # type: ignore[arg-type]
                    frame_index=int(meta.info[i, 5]),
                )
            )
    return out


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
