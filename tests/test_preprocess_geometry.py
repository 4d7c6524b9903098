"""2.5D stacking with edge replication; letterbox and its exact inverse."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocess_backend.errors import DicomInputError
from preprocess_backend.letterbox import LetterboxTransform, block_mean, letterbox, resize
from preprocess_backend.stacking import stack_25d


@pytest.mark.parametrize("k", [1, 3, 5])
def test_stack_edges_replicated_no_slice_dropped(k: int) -> None:
    vol = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
    out = stack_25d(vol, k)
    assert out.shape == (6, k, 2, 3) and out.flags.c_contiguous
    centre = out[:, k // 2, 0, 0]
    np.testing.assert_array_equal(centre, np.arange(6))
    if k == 3:
        np.testing.assert_array_equal(out[0, :, 0, 0], [0, 0, 1])
        np.testing.assert_array_equal(out[5, :, 0, 0], [4, 5, 5])
    if k == 5:
        np.testing.assert_array_equal(out[0, :, 0, 0], [0, 0, 0, 1, 2])
        np.testing.assert_array_equal(out[1, :, 0, 0], [0, 0, 1, 2, 3])


def test_stack_bad_k_and_single_slice() -> None:
    with pytest.raises(DicomInputError):
        stack_25d(np.zeros((3, 2, 2)), 2)
    np.testing.assert_array_equal(stack_25d(np.ones((1, 2, 2)), 5), np.ones((1, 5, 2, 2)))


def test_letterbox_identity_and_padding() -> None:
    img = np.random.default_rng(0).random((2, 3, 64, 64)).astype(np.float32)
    out, t = letterbox(img, 64)
    assert t.is_identity
    np.testing.assert_array_equal(out, img)
    wide = np.full((1, 40, 80), 7.0, np.float32)
    out, t = letterbox(wide, 64)
    assert out.shape == (1, 64, 64) and (t.new_h, t.new_w, t.pad_x, t.pad_y) == (32, 64, 0, 16)
    np.testing.assert_allclose(out[0, 16:48], 7.0, atol=1e-5)
    assert out[0, :16].max() == 0 and out[0, 48:].max() == 0


def test_letterbox_box_maps_onto_resized_content() -> None:
    img = np.zeros((100, 200), np.float32)
    img[40:60, 100:140] = 1.0
    out, t = letterbox(img, 64)
    box = t.to_model(np.array([[100, 40, 140, 60]]))[0]
    inner = out[int(np.ceil(box[1])) + 1 : int(box[3]) - 1, int(np.ceil(box[0])) + 1 : int(box[2]) - 1]
    assert inner.min() > 0.9
    assert out.sum() == pytest.approx(img.sum() * t.scale_x * t.scale_y, rel=0.02)  # antialiased: mass kept


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 4000), w=st.integers(1, 4000), size=st.sampled_from([64, 320, 512, 640]),
    box=st.lists(st.floats(0, 1), min_size=4, max_size=4),
)
def test_inverse_is_exact(h: int, w: int, size: int, box: list[float]) -> None:
    t = LetterboxTransform.fit(h, w, size)
    b = np.array([[box[0] * w, box[1] * h, box[2] * w, box[3] * h]])
    np.testing.assert_allclose(t.to_original(t.to_model(b)), b, rtol=1e-12, atol=1e-9)
    assert max(t.new_h, t.new_w) == size and t.new_h <= size and t.new_w <= size
    assert LetterboxTransform.from_array(t.as_array()) == t


def test_resize_keeps_constants_and_block_mean() -> None:
    img = np.full((3, 50, 70), 5.0, np.float32)
    np.testing.assert_allclose(resize(img, 20, 33), 5.0, atol=1e-5)
    np.testing.assert_allclose(resize(img, 120, 90), 5.0, atol=1e-5)
    a = np.random.default_rng(1).random((2, 16, 12)).astype(np.float32)
    np.testing.assert_allclose(block_mean(a, 4), a.reshape(2, 4, 4, 3, 4).mean(axis=(2, 4)), atol=1e-6)
