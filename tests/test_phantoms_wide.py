"""Profile "wide" (domain randomisation): realistic HU, scanner-like DICOM, truth the evaluation can use.

Small matrices and few slices keep each case to seconds; the protocol sampler itself is checked
over many seeds without rendering.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctlesion_phantoms import CaseTruth, PhantomConfig, generate_case, generate_volume
from ctlesion_phantoms.cli import main as phantom_main
from ctlesion_phantoms.config import WIDE_ATTACHMENTS
from ctlesion_phantoms.dicom_writer import to_stored
from ctlesion_phantoms.tubes import Grid
from ctlesion_phantoms.wide import WIDE_SLICE_SPACINGS, sample_case
from ctlesion_phantoms.wide_nodules import draw_wide_nodule, make_wide_spec
from preprocess_backend.dicom_io import decode_frames
from preprocess_backend.pipeline import preprocess_slab
from preprocess_backend.types import Options

# 128 x 128 at ~2.6 mm: a whole chest in a small matrix; the rest of the wide ranges as they are
SMALL = dict(profile="wide", matrix_weights={128: 1.0}, pixel_spacing_mm=(2.4, 2.8), slices_max=28,
             nodules_min=3, nodules_max=4, p_no_nodules=0.0, max_vessel_segments=1500)
SEEDS = (3, 4, 5, 6)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, CaseTruth]]:
    out = tmp_path_factory.mktemp("wide")
    cfg = PhantomConfig(**SMALL)
    return [(out / generate_case(s, out, cfg).case_id, CaseTruth.load(out / f"ph{s:08d}" / "truth.json")) for s in SEEDS]


def _read(case_dir: Path) -> list[pydicom.Dataset]:
    ds = [pydicom.dcmread(p) for p in (case_dir / "series").glob("*.dcm")]
    return sorted(ds, key=lambda d: float(d.ImagePositionPatient[2]))


def test_default_profile_output_is_unchanged() -> None:
    """The committed model was trained and measured on the default profile: same seed, same voxels.

    The digest was taken from the generator before the wide profile existed (it changes only if the
    default profile's output changes, which must not happen silently).
    """
    cfg = PhantomConfig(matrix=128, slices_max=12, max_vessel_segments=300)
    pv = generate_volume(21, cfg)
    assert pv.truth.profile == "default" and pv.outside is None
    digest = hashlib.sha256(to_stored(pv.hu, signed=False).tobytes()).hexdigest()[:16]
    assert digest == DEFAULT_DIGEST


DEFAULT_DIGEST = "b457b2c5f06a8050"  # generator at e86a823, before profile "wide"


def test_wide_defaults_and_round_trip() -> None:
    cfg = PhantomConfig(profile="wide")
    assert cfg.slice_spacing_mm == (0.625, 5.0) and cfg.pixel_spacing_mm == (0.5, 1.0)
    assert cfg.matrix_weights is not None and max(cfg.matrix_weights, key=cfg.matrix_weights.get) == 512
    assert set(cfg.attachment_weights) == set(WIDE_ATTACHMENTS)
    assert PhantomConfig.from_dict(cfg.to_dict()) == cfg
    assert PhantomConfig(profile="wide", slices_max=40).slices_max == 40  # explicit values are kept
    with pytest.raises(ValueError):
        PhantomConfig(profile="narrow")
    with pytest.raises(ValueError):
        PhantomConfig(type_weights={"calcified": 1.0})  # wide kinds only in the wide profile


def test_protocols_cover_what_scanners_vary() -> None:
    cfg = PhantomConfig(profile="wide")
    scans = [sample_case(np.random.default_rng(s), cfg) for s in range(150)]
    matrices = [c.scan.matrix for c in scans]
    assert set(matrices) == {256, 384, 512, 768, 1024} and matrices.count(512) > len(matrices) / 2
    for c in scans:
        g = c.geometry
        assert 0.5 <= g.pixel_spacing[0] <= 1.0 and g.rows == g.columns == c.scan.matrix
        assert g.slice_spacing in WIDE_SLICE_SPACINGS and g.slice_thickness >= g.slice_spacing - 1e-9
        assert g.slice_thickness <= 5.0 and g.slices * g.rows**2 <= cfg.voxel_budget
        assert np.isclose(c.weights.sum(), 1.0) and c.internal.slice_spacing <= max(1.0, g.slice_spacing)
    assert {c.geometry.slice_spacing for c in scans} >= {0.625, 5.0}
    assert sum(c.geometry.slice_thickness > c.geometry.slice_spacing for c in scans) > 20  # overlapping
    assert {c.scan.padding for c in scans} == {"none", "-3024", "-2048", "air"}
    assert {c.scan.kernel for c in scans} == {"SOFT", "STANDARD", "LUNG", "BONE"}
    assert any(c.scan.low_dose for c in scans) and any(c.scan.motion_mm > 0 for c in scans)
    assert any(c.scan.streaks > 0 for c in scans) and any(c.scan.contrast for c in scans)
    widths = [c.params.half_width for c in scans]
    assert max(widths) / min(widths) > 1.4  # slim to broad patients


def test_parenchyma_hu_and_nodule_hu(cases: list[tuple[Path, CaseTruth]]) -> None:
    # parenchyma at a clinical pixel size (coarse pixels smear vessels into it); fibrosis makes it denser
    cfg = PhantomConfig(profile="wide", matrix_weights={256: 1.0}, pixel_spacing_mm=(0.9, 1.0), slices_max=10, p_no_nodules=1.0)
    measured = 0
    for seed in range(10):
        pv = generate_volume(seed, cfg)
        if pv.lung_mask.mean() < 0.05 or pv.truth.scanner["fibrosis"]:
            continue
        assert -900 < float(np.median(pv.hu[pv.lung_mask])) < -800, seed
        measured += 1
    assert measured >= 4
    for _, truth in cases:
        for n in truth.nodules:
            if n.type == "solid" and not n.subtype:
                assert -100 <= n.mean_hu <= 100, n
            if n.type == "ground_glass":
                assert n.mean_hu <= -600, n
            if n.subtype == "cavitary":
                assert n.mean_hu < 100, n  # the air of the cavity lowers the mean
            assert n.margin in ("round", "lobulated", "spiculated") and n.is_mass == (n.diameter_mm > 30)


def test_dicom_geometry_padding_and_readback(cases: list[tuple[Path, CaseTruth]]) -> None:
    paddings = set()
    for case_dir, truth in cases:
        g = truth.geometry
        dss = _read(case_dir)
        assert len(dss) == g.slices
        pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in dss])
        np.testing.assert_allclose(pos, g.slice_positions(), atol=1e-3)
        np.testing.assert_allclose(np.diff(pos[:, 2]), g.slice_spacing, atol=1e-3)
        for d in dss:
            assert [float(v) for v in d.PixelSpacing] == list(g.pixel_spacing)
            assert float(d.SliceThickness) == g.slice_thickness and float(d.SpacingBetweenSlices) == g.slice_spacing
            assert d.ConvolutionKernel == truth.scanner["kernel"]
        pad = truth.scanner["padding_hu"]
        first = decode_frames((case_dir / "series" / Path(dss[0].filename).name).read_bytes())[0]
        corner = first.hu[0, 0]
        if pad is not None:
            paddings.add(pad)
            assert dss[0].PixelRepresentation == 1 and int(dss[0].PixelPaddingValue) == int(pad + 1024)
            assert first.pixel_padding_value == pad and corner == pad
            assert dss[0].pixel_array[0, 0] == dss[0].PixelPaddingValue
        else:
            assert "PixelPaddingValue" not in dss[0] and corner >= -1024
        centre = first.hu[g.rows // 2 - 5 : g.rows // 2 + 5, g.columns // 2 - 5 : g.columns // 2 + 5]
        assert centre.min() >= -1024  # inside the circle: real HU
        slab = preprocess_slab([Path(d.filename).read_bytes() for d in dss[:6]], Options(model_size=128))
        assert slab.images.shape[0] == 6 and slab.series_instance_uid == truth.series_instance_uid
    assert paddings, "no case with a reconstruction circle among the test seeds"


def test_truth_centres_lie_in_the_lungs() -> None:
    for seed in SEEDS:
        pv = generate_volume(seed, PhantomConfig(**SMALL))
        g = pv.truth.geometry
        assert pv.truth.nodules
        for n in pv.truth.nodules:
            k, i, j = (int(round(v)) for v in n.centre_voxel)
            assert 0 <= k < g.slices and pv.lung_mask[k, i, j], (seed, n)
            np.testing.assert_allclose(g.voxel_to_mm(n.centre_voxel), n.centre_mm, atol=1e-2)
            assert n.attachment in WIDE_ATTACHMENTS


@pytest.mark.parametrize("kind", ["solid", "part_solid", "ground_glass", "calcified", "cavitary"])
def test_each_kind_draws_what_it_says(kind: str) -> None:
    """Drawn into a uniform lung block: cavities hold air, calcifications are dense, ground glass stays faint."""
    grid = Grid(shape=(40, 40, 40), spacing=(0.8, 0.8, 0.8), soft=0.4)
    centre = np.array([16.0, 16.0, 16.0])
    found = set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        vol = np.full(grid.shape, -850.0, np.float32)
        spec = make_wide_spec(rng, kind, "isolated", 16.0, centre, False, None)
        draw_wide_nodule(rng, vol, grid, spec)
        core = vol[18:22, 18:22, 18:22]
        found.add(spec.margin)
        if kind == "cavitary":
            off, rc = spec.cavity
            c = np.rint((centre + off) / 0.8).astype(int)
            assert vol[tuple(c)] < -900 and vol.max() > -150
        elif kind == "calcified":
            assert vol.max() > 240
        elif kind == "ground_glass":
            assert -800 < float(np.median(core)) <= -550 and vol.max() < -300
        else:
            assert float(np.median(core)) > -150
    if kind in ("solid", "cavitary"):
        assert "spiculated" in found


def test_spicules_and_perifissural_shape() -> None:
    grid = Grid(shape=(50, 50, 50), spacing=(0.8, 0.8, 0.8), soft=0.4)
    centre = np.array([20.0, 20.0, 20.0])
    rng = np.random.default_rng(0)
    normal = np.array([1.0, 0.0, 0.0])
    vol = np.full(grid.shape, -850.0, np.float32)
    spec = make_wide_spec(rng, "solid", "perifissural", 12.0, centre, False, normal)
    draw_wide_nodule(rng, vol, grid, spec)
    dense = np.argwhere(vol > -400) * 0.8
    extent = dense.max(axis=0) - dense.min(axis=0)
    if spec.margin != "spiculated":
        assert extent[0] < 0.8 * min(extent[1], extent[2])  # flat along the fissure's normal


def test_masses_are_marked(tmp_path: Path) -> None:
    cfg = PhantomConfig(**{**SMALL, "p_mass": 1.0, "nodules_min": 1, "nodules_max": 2})
    truth = generate_volume(8, cfg).truth
    assert truth.nodules and all(n.is_mass and n.diameter_mm > 30 for n in truth.nodules)


def test_cli_profile_wide(tmp_path: Path) -> None:
    rc = phantom_main(["--out", str(tmp_path), "--cases", "1", "--seed", "3", "--profile", "wide", "--slices-max", "10", "--quiet"])
    assert rc == 0
    truth = CaseTruth.load(tmp_path / "ph00000003" / "truth.json")
    assert truth.profile == "wide" and truth.geometry.slices <= 10
    assert (tmp_path / "manifest.json").exists()
