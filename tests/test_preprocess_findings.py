"""NMS, size and anatomy filters, masks, 3D lesion linking."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dicom_factory import Nodule, chest_phantom, series_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocess_backend.lesions import classify_density, link_lesions
from preprocess_backend.masks import LUNG, anatomy_mask, body_mask, lung_mask, outside_field
from preprocess_backend.pipeline import preprocess_slab
from preprocess_backend.postprocess import (
    centres_inside,
    mean_in_boxes,
    pairwise_iou,
    size_filter,
    threshold_nms,
)
from preprocess_backend.series import SeriesGeometry
from preprocess_backend.types import Detection, Options


def _nms_reference(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    for i in order:
        if all(pairwise_iou(boxes[[i]], boxes[[j]])[0, 0] <= thr for j in keep):
            keep.append(i)
    return keep


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_nms_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(2, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, (n, 1)).astype(np.float32)
    kb, ks, kc = threshold_nms(scores, boxes, 0.3, 0.2, 100)
    cand = np.nonzero(scores[:, 0] > 0.3)[0]
    ref = cand[_nms_reference(boxes[cand], scores[cand, 0], 0.2)]
    np.testing.assert_array_equal(kb, boxes[ref])
    assert np.all(np.diff(ks) <= 0) and np.all(kc == 0)


def test_class_aware_nms_and_limits() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([[0.9, 0.0], [0.0, 0.8], [0.2, 0.1]], np.float32)
    kb, ks, kc = threshold_nms(scores, boxes)
    assert kc.tolist() == [0, 1] and ks.tolist() == pytest.approx([0.9, 0.8])  # overlap kept: other class
    kb, ks, kc = threshold_nms(scores, boxes, class_aware=False)
    assert kc.tolist() == [0]
    many = np.tile(np.array([[0, 0, 5, 5]], np.float32), (300, 1)) + np.arange(300, dtype=np.float32)[:, None] * 10
    kb, ks, kc = threshold_nms(np.full((300, 1), 0.5, np.float32), many, max_detections=100)
    assert len(kb) == 100
    kb, ks, kc = threshold_nms(np.zeros((5, 1), np.float32), np.zeros((5, 4), np.float32))
    assert kb.shape == (0, 4)


def test_size_filter_in_mm() -> None:
    boxes = np.array([[0, 0, 4, 4], [0, 0, 10, 10], [0, 0, 50, 20]], np.float64)
    assert size_filter(boxes, (0.7, 0.7), 3, 30).tolist() == [False, True, False]
    assert size_filter(boxes, (0.5, 0.5), 3, 30).tolist() == [False, True, True]


def test_mean_in_boxes_uses_centre() -> None:
    v = np.full((20, 20), -850.0, np.float32)
    v[8:12, 8:12] = 40.0
    assert mean_in_boxes(v, np.array([[7.0, 7.0, 13.0, 13.0]]))[0] == pytest.approx(40.0)
    assert centres_inside(v > 0, np.array([[7.0, 7.0, 13.0, 13.0], [0, 0, 2, 2]]), 0).tolist() == [True, False]


def test_masks_on_chest_phantom() -> None:
    ph = chest_phantom(z=2, size=128, nodules=[Nodule((0, 64, 38), 4, 40.0)], noise=20)
    body = body_mask(ph.volume)
    lung = lung_mask(ph.volume, body)
    assert body.shape == ph.volume.shape
    assert body[:, 64, 64].all() and not body[:, 2, 2].any()
    assert lung[0, 64, 38] and lung[0, 64, 90]  # nodule inside the lung counts as lung (holes filled)
    assert not lung[:, 64, 64].any()  # mediastinum
    packed = anatomy_mask(ph.volume)
    assert packed.dtype == np.uint8 and packed[0, 64, 38] == 3 and packed[0, 64, 64] == 1


def _cut_chest(padding_hu: float, size: int = 128, crop: int = 68) -> tuple[np.ndarray, int]:
    """A chest whose field of view cuts both chest walls (a targeted reconstruction): the central
    ``crop`` pixels of ``chest_phantom``, the corners outside the inscribed circle set to
    ``padding_hu`` (-2048: PixelPaddingValue; -1024: a scanner that writes air there). Returns the
    volume and the crop's offset in the full phantom."""
    ph = chest_phantom(z=2, size=size, nodules=[Nodule((0, 64, 38), 4, 40.0)], noise=20)
    o = (size - crop) // 2
    vol = ph.volume[:, o : o + crop, o : o + crop].copy()
    yy, xx = np.mgrid[:crop, :crop] + 0.5 - crop / 2
    vol[:, yy**2 + xx**2 > (0.99 * crop / 2) ** 2] = padding_hu
    return vol, o


@pytest.mark.parametrize("padding_hu", [-2048.0, -3024.0, -1024.0])
def test_lungs_are_found_when_the_field_of_view_cuts_the_body(padding_hu: float) -> None:
    vol, o = _cut_chest(padding_hu)
    lung = lung_mask(vol, body_mask(vol, outside=outside_field(vol)))
    assert lung[0, 64 - o, 38 - o] and lung[0, 64 - o, 90 - o]  # the nodule and the other lung
    assert lung[0, 64 - o, 36 - o]  # lung running off the edge of the field
    assert not lung[:, 64 - o, 64 - o].any()  # mediastinum
    assert not lung[:, 0, 0].any()  # beyond the circle
    # without the field the cut lungs open onto the edge and count as air outside the patient:
    # every detection in them would be dropped by the lung filter
    assert not lung_mask(vol)[0, 64 - o, 38 - o]


