"""The fast pre / post paths give exactly what the reference (float) paths give.

Reference = the implementation before the fast path, written out here as the oracle: float32 HU per
slice, ``apply_window`` -> uint8, 2.5D gather, ``block_mean`` of the HU stack, ``anatomy_mask``;
per-slice greedy NMS one kept box at a time, per-slice filters. The fast paths are compared
byte for byte (images, low-res HU, masks) and value for value (detections).
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from dicom_factory import Nodule, chest_phantom, phantom_series

from preprocess_backend.letterbox import LetterboxTransform
from preprocess_backend.masks import BODY, LUNG, anatomy_mask
from preprocess_backend.pipeline import (
    SlabMeta,
    _lowres_hu,
    decode_items,
    detections_to_arrays,
    postprocess_findings,
    postprocess_slab,
    preprocess_decoded,
    preprocess_slab,
)
from preprocess_backend.postprocess import PRE_NMS_TOP_K, box_iou, centres_inside, mean_in_boxes, size_filter
from preprocess_backend.series import assemble_series
from preprocess_backend.stacking import stack_indices
from preprocess_backend.types import Detection, Options
from preprocess_backend.windowing import _reference_lut, stored_window_plan, window_slice

SIZE = 256


# ----------------------------------------------------------------------------- windowing


@pytest.mark.parametrize(
    "key",
    [
        ("<u2", 1.0, -1024.0, -600.0, 1500.0, "LINEAR", False),
        ("<i2", 1.0, 0.0, -600.0, 1500.0, "LINEAR", False),
        ("<u2", 1.0, -1024.0, 40.0, 400.0, "LINEAR_EXACT", True),
        ("<u2", 0.5, -1024.0, -600.0, 1500.0, "LINEAR", False),
        ("<i2", 2.5, -7.3, 100.0, 37.0, "LINEAR", False),
        ("<u2", 1.0, -1024.0, -600.0, 1500.0, "SIGMOID", False),
        ("|u1", 1.0, 0.0, 127.5, 256.0, "LINEAR", True),
        ("<u2", 1.0, -1024.0, -600.0, 1.0, "LINEAR", False),
    ],
)
def test_stored_window_plan_equals_float_path_on_every_value(key: tuple) -> None:
    plan = stored_window_plan(*key)
    assert plan is not None
    info = np.iinfo(np.dtype(key[0]))
    every = np.arange(info.min, info.max + 1).astype(np.dtype(key[0])).reshape(-1, 256)
    np.testing.assert_array_equal(plan.apply(every), _reference_lut(every, *key[1:]))


# ----------------------------------------------------------------------------- preprocess


def _reference_preprocess(items: list[bytes], options: Options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8, meta.hu, meta.anatomy) the way the float path computes them."""
    slices = assemble_series(decode_items(items, options)).slices
    windowed = np.stack([window_slice(s, options.window, dtype=np.float32) for s in slices])
    windowed = (windowed + np.float32(0.5)).astype(np.uint8)
    images = windowed[stack_indices(len(slices), options.k)]
    hu = np.stack([s.hu for s in slices])
    h, w = hu.shape[1:]
    lo = _lowres_hu(hu, LetterboxTransform.fit(h, w, options.model_size), options.lowres_factor)
    anatomy = anatomy_mask(lo)
    return images, np.rint(np.clip(lo, -32768, 32767)).astype(np.int16), anatomy


def _with_garbage_bits(item: bytes, seed: int) -> bytes:
    """BitsStored 12 with overlay bits set above it in some pixels (the reference masks them off)."""
    ds = pydicom.dcmread(io.BytesIO(item))
    px = np.frombuffer(ds.PixelData, np.uint16).copy()
    np.clip(px, 0, 4095, out=px)
    px[np.random.default_rng(seed).random(px.size) < 0.01] |= np.uint16(0x9000)
    ds.BitsStored, ds.HighBit, ds.PixelData = 12, 11, px.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _series(kind: str) -> list[bytes]:
    ph = chest_phantom(z=6, size=SIZE, nodules=[Nodule((3, 128, 76), 8, 40.0)], noise=25)
    if kind == "ct":
        return phantom_series(ph, shuffle_seed=3)
    if kind == "signed":
        return phantom_series(ph, signed=True, intercept=0.0)
    if kind == "slope":  # non-integer rescale: the low-res grid falls back to float HU
        return phantom_series(ph, slope=0.5, intercept=-1024.0)
    if kind == "mono1":
        return phantom_series(ph, photometric="MONOCHROME1")
    if kind == "garbage":
        return [_with_garbage_bits(b, i) for i, b in enumerate(phantom_series(ph))]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["ct", "signed", "slope", "mono1", "garbage"])
