"""One pixel convention everywhere (docs/contracts.md, "Coordinates"): the centre of pixel (row i,
column j) is at x = j, y = i, as DICOM's ImagePositionPatient. Letterbox, augmentations, truth
boxes, pixel_to_patient and 3D linking must agree; each check here fails by 0.1-1 px if one of
them uses pixel edges ([i, i + 1)) instead. Also: what ``max_gap`` means, and the midline used
for the side."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import series_bytes

from damoyolo.augment import hflip, rotate, vflip
from damoyolo.eval.truth_geometry import SeriesTruth, truth_slice_boxes
from preprocess_backend.lesions import link_lesions, midline_x_from_mask
from preprocess_backend.letterbox import letterbox
from preprocess_backend.pipeline import SlabMeta, postprocess_slab, preprocess_slab
from preprocess_backend.series import SeriesGeometry
from preprocess_backend.types import Detection, Options


def _blob(h: int, w: int, cx: float, cy: float, sigma: float = 6.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)  # index = pixel centre
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2)).astype(np.float32)


def _centroid(image: np.ndarray) -> tuple[float, float]:
    img = np.asarray(image, dtype=np.float64)
    yy, xx = np.mgrid[0 : img.shape[-2], 0 : img.shape[-1]]
    return float((img * xx).sum() / img.sum()), float((img * yy).sum() / img.sum())


def _centre(box: np.ndarray) -> tuple[float, float]:
    return float((box[0] + box[2]) / 2), float((box[1] + box[3]) / 2)


@pytest.mark.parametrize(("h", "w", "cx", "cy"), [(300, 400, 123.4, 210.7), (700, 900, 610.2, 333.3)])
def test_letterbox_maps_a_box_onto_the_resized_content(h: int, w: int, cx: float, cy: float) -> None:
    """Enlarging (x 1.28) and shrinking (x 0.57): the box centre lands on the content's centroid."""
    out, t = letterbox(_blob(h, w, cx, cy, sigma=8.0), 512)
    box = t.to_model(np.array([[cx - 5, cy - 5, cx + 5, cy + 5]]))[0]
    assert _centre(box) == pytest.approx(_centroid(out), abs=0.03)
    np.testing.assert_allclose(t.to_original(box[None])[0], [cx - 5, cy - 5, cx + 5, cy + 5], atol=1e-9)


@pytest.mark.parametrize("flip", [hflip, vflip])
def test_flips_keep_the_box_on_the_content(flip) -> None:  # noqa: ANN001
    image = np.stack([_blob(96, 80, 20.25, 61.5, sigma=3.0)] * 3)
    out, boxes = flip(image, np.array([[15.25, 56.5, 25.25, 66.5]]))
    assert _centre(boxes[0]) == pytest.approx(_centroid(np.ascontiguousarray(out[0])), abs=1e-6)


@pytest.mark.parametrize("degrees", [-15.0, 12.0])
def test_rotation_keeps_the_box_on_the_content(degrees: float) -> None:
    image = np.stack([_blob(120, 100, 30.0, 80.0, sigma=4.0)] * 3)
    out, boxes = rotate(image, np.array([[25.0, 75.0, 35.0, 85.0]]), degrees)
    assert _centre(boxes[0]) == pytest.approx(_centroid(out[0]), abs=0.05)


def _geometry(z: int = 30) -> SeriesGeometry:
    # 0.7 x 0.8 mm pixels, 1.25 mm slices, an origin off the axes: nothing cancels by symmetry
    positions = np.array([[-160.3, -120.9, -250.0 + 1.25 * i] for i in range(z)])
    return SeriesGeometry(positions, np.array([1, 0, 0, 0, 1, 0], float), (0.8, 0.7), 400, 460, 1.25)


def test_a_box_drawn_around_a_patient_point_maps_back_to_it() -> None:
    """Truth box around a nodule centre -> letterbox to the model input and back -> a detection
    with that box -> pixel_to_patient and 3D linking -> the same patient point."""
    g = _geometry()
    point = np.array([-12.34, 30.5, -250.0 + 1.25 * 14])  # on slice 14
    nodule = type("Nodule", (), {"nodule_id": 1, "centre_mm": tuple(point), "diameter_mm": 9.0})()
    boxes = truth_slice_boxes(SeriesTruth("c", [nodule], g))
    box = boxes[14][0]
    np.testing.assert_allclose(g.pixel_to_patient(14, *_centre(box)), point, atol=1e-9)
    # the rendered nodule's centroid is the box centre, in the image and after the letterbox
    image = _blob(g.rows, g.columns, *_centre(box))
    assert _centre(box) == pytest.approx(_centroid(image), abs=1e-3)
    out, t = letterbox(image, 512)
    assert _centre(t.to_model(box[None])[0]) == pytest.approx(_centroid(out), abs=0.03)
    back = t.to_original(t.to_model(box[None]))[0]
    row_sp, col_sp = g.pixel_spacing
    box_mm = tuple(float(v) for v in back * np.array([col_sp, row_sp, col_sp, row_sp]))
    dets = [Detection(k, f"uid{k}", tuple(float(v) for v in back), box_mm, 0.9) for k in (13, 14, 15)]
    (lesion,) = link_lesions(dets, g)
    np.testing.assert_allclose(lesion.centre_mm, point, atol=1e-6)


