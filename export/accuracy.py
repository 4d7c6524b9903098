"""Accuracy cost of a converted detector (INT8, FP16 engine) against its FP32 ONNX reference.

Two levels: raw outputs (score / box differences per anchor) and detections after the serving
postprocess's threshold + NMS (greedy one-to-one matching by IoU). The dataset-level mAP / CPM
comparison belongs to damoyolo's evaluation (training issue); ``compare_detections`` is the hook
that holds until then and stays useful afterwards as a cheap regression check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocess_backend.postprocess import pairwise_iou, threshold_nms
from preprocess_backend.types import Options

INPUT_NAME = "images"


@dataclass
class OutputError:
    """Per-anchor differences of test vs reference outputs."""

    score_max_abs: float
    score_mean_abs: float
    box_max_abs_px: float  # over anchors the reference scores >= ``box_score_floor``
    box_mean_abs_px: float

    def scalar(self, size: int) -> float:
        """One number for ranking (sensitivity sweep): score MAE + box MAE relative to the input size."""
        return self.score_mean_abs + self.box_mean_abs_px / max(size, 1)


@dataclass
class DetectionAgreement:
    """How far the test model's detections are from the reference's on the same slices."""

    slices: int
    output: OutputError
    reference_detections: int
    test_detections: int
    matched: int  # one-to-one pairs with IoU >= match_iou and the same class
    recall: float  # matched / reference detections (1.0 when both are empty)
    precision: float  # matched / test detections
    f1: float
    mean_iou: float  # over matched pairs (nan if none)
    mean_abs_score_diff: float  # over matched pairs (nan if none)
    identical: bool  # same count, every pair matched with IoU >= 0.99 and |score diff| <= 1e-3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(sess: Any, images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N, A, C], boxes [N, A, 4]) of an ONNX detector session, in batches."""
    scores, boxes = [], []
    for i in range(0, len(images), batch_size):
        s, b = sess.run(["scores", "boxes"], {INPUT_NAME: np.ascontiguousarray(images[i : i + batch_size], np.float32)})
        scores.append(s)
        boxes.append(b)
    return np.concatenate(scores), np.concatenate(boxes)


def output_error(
    ref: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], box_score_floor: float = 0.05
) -> OutputError:
    ds = np.abs(ref[0] - test[0])
    # Boxes of anchors nobody would keep are irrelevant and can legitimately differ a lot.
    confident = ref[0].max(axis=-1) >= box_score_floor
    db = np.abs(ref[1] - test[1])[confident]
    return OutputError(
        score_max_abs=float(ds.max()),
        score_mean_abs=float(ds.mean()),
        box_max_abs_px=float(db.max()) if db.size else 0.0,
        box_mean_abs_px=float(db.mean()) if db.size else 0.0,
    )


def _match(ref: tuple[np.ndarray, ...], test: tuple[np.ndarray, ...], match_iou: float) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching, best IoU first, same class only."""
    if len(ref[1]) == 0 or len(test[1]) == 0:
        return []
    iou = pairwise_iou(ref[0], test[0])
    iou[ref[2][:, None] != test[2][None, :]] = 0.0
    pairs = []
    while True:
        i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
        if iou[i, j] < match_iou:
            return pairs
        pairs.append((int(i), int(j), float(iou[i, j])))
        iou[i, :] = 0.0
        iou[:, j] = 0.0


def agreement(
    ref: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    options: Options | None = None,
    match_iou: float = 0.5,
) -> DetectionAgreement:
    """Compare two detectors' raw outputs on the same slices, then their thresholded + NMS'd detections."""
    options = options or Options()
    n_ref = n_test = 0
    ious: list[float] = []
    score_diffs: list[float] = []
    identical = True
    for i in range(len(ref[0])):
        a = threshold_nms(ref[0][i], ref[1][i], options.score_threshold, options.nms_iou, options.max_detections, options.class_aware_nms)
        b = threshold_nms(test[0][i], test[1][i], options.score_threshold, options.nms_iou, options.max_detections, options.class_aware_nms)
        n_ref += len(a[1])
        n_test += len(b[1])
        pairs = _match(a, b, match_iou)
        ious.extend(p[2] for p in pairs)
        diffs = [abs(float(a[1][p[0]]) - float(b[1][p[1]])) for p in pairs]
        score_diffs.extend(diffs)
        if len(a[1]) != len(b[1]) or len(pairs) != len(a[1]) or any(p[2] < 0.99 for p in pairs) or any(d > 1e-3 for d in diffs):
            identical = False
    matched = len(ious)
    recall = matched / n_ref if n_ref else 1.0
    precision = matched / n_test if n_test else 1.0
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return DetectionAgreement(
        slices=len(ref[0]),
        output=output_error(ref, test),
        reference_detections=n_ref,
        test_detections=n_test,
        matched=matched,
        recall=recall,
        precision=precision,
        f1=f1,
        mean_iou=float(np.mean(ious)) if ious else float("nan"),
        mean_abs_score_diff=float(np.mean(score_diffs)) if score_diffs else float("nan"),
        identical=identical,
    )


def compare_detections(
    fp32_onnx: Path,
    int8_onnx: Path,
    series_dirs: Sequence[Path],
    options: Options | None = None,
    slices_per_series: int = 16,
    match_iou: float = 0.5,
    progress: bool = False,
) -> DetectionAgreement:
    """INT8 vs FP32 on held-out DICOM series (slices drawn through preprocess_backend, as in serving)."""
    from ctlesion_export.calibration import load_images
    from ctlesion_export.onnx_export import inspect_onnx

    options = options or Options()
    info = inspect_onnx(Path(fp32_onnx))
    if options.model_size != info.height or options.k != info.channels:
        from dataclasses import replace

        options = replace(options, model_size=info.height, k=info.channels)
    images = load_images(series_dirs, options, slices_per_series, progress)
    ref = run(session(fp32_onnx), images)
    test = run(session(int8_onnx), images)
    return agreement(ref, test, options, match_iou)