@pytest.mark.parametrize("window", ["lung", "mediastinum", "-500,1"])
def test_fast_preprocess_equals_reference(kind: str, window: str) -> None:
    items = _series(kind)
    options = Options(model_size=SIZE, image_dtype="uint8", window=window)
    slab = preprocess_slab(items, options)
    images, hu, anatomy = _reference_preprocess(items, options)
    np.testing.assert_array_equal(slab.images, images)
    np.testing.assert_array_equal(slab.meta.hu, hu)
    np.testing.assert_array_equal(slab.meta.anatomy, anatomy)
    # training decodes with HU (decode_items default) and asks for float32: the same integers
    train = preprocess_decoded(decode_items(items, options), Options(model_size=SIZE, window=window))
    np.testing.assert_array_equal(train.images, images.astype(np.float32))


def test_serving_decode_defers_hu_and_computes_it_on_demand() -> None:
    items = _series("ct")
    deferred = decode_items(items, Options(), with_hu=False)
    full = decode_items(items, Options())
    assert all(s.hu_deferred and s.hu.strides == (0, 0) for s in deferred)
    for a, b in zip(deferred, full, strict=True):
        np.testing.assert_array_equal(a.modality_values(), b.hu)
        assert not a.hu_deferred


# ----------------------------------------------------------------------------- postprocess


def _reference_nms(boxes: np.ndarray, scores: np.ndarray, thr: float, max_keep: int) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_keep:
        i = order[0]
        keep.append(int(i))
        order = order[1:][box_iou(boxes[i], boxes[order[1:]]) <= thr]
    return keep


def _reference_postprocess(scores: np.ndarray, boxes: np.ndarray, meta: SlabMeta, o: Options) -> list[Detection]:
    out = []
    for i in range(len(meta)):
        anchor, cls = np.nonzero(scores[i] > np.float32(o.score_threshold))
        cs = scores[i][anchor, cls]
        if cs.size > PRE_NMS_TOP_K:
            top = np.argpartition(-cs, PRE_NMS_TOP_K)[:PRE_NMS_TOP_K]
            anchor, cls, cs = anchor[top], cls[top], cs[top]
        cb = boxes[i][anchor]
        fin = np.all(np.isfinite(cb), axis=1) & np.isfinite(cs)
        cb, cs, cls = cb[fin], cs[fin], cls[fin]
        if cs.size == 0:
            continue
        shifted = cb + (cls.astype(np.float32) * np.float32(float(np.abs(cb).max()) * 2 + 1))[:, None]
        k = _reference_nms(shifted, cs, o.nms_iou, o.max_detections)
        kb, ks, kc = cb[k], cs[k], cls[k]
        t, lo = meta.transform(i), meta.lowres_transform(i)
        orig = t.to_original(kb)
        orig[:, 0::2] = np.clip(orig[:, 0::2], 0, t.src_w)
        orig[:, 1::2] = np.clip(orig[:, 1::2], 0, t.src_h)
        sp = meta.spacing[i].astype(np.float64)
        keep = size_filter(orig, sp, o.min_size_mm, o.max_size_mm)
        lob = lo.to_model(orig)
        lung = (meta.anatomy[i] & LUNG) > 0
        plausible = centres_inside(lung, lob) | (mean_in_boxes(lung.astype(np.float32), lob, shrink=1.0) >= o.anatomy_min_overlap)
        keep &= plausible
        mean_hu = mean_in_boxes(meta.hu[i], lob)
        pos, iop = meta.position[i].astype(np.float64), meta.orientation[i].astype(np.float64)
        for j in np.flatnonzero(keep):
            x1, y1, x2, y2 = orig[j]
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            centre = pos + (cx * sp[1]) * iop[:3] + (cy * sp[0]) * iop[3:]
            out.append(
                Detection(
                    slice_index=i,
                    sop_instance_uid=meta.uid(i),
                    box_px=(float(x1), float(y1), float(x2), float(y2)),
                    box_mm=(float(x1 * sp[1]), float(y1 * sp[0]), float(x2 * sp[1]), float(y2 * sp[0])),
                    score=float(ks[j]),
                    class_id=int(kc[j]),
                    mean_hu=float(mean_hu[j]),
                    diameter_mm=float(max((x2 - x1) * sp[1], (y2 - y1) * sp[0])),
                    centre_mm=tuple(float(v) for v in centre),  # type: ignore[arg-type]
                    frame_index=int(meta.info[i, 5]),
                )
            )
    return out


