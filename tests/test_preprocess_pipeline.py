"""preprocess_slab / postprocess_slab end to end on a synthetic chest series; JSON round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dicom_factory import Nodule, chest_phantom, make_slice, phantom_series

from preprocess_backend.errors import DicomInputError, LimitExceeded
from preprocess_backend.lesions import link_lesions
from preprocess_backend.letterbox import LetterboxTransform
from preprocess_backend.pipeline import (
    SLAB_META_TENSORS,
    SlabMeta,
    detections_from_arrays,
    detections_to_arrays,
    postprocess_slab,
    preprocess_slab,
)
from preprocess_backend.types import Detection, Lesion, Limits, Options

SIZE = 256
NODULE = Nodule((4, 128, 76), 8, 40.0)  # right lung (image left)


@pytest.fixture(scope="module")
def items() -> list[bytes]:
    return phantom_series(chest_phantom(z=9, size=SIZE, nodules=[NODULE]), shuffle_seed=1)


def _fake_detector(n: int, hits: dict[int, tuple[float, ...]], a: int = 16) -> tuple[np.ndarray, np.ndarray]:
    scores = np.zeros((n, a, 1), np.float32)
    boxes = np.zeros((n, a, 4), np.float32)
    for z, box in hits.items():
        scores[z, 0, 0], boxes[z, 0] = 0.9, box
        scores[z, 1, 0], boxes[z, 1] = 0.8, np.asarray(box) + 0.5  # duplicate: NMS removes
        scores[z, 2, 0], boxes[z, 2] = 0.7, (120, 6, 130, 16)  # outside the body: anatomy removes
        scores[z, 3, 0], boxes[z, 3] = 0.6, (20, 60, 170, 210)  # 105 mm: the per-slice size bound (100 mm) removes
        scores[z, 4, 0], boxes[z, 4] = 0.2, (70, 120, 80, 130)  # below threshold
    return scores, boxes


def _nodule_box(z: int, scale: float = 1.0, pad: float = 0.0) -> tuple[float, ...]:
    r = np.sqrt(max(NODULE.radius_px**2 - (2 * (z - NODULE.centre_vox[0])) ** 2, 4))
    cy, cx = NODULE.centre_vox[1], NODULE.centre_vox[2]
    return ((cx - r) * scale, (cy - r) * scale + pad, (cx + r) * scale, (cy + r) * scale + pad)


def test_preprocess_shapes_order_and_meta(items: list[bytes]) -> None:
    slab = preprocess_slab(items, Options(model_size=SIZE))
    assert slab.images.shape == (9, 3, SIZE, SIZE) and slab.images.dtype == np.float32
    assert slab.images.flags.c_contiguous and slab.images.min() >= 0 and slab.images.max() <= 255
    np.testing.assert_array_equal(slab.images, np.rint(slab.images))  # integer levels, like uint8 serving
    z = slab.meta.position[:, 2]
    assert np.all(np.diff(z) > 0)  # ordered by position, not by the shuffled input
    np.testing.assert_array_equal(slab.images[1:, 0], slab.images[:-1, 1])  # channel 0 = previous slice
    np.testing.assert_array_equal(slab.images[0, 0], slab.images[0, 1])  # edge replicated
    arrays = slab.meta.to_arrays()
    assert [name for name, _, _ in SLAB_META_TENSORS] == list(arrays)
    for name, dtype, dims in SLAB_META_TENSORS:
        a = arrays[name]
        assert a.ndim == len(dims) and a.shape[0] == 9 and a.flags.c_contiguous
        assert a.dtype == (np.dtype(object) if dtype == "bytes" else np.dtype(dtype))
    assert arrays["meta_hu"].shape == (9, SIZE // 4, SIZE // 4)
    lung = (arrays["meta_anatomy"] & 2) > 0
    assert lung[4, 128 // 4, 76 // 4] and not lung[4, 32, 32] and not lung[4, 10, 32]  # mediastinum, anterior wall
    u8 = preprocess_slab(items, Options(model_size=SIZE, image_dtype="uint8")).images
    assert u8.dtype == np.uint8
    np.testing.assert_array_equal(u8, slab.images)
    assert sum(a.nbytes for n, a in arrays.items() if n != "meta_sop_uid") < 0.1 * u8.nbytes


def test_postprocess_filters_and_links(items: list[bytes]) -> None:
    opts = Options(model_size=SIZE)
    slab = preprocess_slab(items, opts)
    scores, boxes = _fake_detector(9, {z: _nodule_box(z) for z in range(1, 8)})
    meta = SlabMeta.from_arrays(slab.meta.to_arrays())
    dets = postprocess_slab(scores, boxes, meta, opts)
    assert [d.slice_index for d in dets] == list(range(1, 8))
    d4 = dets[3]
    assert d4.box_px == pytest.approx(_nodule_box(4)) and d4.diameter_mm == pytest.approx(16 * 0.7, rel=1e-5)
    assert d4.mean_hu == pytest.approx(40, abs=15)
    assert d4.sop_instance_uid == slab.meta.uid(4)
    assert d4.centre_mm == pytest.approx((-SIZE / 2 * 0.7 + 76 * 0.7, -SIZE / 2 * 0.7 + 128 * 0.7, -100 + 4 * 1.25), abs=1e-3)
    lesions = link_lesions(dets)
    assert len(lesions) == 1
    les = lesions[0]
    assert les.slices == list(range(1, 8)) and les.characteristic == "solid" and les.side == "right"
    assert les.centre_mm[2] == pytest.approx(-95.0, abs=0.01)
    no_anatomy = postprocess_slab(scores, boxes, meta, Options(model_size=SIZE, anatomy="none"))
    assert len(no_anatomy) == 14  # the out-of-body box is back
    wide = postprocess_slab(scores, boxes, meta, Options(model_size=SIZE, max_size_mm=200, anatomy="body"))
    assert len(wide) == 14  # 105 mm box in, out-of-body box still out
    loose = postprocess_slab(scores, boxes, meta, Options(model_size=SIZE, score_threshold=0.1, nms_iou=0.99, anatomy="none", max_size_mm=200))
    assert len(loose) == 7 * 5


def test_letterboxed_model_size_maps_back(items: list[bytes]) -> None:
    rect = phantom_series(chest_phantom(z=3, size=SIZE, nodules=[Nodule((1, 128, 76), 8, 40.0)]))
    opts = Options(model_size=128, anatomy="none")
    slab = preprocess_slab(rect, opts)
    assert slab.images.shape == (3, 3, 128, 128)
    model_box = LetterboxTransform.fit(SIZE, SIZE, 128).to_model(np.array([_nodule_box(4)]))[0]  # at half scale
    scores, boxes = _fake_detector(3, {1: tuple(model_box)})
    dets = postprocess_slab(scores, boxes, slab.meta.to_arrays(), opts)
    assert dets[0].box_px == pytest.approx((68, 120, 84, 136), abs=1e-4)


def test_detection_arrays_round_trip(items: list[bytes]) -> None:
    opts = Options(model_size=SIZE)
    slab = preprocess_slab(items, opts)
    dets = postprocess_slab(*_fake_detector(9, {4: _nodule_box(4)}), slab.meta, opts)
    arrays = detections_to_arrays(dets)
    back = detections_from_arrays(arrays)
    np.testing.assert_allclose([d.box_px for d in back], [d.box_px for d in dets], rtol=1e-6)
    assert detections_to_arrays([])["boxes_px"].shape == (0, 4)


def test_request_errors(items: list[bytes]) -> None:
    other = phantom_series(chest_phantom(z=2, size=SIZE))
    with pytest.raises(DicomInputError, match="mixed series"):
        preprocess_slab(items + other)
    slab = preprocess_slab(items + other, Options(model_size=SIZE, group_series=True))
    assert len(slab.meta) == 9 and len(slab.report.other_series) == 1
    with pytest.raises(DicomInputError, match=r"item 1 <5 bytes>: not a DICOM"):
        preprocess_slab([items[0], b"junk!"])
    with pytest.raises(LimitExceeded, match="slices"):
        preprocess_slab(items, Options(limits=Limits(max_slices=4)))
    with pytest.raises(DicomInputError, match="no DICOM"):
        preprocess_slab([])
    with pytest.raises(DicomInputError, match="do not fit"):
        postprocess_slab(np.zeros((2, 4, 1)), np.zeros((2, 4, 4)), preprocess_slab(items, Options(model_size=SIZE)).meta)


def test_radiograph_single_image() -> None:
    img = np.linspace(0, 4000, 300 * 200, dtype=np.float32).reshape(300, 200)
    data = make_slice(img, position=None, orientation=None, spacing=None, modality="DX", intercept=0.0, window=(2000.0, 4000.0),
                      photometric="MONOCHROME1", sop_class="1.2.840.10008.5.1.4.1.1.1.1", extra={"ImagerPixelSpacing": [0.2, 0.2]})
    opts = Options(model_size=128)
    slab = preprocess_slab([data], opts)
    assert slab.images.shape == (1, 3, 128, 128)
    assert slab.images[0, 1, 10, 64] > slab.images[0, 1, 120, 64]  # MONOCHROME1: high values dark
    scores, boxes = _fake_detector(1, {0: (40, 40, 60, 60)})
    dets = postprocess_slab(scores, boxes, slab.meta.to_arrays(), opts)
    assert dets and dets[0].centre_mm is None and np.isnan(dets[0].mean_hu)  # no anatomy filter off CT


def test_dataclasses_json_round_trip() -> None:
    o = Options(window="mediastinum", class_anatomy={1: "body"})
    assert Options.from_dict(json.loads(json.dumps(o.to_dict()))) == o
    d = Detection(3, "1.2", (1.0, 2.0, 3.0, 4.0), (0.7, 1.4, 2.1, 2.8), 0.5, centre_mm=(1.0, 2.0, 3.0))
    back = Detection.from_dict(json.loads(json.dumps(d.to_dict())))
    assert back.box_px == d.box_px and back.centre_mm == d.centre_mm and np.isnan(back.mean_hu)
    les = Lesion(1, 0, (1.0, 2.0, 3.0), 5.0, 2.5, [1, 2], ["a", "b"], 0.9, 0.8, float("nan"), None, "left", "upper")
    back_l = Lesion.from_dict(json.loads(json.dumps(les.to_dict())))
    assert back_l.centre_mm == les.centre_mm and back_l.slices == [1, 2] and np.isnan(back_l.mean_hu)
