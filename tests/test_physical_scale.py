"""Physical scale (issue 15 item 4): the detector sees one pixel size in mm and 2.5D planes at fixed mm
offsets, whatever matrix, pixel spacing and slice spacing arrive; boxes map back exactly."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import series_bytes

from client.options import ClientOptions
from damoyolo.dataset import CaseData, scale_options
from preprocess_backend.letterbox import LetterboxTransform, resample_uint8, resize
from preprocess_backend.pipeline import SlabMeta, context_planes, postprocess_slab, preprocess_slab
from preprocess_backend.slabs import context_halo, request_slab_size
from preprocess_backend.types import Options

PHYSICAL = Options(pixel_mm=0.75, context_mm=1.25, image_dtype="uint8", model_size=256, lowres_factor=4)


def _disc_volume(size: int, spacing: float, z: int, radius_mm: float, centre_mm: tuple[float, float]) -> np.ndarray:
    """HU [z, size, size]: air, a soft-tissue disc of ``radius_mm`` at ``centre_mm`` from the image centre."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    c = (size - 1) / 2
    d2 = ((xx - c) * spacing - centre_mm[0]) ** 2 + ((yy - c) * spacing - centre_mm[1]) ** 2
    vol = np.full((z, size, size), -1000.0, np.float32)
    vol[:, d2 <= radius_mm**2] = 40.0
    return vol


def _extent(mask: np.ndarray) -> tuple[float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.max() - xs.min() + 1), float(xs.mean()), float(ys.mean())


@pytest.mark.parametrize(("size", "spacing"), [(256, 0.5), (128, 1.0), (192, 0.75)])
def test_every_matrix_reaches_the_model_at_one_pixel_size(size: int, spacing: float) -> None:
    """A 30 mm disc 20 mm right of centre is 40 model pixels wide (0.75 mm each) at the same place,
    from 0.5, 0.75 and 1.0 mm pixels alike (letterboxing would give 2x different sizes)."""
    vol = _disc_volume(size, spacing, 3, 15.0, (20.0, 0.0))
    slab = preprocess_slab(series_bytes(vol, spacing=(spacing, spacing), slice_spacing=1.25), PHYSICAL)
    width, cx, cy = _extent(slab.images[1, 1] > 128)
    assert width == pytest.approx(30.0 / 0.75, abs=2.0)
    assert cx == pytest.approx(127.5 + 20.0 / 0.75, abs=0.6)
    assert cy == pytest.approx(127.5, abs=0.6)


def test_boxes_map_back_to_the_original_pixels() -> None:
    """A box found in model pixels comes back where the content is in the original matrix (and in mm)."""
    spacing, size = 0.5, 256
    vol = _disc_volume(size, spacing, 3, 6.0, (-10.0, 8.0))
    slab = preprocess_slab(series_bytes(vol, spacing=(spacing, spacing), slice_spacing=1.25), PHYSICAL)
    t = slab.meta.transform(1)
    assert (t.new_h, t.new_w) == (171, 171) and not t.is_identity
    _, mx, my = _extent(slab.images[1, 1] > 128)
    r = 6.0 / 0.75
    scores = np.zeros((3, 1, 1), np.float32)
    scores[1] = 0.9
    boxes = np.tile(np.array([mx - r, my - r, mx + r, my + r], np.float32), (3, 1, 1))
    (det,) = postprocess_slab(scores, boxes, slab.meta, Options(min_size_mm=1.0, anatomy="none"))
    _, ox, oy = _extent(vol[1] > 0)
    assert (det.box_px[0] + det.box_px[2]) / 2 == pytest.approx(ox, abs=0.5)
    assert (det.box_px[1] + det.box_px[3]) / 2 == pytest.approx(oy, abs=0.5)
    assert det.diameter_mm == pytest.approx(12.0, abs=0.6)


def test_a_wide_field_of_view_is_cropped_centred_and_still_maps_exactly() -> None:
    t = LetterboxTransform.physical(512, 512, 512, 0.95, 0.95, 0.75)  # 486 mm field: 649 px, cropped to 512
    assert t.new_w == 649 and t.pad_x == -69
    box = np.array([[100.25, 200.5, 140.0, 230.75]])
    np.testing.assert_allclose(t.to_original(t.to_model(box)), box, atol=1e-9)
    assert t.lowres(4).size == 128 and t.lowres(4).pad_x == -17
    image = (np.random.default_rng(0).random((512, 512)) * 255).astype(np.uint8)
    out = np.empty((512, 512), np.uint8)
    resample_uint8(image, t, out)
    dense = resize(image.astype(np.float32), t.new_h, t.new_w)[69 : 69 + 512, 69 : 69 + 512]
    np.testing.assert_array_equal(out, np.floor(np.clip(dense + 0.5, 0, 255)))  # our filter, rounded half up


