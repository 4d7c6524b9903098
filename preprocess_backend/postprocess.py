"""Detector output -> kept boxes: score threshold, class-aware NMS, size (mm) and anatomy filters.

All vectorised over anchors; the only Python loop in NMS runs once per *kept* box (<= max_detections).
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


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int) -> np.ndarray:
    """Greedy NMS; returns indices into ``boxes`` in descending score order."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_keep:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        order = rest[box_iou(boxes[i], boxes[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def threshold_nms(
    scores: np.ndarray,
    boxes: np.ndarray,
    score_threshold: float = 0.3,
    iou_threshold: float = 0.2,
    max_detections: int = 100,
    class_aware: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: scores [A, C], boxes [A, 4] xyxy -> (boxes [K, 4], scores [K], classes [K] int32).

    Every (anchor, class) pair above the threshold is a candidate; class-aware NMS offsets each
    class's boxes so boxes of different classes never overlap (one NMS call for all classes).
    """
    scores = np.asarray(scores, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    if scores.ndim == 1:
        scores = scores[:, None]
    anchor, cls = np.nonzero(scores > np.float32(score_threshold))
    if anchor.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32)
    cand_scores = scores[anchor, cls]
    if cand_scores.size > PRE_NMS_TOP_K:
        top = np.argpartition(-cand_scores, PRE_NMS_TOP_K)[:PRE_NMS_TOP_K]
        anchor, cls, cand_scores = anchor[top], cls[top], cand_scores[top]
    cand_boxes = boxes[anchor].astype(np.float32)
    finite = np.all(np.isfinite(cand_boxes), axis=1) & np.isfinite(cand_scores)
    cand_boxes, cand_scores, cls = cand_boxes[finite], cand_scores[finite], cls[finite]
    shifted = cand_boxes
    if class_aware and scores.shape[1] > 1:
        offset = float(np.abs(cand_boxes).max(initial=0.0)) * 2.0 + 1.0
        shifted = cand_boxes + (cls.astype(np.float32) * np.float32(offset))[:, None]
    keep = nms(shifted, cand_scores, iou_threshold, max_detections)
    return cand_boxes[keep], cand_scores[keep], cls[keep].astype(np.int32)


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


def centres_inside(mask: np.ndarray, boxes: np.ndarray, tolerance_px: int = 1) -> np.ndarray:
    """bool [K]: box centre (in ``mask`` pixel coordinates) lies in ``mask`` or within ``tolerance_px`` of it."""
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    h, w = mask.shape
    cx = np.clip(np.floor((boxes[:, 0] + boxes[:, 2]) / 2).astype(np.int64), 0, w - 1)
    cy = np.clip(np.floor((boxes[:, 1] + boxes[:, 3]) / 2).astype(np.int64), 0, h - 1)
    t = tolerance_px
    out = np.zeros(boxes.shape[0], dtype=bool)
    for dy in range(-t, t + 1):  # (2t+1)^2 lookups of K points: cheaper than dilating the mask
        for dx in range(-t, t + 1):
            out |= mask[np.clip(cy + dy, 0, h - 1), np.clip(cx + dx, 0, w - 1)]
    return out


def plausible_in_mask(mask: np.ndarray, boxes: np.ndarray, tolerance_px: int = 1, min_overlap: float = 0.1) -> np.ndarray:
    """bool [K]: the anatomical plausibility test of a box against ``mask`` (mask pixel coordinates).

    A box passes when its centre is in the mask (within ``tolerance_px``) or the mask covers at
    least ``min_overlap`` of the box. The second rule keeps juxtapleural nodules: a solid nodule
    touching the pleura is excluded from an HU-threshold lung mask like the chest wall, so its
    centre lies outside the lung while part of its box is lung.
    """
    inside = centres_inside(mask, boxes, tolerance_px)
    if min_overlap <= 0 or boxes.shape[0] == 0:
        return inside
    return inside | (mean_in_boxes(mask.astype(np.float32), boxes, shrink=1.0) >= min_overlap)


def mean_in_boxes(values: np.ndarray, boxes: np.ndarray, shrink: float = 0.5) -> np.ndarray:
    """Mean of ``values`` [h, w] over the central ``shrink`` fraction of each box (at least one pixel).

    The centre half of a nodule's box is mostly nodule, so its mean HU says solid vs ground-glass
    without the surrounding lung pulling it down. Summed-area table: O(1) per box.
    """
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    h, w = values.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.float64)
    np.cumsum(np.cumsum(values, axis=0, dtype=np.float64), axis=1, out=sat[1:, 1:])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    hw = np.maximum((boxes[:, 2] - boxes[:, 0]) * shrink / 2, 0.5)
    hh = np.maximum((boxes[:, 3] - boxes[:, 1]) * shrink / 2, 0.5)
    x1 = np.clip(np.floor(cx - hw + 0.5), 0, w - 1).astype(np.int64)
    y1 = np.clip(np.floor(cy - hh + 0.5), 0, h - 1).astype(np.int64)
    x2 = np.clip(np.floor(cx + hw + 0.5), x1 + 1, w).astype(np.int64)
    y2 = np.clip(np.floor(cy + hh + 0.5), y1 + 1, h).astype(np.int64)
    total = sat[y2, x2] - sat[y1, x2] - sat[y2, x1] + sat[y1, x1]
    return (total / ((x2 - x1) * (y2 - y1))).astype(np.float32)