def _random_detector(n: int, a: int, c: int, size: int, seed: int, hot: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = (rng.random((n, a, c)) * 0.3).astype(np.float32)
    idx = rng.integers(0, a, (n, hot))
    scores[np.arange(n)[:, None], idx, rng.integers(0, c, (n, hot))] = rng.uniform(0.3, 1.0, (n, hot)).astype(np.float32)
    scores[0, :5, 0] = 0.5  # ties: the candidate order decides
    xy = rng.uniform(0, size - 40, (n, a, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(3, 40, (n, a, 2)).astype(np.float32)], axis=2)
    boxes[1, idx[1, :3]] = np.nan  # non-finite boxes are dropped
    return scores, boxes


@pytest.mark.parametrize("model_size,classes", [(SIZE, 1), (SIZE, 3), (320, 2)])
def test_vectorised_postprocess_equals_per_slice_reference(model_size: int, classes: int) -> None:
    items = _series("ct")
    meta = preprocess_slab(items, Options(model_size=model_size, image_dtype="uint8")).meta
    o = Options(model_size=model_size)
    anchors = (model_size // 8) ** 2 + (model_size // 16) ** 2 + (model_size // 32) ** 2
    scores, boxes = _random_detector(len(meta), anchors, classes, model_size, seed=model_size + classes, hot=60)
    # Dense boxes around one spot on slice 2 (heavy suppression) and > PRE_NMS_TOP_K candidates on slice 3.
    boxes[2, :80] = np.array([100, 100, 120, 118], np.float32) + np.random.default_rng(1).normal(0, 2, (80, 4)).astype(np.float32)
    scores[2, :80, 0] = np.linspace(0.95, 0.4, 80, dtype=np.float32)
    scores[3, : PRE_NMS_TOP_K + 200, 0] = np.random.default_rng(2).uniform(0.31, 1, PRE_NMS_TOP_K + 200).astype(np.float32)
    got = postprocess_slab(scores, boxes, meta, o)
    want = _reference_postprocess(scores, boxes, meta, o)
    assert len(want) > 20
    assert [d.to_dict() for d in got] == [d.to_dict() for d in want]
    arrays = postprocess_findings(scores, boxes, meta, o).to_arrays()
    for name, value in detections_to_arrays(want).items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    assert {int(BODY), int(LUNG | BODY)} <= set(np.unique(meta.anatomy).tolist())  # the filter had lung to test against


def test_python_backend_steps_run_one_blas_thread_per_instance() -> None:
    """Each numpy step caps BLAS at one thread in ``initialize`` (Triton scales by instances; idle
    OpenBLAS workers spin after each call: the preprocess stub's 10.8 ms per slice became 3.4), and the
    cap takes effect on the libraries numpy and scipy loaded."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for step in ("preprocess", "postprocess", "fpr_preprocess"):
        source = (root / "model_repository" / step / "1" / "model.py").read_text()
        assert "limit_native_threads(1)" in source.split("def initialize", 1)[1].split("def ", 1)[0], step
    code = ("import numpy, scipy.linalg; from preprocess_backend.native_threads import limit_native_threads; "
            "print(sorted(set(limit_native_threads(1).values())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "4"})
    assert out.stdout.strip() == "[1]", out.stdout + out.stderr
