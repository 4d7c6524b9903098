"""Property tests: random and mutated bytes give DicomInputError (or a valid slice), never anything else."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import make_slice
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from preprocess_backend.dicom_io import DecodedSlice, decode_frames, read_header
from preprocess_backend.errors import DicomInputError
from preprocess_backend.pipeline import preprocess_slab
from preprocess_backend.types import Options

SEEDS = {
    "ct": make_slice(np.random.default_rng(0).integers(-1000, 500, (16, 16)).astype(np.float32)),
    "rle": make_slice(np.random.default_rng(1).integers(-1000, 500, (16, 16)).astype(np.float32), transfer_syntax=RLELossless),
    "mr_jls": Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")).read_bytes(),
    "deflate": Path(get_testdata_file("image_dfl.dcm")).read_bytes(),
}
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_typed_errors(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about odd values; only exceptions matter here
        try:
            frames = decode_frames(data)
            assert all(isinstance(f, DecodedSlice) and f.hu.dtype == np.float32 for f in frames)
        except DicomInputError as exc:
            assert str(exc).startswith(exc.source + ": ")
        with contextlib.suppress(DicomInputError):
            read_header(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _only_typed_errors(data)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_with_dicm_preamble(data: bytes) -> None:
    _only_typed_errors(b"\0" * 128 + b"DICM" + data)


@FUZZ
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_mutated_dicom(seed: str, edits: list[tuple[float, int]], cut: float | None) -> None:
    data = bytearray(SEEDS[seed])
    for pos, value in edits:
        data[132 + int(pos * (len(data) - 132))] = value  # keep the preamble: reach the parser
    if cut is not None:
        data = data[: 132 + int(cut * (len(data) - 132))]
    _only_typed_errors(bytes(data))


@settings(max_examples=40, deadline=None)
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_request_through_pipeline(edits: list[tuple[float, int]]) -> None:
    data = bytearray(SEEDS["ct"])
    for pos, value in edits:
        data[132 + int(pos * (len(data) - 132))] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            slab = preprocess_slab([bytes(data)], Options(model_size=32, window="file"))
            assert slab.images.shape[1:] == (3, 32, 32)
        except DicomInputError:
            pass


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seeds_are_valid(name: str) -> None:
    assert decode_frames(SEEDS[name])