def _det(k: int, x: float = 100.0) -> Detection:
    return Detection(k, f"uid{k}", (x, 100.0, x + 10, 110.0), (x * 0.7, 80.0, (x + 10) * 0.7, 88.0), 0.8)


def test_max_gap_is_the_largest_slice_step_within_a_lesion() -> None:
    g = _geometry()
    assert len(link_lesions([_det(3), _det(4)], g, max_gap=1)) == 1  # adjacent
    assert len(link_lesions([_det(3), _det(5)], g, max_gap=1)) == 2  # slice 4 missing: no skip allowed
    assert len(link_lesions([_det(3), _det(5)], g, max_gap=2)) == 1  # one slice may be skipped
    assert len(link_lesions([_det(3), _det(6)], g, max_gap=2)) == 2
    with pytest.raises(ValueError, match="max_gap"):
        link_lesions([_det(3)], g, max_gap=0)


def test_side_splits_at_the_patient_midline_when_known() -> None:
    """A patient lying off-centre: the field of view's middle says left, the body's midline right."""
    g = _geometry()
    body = np.zeros((2, g.rows, g.columns), bool)
    yy, xx = np.mgrid[0 : g.rows, 0 : g.columns]
    body[:] = ((xx - 300) / 120.0) ** 2 + ((yy - 200) / 150.0) ** 2 <= 1  # body centred on column 300
    midline = midline_x_from_mask(body, g)
    assert midline == pytest.approx(float(g.pixel_to_patient(0, 300, 200)[0]), abs=1e-6)
    dets = [_det(k, x=250.0) for k in (3, 4)]  # column ~255: right of the FOV middle (229.5), left of 300
    assert link_lesions(dets, g)[0].side == "left"  # +x is the patient's left in LPS
    assert link_lesions(dets, g, midline_x_mm=midline)[0].side == "right"
    with pytest.raises(Exception, match="empty mask"):
        midline_x_from_mask(np.zeros((g.rows, g.columns), bool), g)


def test_the_served_pipeline_maps_a_model_box_back_to_its_patient_point() -> None:
    """preprocess_slab letterboxes 400 x 400 slices to 512; a detector box drawn (in model pixels)
    around a known patient point comes back from postprocess_slab with that point as its centre."""
    volume = np.full((3, 400, 400), 40.0, np.float32)
    items = series_bytes(volume, spacing=(0.8, 0.8), slice_spacing=1.25, z0=-100.0, origin_xy=(-160.0, -150.0))
    options = Options(model_size=512, anatomy="none")
    slab = preprocess_slab(items, options)
    meta = SlabMeta.from_arrays(slab.meta.to_arrays())
    point = np.array([-160.0 + 123.3 * 0.8, -150.0 + 201.7 * 0.8, -100.0 + 1.25])  # column 123.3, row 201.7, slice 1
    col, row = 123.3, 201.7
    model_box = meta.transform(1).to_model(np.array([[col - 6, row - 6, col + 6, row + 6]]))[0]
    assert not meta.transform(1).is_identity  # 400 -> 512: the scale matters
    scores = np.zeros((3, 4, 1), np.float32)
    boxes = np.zeros((3, 4, 4), np.float32)
    scores[1, 0, 0], boxes[1, 0] = 0.9, model_box
    (det,) = postprocess_slab(scores, boxes, meta, options)
    np.testing.assert_allclose(det.centre_mm, point, atol=0.02)
    np.testing.assert_allclose(det.box_px, [col - 6, row - 6, col + 6, row + 6], atol=0.02)


def test_the_client_finds_the_patient_midline_from_the_middle_slice(tmp_path) -> None:  # noqa: ANN001
    """A body lying off-centre (centred on column 300 of 400): the client's midline is the body's
    centre, not the field of view's (column 199.5), so side guesses split where the patient does."""
    from ctlesion_client.core import patient_midline_x, prepare_series
    from ctlesion_client.options import ClientOptions

    yy, xx = np.mgrid[0:400, 0:400]
    body = ((xx - 300) / 80.0) ** 2 + ((yy - 200) / 120.0) ** 2 <= 1
    volume = np.where(body, 40.0, -1000.0).astype(np.float32)[None].repeat(5, axis=0)
    for i, item in enumerate(series_bytes(volume, spacing=(0.8, 0.8), origin_xy=(-160.0, -150.0))):
        (tmp_path / f"{i}.dcm").write_bytes(item)
    prepared = prepare_series(tmp_path, ClientOptions(slab_size=4, k=3))
    midline = patient_midline_x(prepared)
    assert midline == pytest.approx(-160.0 + 300 * 0.8, abs=0.5)
    assert abs(midline - float(prepared.geometry.pixel_to_patient(0, 199.5, 199.5)[0])) > 50
