"""3D false-positive reduction, the pure parts: cubes on a fixed mm grid, request planning,
rescoring and the 3D lesion rules (the served path is tests/test_fpr_serving.py)."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import Nodule, chest_phantom, phantom_series

from ctlesion_client.fpr import plan_cube_requests
from preprocess_backend.cubes import (
    DEFAULT_CUBE,
    CubeSpec,
    cubes_from_dicom,
    decode_codes,
    extract_cubes,
    hu_to_code,
    slice_range_for,
)
from preprocess_backend.errors import DicomInputError
from preprocess_backend.lesion_filters import LesionFilter, filter_lesions
from preprocess_backend.rescoring import apply_fpr, combine
from preprocess_backend.types import Lesion


def _lesion(i: int, centre: tuple[float, float, float], score: float = 0.5, diameter: float = 8.0) -> Lesion:
    return Lesion(lesion_id=i, class_id=0, centre_mm=centre, diameter_mm=diameter, z_extent_mm=5.0, slices=[0],
                  sop_instance_uids=["1"], max_score=score, mean_score=score, mean_hu=0.0, characteristic="solid",
                  side="left", lobe="upper")  # fmt: skip


@pytest.fixture(scope="module")
def nodule_series() -> tuple[list[bytes], np.ndarray]:
    """40 slices of 1.25 mm, 0.7 mm pixels, one 5 mm-radius nodule of +40 HU; returns bytes + its LPS centre."""
    centre_vox = (20.0, 64.0, 40.0)  # z, row, col
    ph = chest_phantom(z=40, size=128, nodules=[Nodule(centre_vox, 5.0 / 0.7, 40.0)], noise=0.0)
    items = phantom_series(ph, shuffle_seed=3)
    # series_bytes: origin (-w/2 * sp, -h/2 * sp), slice i at z0 + i * 1.25
    centre = np.array([-64 * 0.7 + centre_vox[2] * 0.7, -64 * 0.7 + centre_vox[1] * 0.7, -100.0 + centre_vox[0] * 1.25])
    return items, centre


def test_cube_is_centred_on_the_nodule_in_mm(nodule_series: tuple[list[bytes], np.ndarray]) -> None:
    items, centre = nodule_series
    codes, geometry = decode_codes(items)
    cube = extract_cubes(codes, geometry, centre[None])[0]
    d, h, w = DEFAULT_CUBE.shape
    nodule_code, lung_code = hu_to_code(np.array([40.0]))[0], hu_to_code(np.array([-850.0]))[0]
    # centre voxel is nodule; a voxel 8 mm off in x is lung (radius 5 mm)
    assert abs(int(cube[d // 2, h // 2, w // 2]) - int(nodule_code)) <= 2
    assert abs(int(cube[d // 2, h // 2, w // 2 + 8]) - int(lung_code)) <= 2
    # the blob ends in z: 7 z-voxels (10.5 mm) away it is lung again
    assert abs(int(cube[d // 2 + 7, h // 2, w // 2]) - int(lung_code)) <= 2
    # the factory draws the sphere in voxels: semi-axes 5 mm in-plane, 5 / 0.7 * 1.25 mm in z;
    # in the cube's mm grid it is that ellipsoid, whatever the pixel size
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(DEFAULT_CUBE.shape, DEFAULT_CUBE.spacing_mm, strict=True)], indexing="ij")
    r = np.sqrt((zz / (1.25 / 0.7)) ** 2 + yy**2 + xx**2)
    assert np.all(np.abs(cube[r < 4.0].astype(int) - int(nodule_code)) <= 3)
    assert np.all(np.abs(cube[(r > 6.0) & (r < 9.0)].astype(int) - int(lung_code)) <= 3)


def test_cubes_from_the_slices_the_client_sends_equal_the_whole_series(nodule_series: tuple[list[bytes], np.ndarray]) -> None:
    items, centre = nodule_series
    codes, geometry = decode_codes(items)
    whole = extract_cubes(codes, geometry, np.stack([centre, centre + [0, 0, 6.0]]))
    start, stop = slice_range_for(geometry, np.stack([centre, centre + [0, 0, 6.0]]))
    assert start > 0 and stop < len(codes)  # the cube needs a part of the series only
    uid_order = geometry.sop_instance_uids[start:stop]
    by_uid = {}
    from io import BytesIO

    import pydicom

    for b in items:
        by_uid[pydicom.dcmread(BytesIO(b), stop_before_pixels=True).SOPInstanceUID] = b
    served = cubes_from_dicom([by_uid[u] for u in reversed(uid_order)], np.stack([centre, centre + [0, 0, 6.0]]))
    np.testing.assert_array_equal(served, whole)


def test_series_ends_repeat_the_edge_slice(nodule_series: tuple[list[bytes], np.ndarray]) -> None:
    items, _ = nodule_series
    codes, geometry = decode_codes(items)
    first = geometry.positions[0] + [0.0, 0.0, 0.0]
    cube = extract_cubes(codes, geometry, first[None])[0]
    # everything below the first slice samples the first slice
    assert np.array_equal(cube[0], cube[1])


def test_cube_requests_refuse_nonsense(nodule_series: tuple[list[bytes], np.ndarray]) -> None:
    items, centre = nodule_series
    with pytest.raises(DicomInputError, match="centres"):
        cubes_from_dicom(items, np.array([[np.nan, 0, 0]]))
    with pytest.raises(DicomInputError, match="centres"):
        cubes_from_dicom(items, np.zeros((2, 2)))


def test_spec_round_trips() -> None:
    spec = CubeSpec(shape=(8, 16, 16), spacing_mm=(2.0, 1.5, 1.5))
    assert CubeSpec.from_dict(spec.to_dict()) == spec


def test_plan_cube_requests_covers_every_lesion_within_the_slice_budget(nodule_series: tuple[list[bytes], np.ndarray]) -> None:
    items, centre = nodule_series
    _, geometry = decode_codes(items)
    lesions = [_lesion(i, tuple(centre + [0, 0, dz])) for i, dz in enumerate((-20.0, -19.0, 0.0, 15.0, 18.0))]
    plans = plan_cube_requests(lesions, geometry, DEFAULT_CUBE, max_slices=24)
    assert sorted(i for p in plans for i in p.lesions) == list(range(5))
    for p in plans:
        assert p.stop - p.start <= 24
        for i in p.lesions:
            s, e = slice_range_for(geometry, np.asarray([lesions[i].centre_mm]))
            assert p.start <= s and e <= p.stop
    assert len(plans) < 5  # neighbours in z share a request


def test_rescoring_rules_and_order() -> None:
    assert combine(0.64, 0.25, "geometric") == pytest.approx(0.4)
    assert combine(0.64, 0.25, "product") == pytest.approx(0.16)
    assert combine(0.64, 0.25, "fpr") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        combine(0.5, 0.5, "max")
    lesions = [_lesion(1, (0, 0, 0), 0.9), _lesion(2, (0, 0, 10), 0.4)]
    out = apply_fpr(lesions, [0.01, 0.9], "geometric")
    assert [les.detector_score for les in out] == [0.4, 0.9]  # the vessel-like first lesion drops behind
    assert out[0].lesion_id == 1 and out[0].fpr_probability == pytest.approx(0.9)
    assert out[0].max_score == pytest.approx(np.sqrt(0.36))
    with pytest.raises(ValueError):
        apply_fpr(lesions, [0.5], "geometric")


def test_size_rule_applies_to_3d_lesions_and_keeps_masses() -> None:
    lesions = [_lesion(1, (0, 0, 0), 0.9, diameter=31.0), _lesion(2, (0, 0, 9), 0.8, diameter=2.0),
               _lesion(3, (0, 0, 20), 0.2, diameter=8.0), _lesion(4, (0, 0, 30), 0.7, diameter=float("nan"))]  # fmt: skip
    out = filter_lesions(lesions, LesionFilter(min_size_mm=3.0, max_size_mm=30.0, score_threshold=0.3))
    assert [les.lesion_id for les in out] == [1, 4]
    assert out[0].kind == "mass" and out[1].kind == "nodule"


def test_lazy_codes_equal_whole_slice_codes(nodule_series: tuple[list[bytes], np.ndarray]) -> None:
    """Cube requests convert only the crops a cube reads; those crops equal the whole slice's codes."""
    from preprocess_backend.pipeline import decode_items
    from preprocess_backend.series import assemble_series
    from preprocess_backend.types import Options

    items, centre = nodule_series
    codes, geometry = decode_codes(items)
    whole = [hu_to_code(s.hu) for s in assemble_series(decode_items(items, Options(), with_hu=True)).slices]
    assert all(c.slice.hu_deferred for c in codes), "the serving decode must not compute whole-slice HU"
    for z in (0, 17, len(codes) - 1):
        assert codes[z].shape == whole[z].shape
        np.testing.assert_array_equal(codes[z][slice(None), slice(None)], whole[z])
        np.testing.assert_array_equal(codes[z][slice(30, 71), slice(5, 50)], whole[z][30:71, 5:50])
    centres = np.stack([centre, centre + [9.0, -4.0, 3.0]])
    np.testing.assert_array_equal(extract_cubes(codes, geometry, centres), extract_cubes(np.stack(whole), geometry, centres))