@pytest.mark.parametrize(
    ("src", "new", "pad"),
    [((300, 512), (200, 700), (-94, 156)),  # shrunk rows padded, grown columns cropped
     ((256, 256), (341, 300), (85, 106)),  # padded both ways
     ((1024, 1024), (700, 700), (-94, -94)),  # shrunk (antialiased) and cropped
     ((512, 512), (629, 629), (-58, -60))],  # grown and cropped off-centre
)
def test_resample_computes_only_the_kept_pixels_and_they_equal_the_whole_grid(src: tuple, new: tuple, pad: tuple) -> None:
    """The crop is taken from the weights before multiplying, not from the result: every kept pixel
    equals the whole slice resampled at that place (what training samples from) exactly, and our
    dense filter within float rounding; no clip is needed (convex weights); padding is the pad value."""
    from preprocess_backend.letterbox import _sparse_weights

    t = LetterboxTransform(src[0], src[1], 512, new[0], new[1], pad_x=pad[1], pad_y=pad[0])
    gy, gx = np.mgrid[:512, :512]
    gy, gx = gy - t.pad_y, gx - t.pad_x  # the whole grid's pixel under each model pixel
    inside = (gy >= 0) & (gy < t.new_h) & (gx >= 0) & (gx < t.new_w)
    gy, gx = gy.clip(0, t.new_h - 1), gx.clip(0, t.new_w - 1)
    rng = np.random.default_rng(1)
    for image in (rng.integers(0, 256, src).astype(np.uint8), np.full(src, 255, np.uint8)):
        out = np.empty((512, 512), np.uint8)
        resample_uint8(image, t, out, pad_value=7)
        whole = (_sparse_weights(src[1], t.new_w) @ (_sparse_weights(src[0], t.new_h) @ image.astype(np.float32)).T).T
        np.testing.assert_array_equal(out, np.where(inside, np.floor(whole + 0.5)[gy, gx], 7))
        dense = np.floor(np.clip(resize(image.astype(np.float32), t.new_h, t.new_w) + 0.5, 0, 255))
        assert np.abs(out.astype(int) - np.where(inside, dense[gy, gx], 7)).max() <= 1


def test_slab_metadata_carries_the_transform() -> None:
    vol = _disc_volume(128, 1.0, 2, 20.0, (0.0, 0.0))
    slab = preprocess_slab(series_bytes(vol, spacing=(1.0, 1.0), slice_spacing=2.0), PHYSICAL)
    meta = SlabMeta.from_arrays(slab.to_arrays())
    assert meta.transform(0) == LetterboxTransform.physical(128, 128, 256, 1.0, 1.0, 0.75)
    assert meta.lowres_transform(0).size == 64 and meta.hu.shape == (2, 64, 64)
    assert meta.hu[0, 32, 32] == pytest.approx(40, abs=2)  # the disc, on the lowres model grid
    assert meta.hu[0, 0, 0] == -1024  # padding outside the field of view: air


@pytest.mark.parametrize(
    ("spacing", "first", "second", "weight"),
    [
        (1.25, [0, 1, 2], [1, 2, 3], [0, 0, 0]),  # spacing == context: the neighbours themselves
        (0.625, [3, 5, 7], [4, 6, 8], [0, 0, 0]),  # thin slices: two slices away
        (2.5, [4, 5, 5], [5, 6, 6], [0.5, 0, 0.5]),  # thick: half-way planes
        (5.0, [4, 5, 5], [5, 6, 6], [0.75, 0, 0.25]),
    ],
)
def test_context_planes_sit_at_fixed_mm_offsets(spacing: float, first: list, second: list, weight: list) -> None:
    z = np.arange(12) * spacing
    src, w = context_planes(12, z, 3, 1.25)
    i = 1 if spacing == 1.25 else 5
    assert src[i, :, 0].tolist() == first
    if any(weight):
        assert src[i, :, 1].tolist() == second
    np.testing.assert_allclose(w[i], weight, atol=1e-6)
    # the ends are clamped (edge replication), never read outside the slab
    assert src.min() >= 0 and src.max() <= 11 and w[0, 0] == 0 and src[0, 0, 0] == 0


def test_context_planes_without_positions_are_the_neighbours() -> None:
    src, w = context_planes(4, None, 3, 1.25)
    assert src[:, :, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]] and not w.any()


