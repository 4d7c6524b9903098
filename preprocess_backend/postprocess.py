"""Detector output -> kept boxes: score threshold, class-aware NMS, size (mm) and anatomy filters.

All vectorised over anchors and over the slices of a slab: NMS builds one padded IoU tensor per
chunk of slices and its greedy loop runs once per rank for all of them.
"""

from __future__ import annotations

import numpy as np

PRE_NMS_TOP_K = 1000  # candidates entering NMS, highest scores first


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box [4] with many [M, 4]."""
    ix1 = np.maximum(box[0], boxes[:, 0])
    iy1 = np.maximum(box[1], boxes[:, 1])
    ix2 = np.minimum(box[2], boxes[:, 2])
    iy2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [N, M] of xyxy boxes."""
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


NMS_CHUNK_ELEMENTS = 1 << 21  # IoU entries computed at once (slices x K x K): bounds the memory


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int) -> np.ndarray:
    """Greedy NMS; returns indices into ``boxes`` in descending score order."""
    order = np.argsort(-scores, kind="stable")
    keep = _greedy(boxes[order][None], np.ones((1, order.size), dtype=bool), iou_threshold, max_keep)[0]
    return order[keep].astype(np.int64)


def _batched_iou(b: np.ndarray) -> np.ndarray:
    """[S, K, 4] xyxy -> [S, K, K] IoU within each slice (the arithmetic of ``box_iou``, float32)."""
    ix1 = np.maximum(b[:, :, None, 0], b[:, None, :, 0])
    iy1 = np.maximum(b[:, :, None, 1], b[:, None, :, 1])
    ix2 = np.minimum(b[:, :, None, 2], b[:, None, :, 2])
    iy2 = np.minimum(b[:, :, None, 3], b[:, None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (b[:, :, 2] - b[:, :, 0]) * (b[:, :, 3] - b[:, :, 1])
    return inter / np.maximum(area[:, :, None] + area[:, None, :] - inter, 1e-9)


def _greedy(boxes: np.ndarray, valid: np.ndarray, iou_threshold: float, max_keep: int) -> np.ndarray:
    """bool [S, K] kept by greedy NMS, each slice's boxes already in descending score order.

    One pass over rank j serves every slice at once: the IoU rows of the box kept at rank j suppress
    the later boxes of its slice. Keeping the first ``max_keep`` survivors equals stopping there.
    """
    s, k = valid.shape
    keep = np.zeros((s, k), dtype=bool)
    step = max(1, NMS_CHUNK_ELEMENTS // max(1, k * k))
    for c0 in range(0, s, step):
        iou = _batched_iou(boxes[c0 : c0 + step])
        suppressed = ~valid[c0 : c0 + step]
        kept = keep[c0 : c0 + step]
        for j in range(k):
            live = ~suppressed[:, j]
            if not live.any():
                continue
            kept[:, j] = live
            suppressed |= live[:, None] & (iou[:, j, :] > iou_threshold)
    keep &= np.cumsum(keep, axis=1) <= max_keep
    return keep


def batched_threshold_nms(
    scores: np.ndarray,
    boxes: np.ndarray,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.2,
    max_detections: int = 100,
    class_aware: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every image of a batch: scores [N, A, C], boxes [N, A, 4] -> kept (image [K] int64, boxes
    [K, 4], scores [K], classes [K] int32), by image, then descending score within each image.

    Per image exactly ``threshold_nms``: every (anchor, class) pair above the threshold is a candidate
    (the best ``PRE_NMS_TOP_K`` where there are more), class-aware NMS offsets each class's boxes so
    boxes of different classes never overlap; the greedy suppression runs for all images at once.
    """
    scores = np.asarray(scores, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    empty = (np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
    img, anchor, cls = np.nonzero(scores > np.float32(score_threshold))
    if img.size == 0:
        return empty
    cand_scores = scores[img, anchor, cls]
    counts = np.bincount(img, minlength=scores.shape[0])
    if counts.max() > PRE_NMS_TOP_K:  # those images keep their best candidates, in argpartition order
        starts = np.concatenate([[0], np.cumsum(counts)])
        parts = []
        for i in np.flatnonzero(counts):
            lo, hi = int(starts[i]), int(starts[i + 1])
            if hi - lo > PRE_NMS_TOP_K:
                parts.append(lo + np.argpartition(-cand_scores[lo:hi], PRE_NMS_TOP_K)[:PRE_NMS_TOP_K])
            else:
                parts.append(np.arange(lo, hi))
        sel = np.concatenate(parts)
        img, anchor, cls, cand_scores = img[sel], anchor[sel], cls[sel], cand_scores[sel]
    cand_boxes = boxes[img, anchor]
    finite = np.all(np.isfinite(cand_boxes), axis=1) & np.isfinite(cand_scores)
    if not finite.all():
        img, cls, cand_boxes, cand_scores = img[finite], cls[finite], cand_boxes[finite], cand_scores[finite]
    if img.size == 0:
        return empty
    shifted = cand_boxes
    if class_aware and scores.shape[2] > 1:
        peak = np.zeros(scores.shape[0], dtype=np.float32)
        np.maximum.at(peak, img, np.abs(cand_boxes).max(axis=1))
        offset = (peak.astype(np.float64) * 2.0 + 1.0).astype(np.float32)  # per image, as float(max) * 2 + 1
        shifted = cand_boxes + (cls.astype(np.float32) * offset[img])[:, None]
    order = np.argsort(-cand_scores, kind="stable")
    order = order[np.argsort(img[order], kind="stable")]  # by image, then score (ties: candidate order)
    img, cls, cand_boxes, cand_scores, shifted = img[order], cls[order], cand_boxes[order], cand_scores[order], shifted[order]
    images, first, per = np.unique(img, return_index=True, return_counts=True)
    k = int(per.max())
    slot = np.repeat(np.arange(images.size), per)
    rank = np.arange(img.size) - np.repeat(first, per)
    padded = np.zeros((images.size, k, 4), dtype=np.float32)
    padded[slot, rank] = shifted
    valid = np.zeros((images.size, k), dtype=bool)
    valid[slot, rank] = True
    keep = _greedy(padded, valid, iou_threshold, max_detections)[slot, rank]
    return img[keep].astype(np.int64), cand_boxes[keep], cand_scores[keep], cls[keep].astype(np.int32)


def threshold_nms(
    scores: np.ndarray,
    boxes: np.ndarray,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.2,
    max_detections: int = 100,
    class_aware: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: scores [A, C], boxes [A, 4] xyxy -> (boxes [K, 4], scores [K], classes [K] int32)."""
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim == 1:
        scores = scores[:, None]
    _, kb, ks, kc = batched_threshold_nms(scores[None], np.asarray(boxes)[None], score_threshold, iou_threshold, max_detections, class_aware)
    return kb, ks, kc


def box_sizes_mm(boxes_px: np.ndarray, pixel_spacing: tuple[float, float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(width mm, height mm) of xyxy pixel boxes; PixelSpacing is (row spacing, column spacing)."""
    row_sp, col_sp = float(pixel_spacing[0]), float(pixel_spacing[1])
    return (boxes_px[:, 2] - boxes_px[:, 0]) * col_sp, (boxes_px[:, 3] - boxes_px[:, 1]) * row_sp


def size_filter(
    boxes_px: np.ndarray, pixel_spacing: tuple[float, float] | np.ndarray, min_mm: float = 3.0, max_mm: float = 30.0
) -> np.ndarray:
    """bool [K]: the box's larger side is within [min_mm, max_mm] (nodules 3-30 mm; larger is a mass)."""
    w, h = box_sizes_mm(boxes_px, pixel_spacing)
    d = np.maximum(w, h)
    return (d >= min_mm) & (d <= max_mm)


def centres_inside(mask: np.ndarray, boxes: np.ndarray, tolerance_px: int = 1, which: np.ndarray | None = None) -> np.ndarray:
    """bool [K]: box centre (in ``mask`` pixel coordinates) lies in ``mask`` or within ``tolerance_px`` of it.

    ``mask`` [h, w], or [S, h, w] with ``which`` [K] naming each box's slice.
    """
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    stack = mask[None] if mask.ndim == 2 else mask
    which = np.zeros(boxes.shape[0], dtype=np.int64) if which is None else which
    h, w = stack.shape[1:]
    cx = np.clip(np.floor((boxes[:, 0] + boxes[:, 2]) / 2).astype(np.int64), 0, w - 1)
    cy = np.clip(np.floor((boxes[:, 1] + boxes[:, 3]) / 2).astype(np.int64), 0, h - 1)
    t = tolerance_px
    out = np.zeros(boxes.shape[0], dtype=bool)
    for dy in range(-t, t + 1):  # (2t+1)^2 lookups of K points: cheaper than dilating the mask
        for dx in range(-t, t + 1):
            out |= stack[which, np.clip(cy + dy, 0, h - 1), np.clip(cx + dx, 0, w - 1)]
    return out


def plausible_in_mask(
    mask: np.ndarray, boxes: np.ndarray, tolerance_px: int = 1, min_overlap: float = 0.1, which: np.ndarray | None = None
) -> np.ndarray:
    """bool [K]: the anatomical plausibility test of a box against ``mask`` (mask pixel coordinates).

    A box passes when its centre is in the mask (within ``tolerance_px``) or the mask covers at
    least ``min_overlap`` of the box. The second rule keeps juxtapleural nodules: a solid nodule
    touching the pleura is excluded from an HU-threshold lung mask like the chest wall, so its
    centre lies outside the lung while part of its box is lung. ``mask`` may be a stack [S, h, w]
    with ``which`` [K] naming each box's slice.
    """
    inside = centres_inside(mask, boxes, tolerance_px, which)
    if min_overlap <= 0 or boxes.shape[0] == 0:
        return inside
    return inside | (mean_in_boxes(mask.astype(bool), boxes, shrink=1.0, which=which) >= min_overlap)


def summed_area(values: np.ndarray) -> np.ndarray:
    """float64 [..., h + 1, w + 1] summed-area tables of [..., h, w] (one per slice of a stack)."""
    sat = np.zeros((*values.shape[:-2], values.shape[-2] + 1, values.shape[-1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(values, axis=-2, dtype=np.float64), axis=-1, out=sat[..., 1:, 1:])
    return sat


DIRECT_SUM_ELEMENTS = 1 << 20  # gathered pixels up to which integer box sums skip the summed-area table


def mean_in_boxes(values: np.ndarray, boxes: np.ndarray, shrink: float = 0.5, which: np.ndarray | None = None) -> np.ndarray:
    """Mean of ``values`` [h, w] over the central ``shrink`` fraction of each box (at least one pixel).

    The centre half of a nodule's box is mostly nodule, so its mean HU says solid vs ground-glass
    without the surrounding lung pulling it down. ``values`` may be a stack [S, h, w] with ``which``
    [K] naming each box's slice. Integer / bool values (HU, masks) are summed straight from the
    pixels the boxes cover (exact, like the float64 summed-area table, and far cheaper than building
    one for a few boxes); other values, or very many pixels, go through ``summed_area``: O(1) per box.
    """
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    stack = values[None] if values.ndim == 2 else values
    which = np.zeros(boxes.shape[0], dtype=np.int64) if which is None else np.asarray(which, dtype=np.int64)
    x1, y1, x2, y2 = _box_window(boxes, shrink, stack.shape[1], stack.shape[2])
    hmax, wmax = int((y2 - y1).max()), int((x2 - x1).max())
    if stack.dtype.kind in "biu" and boxes.shape[0] * hmax * wmax <= DIRECT_SUM_ELEMENTS:
        ys = y1[:, None] + np.arange(hmax)  # [K, hmax], rows past a box's end are masked out
        xs = x1[:, None] + np.arange(wmax)
        inside = (ys < y2[:, None])[:, :, None] & (xs < x2[:, None])[:, None, :]
        px = stack[which[:, None, None], np.minimum(ys, stack.shape[1] - 1)[:, :, None], np.minimum(xs, stack.shape[2] - 1)[:, None, :]]
        total = np.where(inside, px, 0).sum(axis=(1, 2), dtype=np.int64).astype(np.float64)
    else:
        sat = summed_area(stack)
        total = sat[which, y2, x2] - sat[which, y1, x2] - sat[which, y2, x1] + sat[which, y1, x1]
    return (total / ((x2 - x1) * (y2 - y1))).astype(np.float32)


def _box_window(boxes: np.ndarray, shrink: float, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel rectangle [x1, x2) x [y1, y2) of each box's central ``shrink`` fraction, at least one pixel."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    hw = np.maximum((boxes[:, 2] - boxes[:, 0]) * shrink / 2, 0.5)
    hh = np.maximum((boxes[:, 3] - boxes[:, 1]) * shrink / 2, 0.5)
    x1 = np.clip(np.floor(cx - hw + 0.5), 0, w - 1).astype(np.int64)
    y1 = np.clip(np.floor(cy - hh + 0.5), 0, h - 1).astype(np.int64)
    x2 = np.clip(np.floor(cx + hw + 0.5), x1 + 1, w).astype(np.int64)
    y2 = np.clip(np.floor(cy + hh + 0.5), y1 + 1, h).astype(np.int64)
    return x1, y1, x2, y2
