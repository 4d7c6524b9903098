"""Slice-level COCO mAP@0.5 and mAP@.5:.95 (pycocotools) of the detections against the truth boxes."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence

import numpy as np

from ctlesion_phantoms.truth import CaseTruth
from damoyolo.eval.truth_geometry import SeriesTruth, num_slices, truth_slice_boxes
from preprocess_backend.types import Detection


def slice_map(
    predictions: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
) -> dict[str, float]:
    """COCO-style box mAP over slices with pycocotools.

    ``predictions[i]`` = (boxes [P, 4] xyxy, scores [P], classes [P]) and ``ground_truth[i]`` =
    (boxes [M, 4] xyxy, classes [M]) of image i; images without truth still count (their boxes are
    false positives). Returns map50, map50_95 (NaN when there is no truth box at all) and counts.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction images vs {len(ground_truth)} truth images")
    images, anns, dets = [], [], []
    classes: set[int] = set()
    for img_id, ((pb, ps, pc), (gb, gc)) in enumerate(zip(predictions, ground_truth, strict=True), start=1):
        images.append({"id": img_id, "width": 1, "height": 1})
        for box, c in zip(np.asarray(gb, np.float64).reshape(-1, 4), np.asarray(gc).reshape(-1), strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            classes.add(int(c))
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(c), "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
        pbox = np.asarray(pb, np.float64).reshape(-1, 4)
        for box, s, c in zip(pbox, np.asarray(ps).reshape(-1), np.asarray(pc).reshape(-1), strict=True):
            classes.add(int(c))
            dets.append({"image_id": img_id, "category_id": int(c), "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])], "score": float(s)})
    counts = {"images": float(len(images)), "truth_boxes": float(len(anns)), "predictions": float(len(dets))}
    if not anns:
        return {"map50": math.nan, "map50_95": math.nan, **counts}
    if not dets:  # pycocotools' loadRes cannot take an empty list; no prediction means AP 0
        return {"map50": 0.0, "map50_95": 0.0, **counts}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its table
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in sorted(classes)]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats[0] = AP@[.5:.95], stats[1] = AP@.5 (area all, 100 detections per image); -1 means undefined
    return {"map50": max(float(ev.stats[1]), 0.0), "map50_95": max(float(ev.stats[0]), 0.0), **counts}


def slice_map_inputs(
    detections: Sequence[Detection], truth: CaseTruth | SeriesTruth, **truth_kw: float
) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]]]:
    """One image per slice of the series (empty slices included) for ``slice_map``."""
    boxes = truth_slice_boxes(truth, **truth_kw)
    preds, gts = [], []
    by_slice: dict[int, list[Detection]] = {}
    for d in detections:
        by_slice.setdefault(d.slice_index, []).append(d)
    for k in range(num_slices(truth)):
        ds = by_slice.get(k, [])
        preds.append(
            (
                np.array([d.box_px for d in ds], np.float64).reshape(-1, 4),
                np.array([d.score for d in ds], np.float64),
                np.array([d.class_id for d in ds], np.int64),
            )
        )
        gb = boxes.get(k, np.zeros((0, 4)))
        gts.append((gb, np.zeros(len(gb), np.int64)))  # the phantoms have one class: nodule
    return preds, gts