def test_interpolated_channel_is_the_blend_of_its_slices() -> None:
    """5 mm slices: the channel 1.25 mm below slice 2 is 0.75 x slice 2 + 0.25 x slice 1."""
    vol = np.stack([np.full((64, 64), hu, np.float32) for hu in (-900, -700, -500, -300)])
    slab = preprocess_slab(series_bytes(vol, spacing=(0.75, 0.75), slice_spacing=5.0), PHYSICAL)
    win = [float(slab.images[i, 1, 128, 128]) for i in range(4)]
    assert slab.images[2, 0, 128, 128] == int(np.floor(0.75 * win[2] + 0.25 * win[1] + 0.5))
    assert slab.images[2, 2, 128, 128] == int(np.floor(0.75 * win[2] + 0.25 * win[3] + 0.5))


def test_halo_reaches_the_planes_and_requests_keep_their_size() -> None:
    assert context_halo(3) == 1 and context_halo(3, 1.25, 2.5) == 1
    assert context_halo(3, 1.25, 1.25) == 1 and context_halo(3, 1.25, 0.625) == 2 and context_halo(3, 1.25, 0.5) == 3
    assert context_halo(5, 1.25, 0.625) == 4
    assert request_slab_size(30, 1, 2) == 28 and request_slab_size(30, 1, 1) == 30  # 28 + 2 x 2 = 30 + 2 x 1
    assert ClientOptions(k=3, context_mm=1.25).series_halo(0.6) == 3 and ClientOptions(k=3).series_halo(0.6) == 1


def test_halo_slices_give_the_owned_slices_their_whole_context() -> None:
    """A slab sent with ``context_halo`` slices each side gives its owned slices the same images as the
    whole series does (thin 0.625 mm slices need 2)."""
    vol = np.stack([np.full((64, 64), -1000 + 40 * i, np.float32) for i in range(12)])
    items = series_bytes(vol, spacing=(0.75, 0.75), slice_spacing=0.625)
    whole = preprocess_slab(items, PHYSICAL).images
    halo = context_halo(3, 1.25, 0.625)
    part = preprocess_slab(items[4 - halo : 8 + halo], PHYSICAL).images[halo:-halo]
    np.testing.assert_array_equal(part, whole[4:8])


def test_training_sees_what_the_server_sends(tmp_path) -> None:  # noqa: ANN001
    """The training sampler's 2.5D stack of a slice equals the served image (physical scale on)."""
    vol = _disc_volume(128, 1.0, 6, 8.0, (5.0, -3.0)) + np.arange(6, dtype=np.float32)[:, None, None] * 30
    items = series_bytes(vol, spacing=(1.0, 1.0), slice_spacing=2.5)
    options, t = scale_options(128, 128, (1.0, 1.0), "lung", 0.75)
    assert options.model_size == 256 and t.pad_x == (256 - 171) // 2
    from preprocess_backend.pipeline import decode_items, preprocess_decoded

    one = preprocess_decoded(decode_items(items, options), options)
    z = np.arange(6) * 2.5 - 100.0
    case = CaseData("c", np.ascontiguousarray(one.images[:, 0]), {}, np.arange(6), None, {}, z, 1.25)  # type: ignore[arg-type]
    served = preprocess_slab(items, Options(pixel_mm=0.75, context_mm=1.25, image_dtype="uint8", model_size=256)).images
    for s in range(6):
        np.testing.assert_array_equal(case.stack(3, s), served[s])


def test_validation_slices_are_the_served_window() -> None:
    """Training keeps the whole resampled field of view; validation cuts the window the server sends."""
    vol = _disc_volume(128, 1.0, 3, 8.0, (5.0, -3.0))
    items = series_bytes(vol, spacing=(1.0, 1.0), slice_spacing=1.25)
    options, t = scale_options(128, 128, (1.0, 1.0), "lung", 0.75)
    from preprocess_backend.pipeline import decode_items, preprocess_decoded

    one = preprocess_decoded(decode_items(items, options), options)
    case = CaseData("c", np.ascontiguousarray(one.images[:, 0]), {}, np.arange(3), None, {}, None, None, t)  # type: ignore[arg-type]
    box = t.to_model(np.array([[60.0, 50.0, 70.0, 62.0]]))
    for size in (128, 320):
        image, boxes = case.served(case.stack(3, 1), box, size)
        served = preprocess_slab(items, Options(pixel_mm=0.75, image_dtype="uint8", model_size=size))
        np.testing.assert_array_equal(image, served.images[1])
        np.testing.assert_allclose(boxes, served.meta.transform(1).to_model(np.array([[60.0, 50.0, 70.0, 62.0]])), atol=1e-4)