def test_cut_field_on_a_letterbox_canvas_is_found_through_preprocess() -> None:
    vol, o = _cut_chest(-1024.0, size=256, crop=136)  # 136 px at 1.0 mm: a 136 mm field, canvas 0.75 mm
    items = series_bytes(vol, spacing=(1.0, 1.0), slice_spacing=1.25)
    slab = preprocess_slab(items, Options(pixel_mm=0.75, context_mm=1.25, image_dtype="uint8", model_size=256, lowres_factor=4))
    t = slab.meta.lowres_transform(0)
    for y, x in ((128 - o, 76 - o), (128 - o, 180 - o)):  # both lungs, in source pixels
        (bx, by), = t.to_model(np.array([[x, y]], np.float64))
        assert slab.meta.anatomy[:, int(by), int(bx)].min() & LUNG, (x, y)
    mid = t.to_model(np.array([[128 - o, 128 - o]], np.float64))[0].astype(int)
    assert not (slab.meta.anatomy[:, mid[1], mid[0]] & LUNG).any()


def test_air_around_the_patient_stays_outside_when_the_field_touches_the_body() -> None:
    """The body reaching the circle at both sides encloses the air above and below it with the
    circle; that air (-1000 HU) is not lung, the parenchyma (-850) is."""
    ph = chest_phantom(z=1, size=128, noise=5)
    vol = ph.volume.copy()
    yy, xx = np.mgrid[:128, :128] + 0.5 - 64
    vol[:, yy**2 + xx**2 > 58**2] = -2048.0  # the circle cuts the 57.6 px half-width ellipse at the sides
    packed = anatomy_mask(vol, downsample=1)
    assert packed[0, 64, 38] & LUNG and packed[0, 64, 90] & LUNG
    assert not packed[0, 64 - 52, 64] & LUNG and not packed[0, 64 + 52, 64] & LUNG  # air above / below
    assert not packed[0, 64 - 52, 64]  # and not body either


def _det(z: int, box: tuple[float, float, float, float], score: float = 0.9, hu: float = 30.0, cls: int = 0) -> Detection:
    w, h = (box[2] - box[0]) * 0.7, (box[3] - box[1]) * 0.7
    return Detection(z, f"1.2.{z}", box, (box[0] * 0.7, box[1] * 0.7, box[2] * 0.7, box[3] * 0.7), score, cls, hu, max(w, h))


def _geometry(z: int = 20) -> SeriesGeometry:
    pos = np.array([[-89.6, -89.6, -100 + 1.25 * i] for i in range(z)])
    return SeriesGeometry(pos, np.array([1, 0, 0, 0, 1, 0], float), (0.7, 0.7), 256, 256, 1.25)


def test_link_lesions_joins_adjacent_overlaps() -> None:
    dets = [_det(z, (60, 100, 70, 110), 0.5 + 0.1 * (z == 5)) for z in (4, 5, 6)]
    dets += [_det(5, (200, 100, 210, 110), 0.4, hu=-700)]  # other lung, same slice
    dets += [_det(9, (60, 100, 70, 110), 0.35)]  # same place but 3 slices later: new lesion
    lesions = link_lesions(dets, _geometry())
    assert len(lesions) == 3
    first = lesions[0]
    assert first.slices == [4, 5, 6] and first.max_score == pytest.approx(0.6) and first.num_detections == 3
    assert first.centre_mm == pytest.approx((-89.6 + 65 * 0.7, -89.6 + 105 * 0.7, -100 + 1.25 * 5))
    assert first.z_extent_mm == pytest.approx(2 * 1.25 + 1.25) and first.diameter_mm == pytest.approx(7.0)
    assert first.side == "right" and first.characteristic == "solid"  # image left = patient right
    other = next(les for les in lesions if les.slices == [5] and les.max_score == pytest.approx(0.4))
    assert other.side == "left" and other.characteristic == "ground-glass"
    assert [les.lesion_id for les in lesions] == [1, 2, 3]


def test_link_needs_geometry_or_centres() -> None:
    d = _det(1, (0, 0, 10, 10))
    with pytest.raises(Exception, match="centre_mm"):
        link_lesions([d])
    d.centre_mm = (10.0, 0.0, 5.0)
    assert link_lesions([d])[0].side == "left"


def test_density_classes() -> None:
    assert classify_density(-750) == "ground-glass"
    assert classify_density(-450) == "part-solid"
    assert classify_density(20) == "solid"
    assert classify_density(math.nan) is None


def test_plausibility_keeps_juxtapleural_boxes_and_drops_chest_wall_ones() -> None:
    from preprocess_backend.postprocess import plausible_in_mask

    lung = np.zeros((40, 40), dtype=bool)
    lung[:, :20] = True  # lung on the left, chest wall from column 20
    boxes = np.array(
        [
            [16.0, 10.0, 28.0, 22.0],  # centre at column 22 (wall), a third of the box is lung: juxtapleural
            [26.0, 10.0, 38.0, 22.0],  # wholly in the wall
            [2.0, 2.0, 8.0, 8.0],  # wholly in the lung
        ]
    )
    assert plausible_in_mask(lung, boxes).tolist() == [True, False, True]
    # centre-only rule (min_overlap 0) drops the juxtapleural one, as before
    assert plausible_in_mask(lung, boxes, min_overlap=0.0).tolist() == [False, False, True]
