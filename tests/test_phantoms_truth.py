"""Phantom truth: deterministic by seed, nodules inside the lungs, the truth centre inside the drawn nodule."""

from __future__ import annotations

import numpy as np
import pytest

from ctlesion_phantoms import PhantomConfig, PhantomVolume, generate_volume
from ctlesion_phantoms.nodules import SPHERE
from ctlesion_phantoms.tubes import segment_distance, segment_radius_at

# noise off so the HU at a centre is the drawn nodule, not a noise draw; blur (PSF) stays on
CLEAN = PhantomConfig(slices_max=48, nodules_min=4, nodules_max=5, p_no_nodules=0.0, diameter_mm=(6.0, 30.0), noise_hu=(0.0, 0.0))
SEEDS = (3, 5, 8)
EXPECTED_MEDIAN = {"solid": (-150.0, 130.0), "part_solid": (-150.0, 130.0), "ground_glass": (-800.0, -450.0)}


@pytest.fixture(scope="module")
def phantoms() -> list[PhantomVolume]:
    return [generate_volume(s, CLEAN) for s in SEEDS]


def _grid_mm(pv: PhantomVolume, kij: np.ndarray) -> np.ndarray:
    g = pv.truth.geometry
    return np.asarray(kij) * np.array([g.slice_spacing, g.pixel_spacing[0], g.pixel_spacing[1]])


def _inside(pv: PhantomVolume, pts_mm: np.ndarray) -> np.ndarray:
    g = pv.truth.geometry
    idx = np.rint(pts_mm / np.array([g.slice_spacing, g.pixel_spacing[0], g.pixel_spacing[1]])).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(pv.lung_mask.shape)), axis=1)
    out = np.zeros(len(idx), dtype=bool)
    out[ok] = pv.lung_mask[tuple(idx[ok].T)]
    return out


def test_same_seed_same_case_other_seed_other_case() -> None:
    cfg = PhantomConfig(slices_max=12, nodules_min=1, nodules_max=2, p_no_nodules=0.0)
    a, b, c = generate_volume(21, cfg), generate_volume(21, cfg), generate_volume(22, cfg)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.truth == b.truth
    assert a.truth.series_instance_uid != c.truth.series_instance_uid
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)


def test_all_kinds_are_present(phantoms: list[PhantomVolume]) -> None:
    nodules = [n for pv in phantoms for n in pv.truth.nodules]
    assert len(nodules) >= 8
    assert {n.type for n in nodules} >= {"solid", "ground_glass"}
    for n in nodules:
        assert 6.0 <= n.diameter_mm <= 30.0
        assert n.type in ("solid", "part_solid", "ground_glass")
        assert n.attachment in ("isolated", "juxtavascular", "juxtapleural")
        if n.type == "ground_glass":
            assert n.mean_hu <= -600


def test_nodule_centres_lie_in_the_lungs(phantoms: list[PhantomVolume]) -> None:
    for pv in phantoms:
        for n in pv.truth.nodules:
            k, i, j = (int(round(v)) for v in n.centre_voxel)
            assert pv.lung_mask[k, i, j], (pv.truth.case_id, n)


def test_centre_hu_matches_the_nodule_type(phantoms: list[PhantomVolume]) -> None:
    for pv in phantoms:
        g = pv.truth.geometry
        for n in pv.truth.nodules:
            c = np.array(n.centre_voxel)
            r = 0.25 * (n.core_diameter_mm if n.type == "part_solid" else n.diameter_mm)
            lo = np.floor(c - r / np.array([g.slice_spacing, *g.pixel_spacing])).astype(int)
            hi = np.ceil(c + r / np.array([g.slice_spacing, *g.pixel_spacing])).astype(int) + 1
            lo = np.maximum(lo, 0)
            box = pv.hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            kk, ii, jj = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, lo + box.shape, strict=True)), indexing="ij")
            d = np.linalg.norm(_grid_mm(pv, np.stack([kk, ii, jj], -1).astype(float)) - _grid_mm(pv, c), axis=-1)
            values = box[d <= max(r, 0.6 * g.slice_spacing)]
            assert values.size, n
            lo_hu, hi_hu = EXPECTED_MEDIAN[n.type]
            assert lo_hu < float(np.median(values)) < hi_hu, (pv.truth.case_id, n, float(np.median(values)))
            # and the nodule stands out from the lung around it
            k, i, j = (int(round(v)) for v in c)
            assert pv.hu[k, i, j] > -700 if n.type != "ground_glass" else pv.hu[k, i, j] > -820


def test_attachments_mean_what_they_say(phantoms: list[PhantomVolume]) -> None:
    seen = set()
    for pv in phantoms:
        for n in pv.truth.nodules:
            c = _grid_mm(pv, np.array(n.centre_voxel))
            radius = n.diameter_mm / 2
            frac_out = 1.0 - _inside(pv, c + SPHERE * radius).mean()
            if n.attachment == "juxtapleural":
                assert frac_out > 0.0, n  # reaches the pleura
            else:
                assert frac_out == 0.0, n  # wholly in the lung
            if n.attachment == "juxtavascular":
                gap = segment_distance(c[None], pv.vessels) - segment_radius_at(c[None], pv.vessels)
                assert gap.min() <= radius, n  # touches a vessel
            seen.add(n.attachment)
    assert len(seen) >= 2


def test_some_cases_have_no_nodules() -> None:
    cfg = PhantomConfig(slices_max=12, p_no_nodules=1.0)
    assert generate_volume(4, cfg).truth.nodules == []
