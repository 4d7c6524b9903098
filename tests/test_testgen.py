"""The independent test generator: realistic HU, valid DICOM in several encodings, truth the evaluation reads.

Small matrices and thick slices keep a case to seconds. The package must not share code with the
training generator (phantoms/): checked on its import statements.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctlesion_phantoms.splits import split_of
from ctlesion_phantoms.truth import CaseTruth
from ctlesion_testgen import dicom as tg_dicom
from ctlesion_testgen import generate as tg
from ctlesion_testgen import noise as tg_noise
from ctlesion_testgen import trees as tg_trees
from ctlesion_testgen.cli import main as cli_main
from preprocess_backend.dicom_io import decode_frames
from preprocess_backend.pipeline import preprocess_slab
from preprocess_backend.types import Options

SMALL = tg.TestgenConfig(matrix=128, pixel_mm=(2.3, 2.6), spacings_mm=(6.0,), slices_max=60, attractors_per_tree=200,
                         noise_zones=1, realisations=2, profile_step_mm=5.0, nodules=(3, 4), p_no_nodules=0.0)
SEEDS = (tg.TESTGEN_SEED + 1, tg.TESTGEN_SEED + 2)
PACKAGE = Path(tg.__file__).parent


@pytest.fixture(scope="module")
def built() -> list[tg.TestCase]:
    return [tg.build_case(s, SMALL) for s in SEEDS]


def test_shares_no_code_with_the_training_generator() -> None:
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("ctlesion_phantoms", "damoyolo", "preprocess_backend")), (path.name, name)


def test_own_seed_range() -> None:
    assert all(split_of(tg.TESTGEN_SEED + i) == "other" for i in (0, 1, 50_000, 99_999))


def test_hu_of_parenchyma_and_nodules(built: list[tg.TestCase]) -> None:
    kinds = set()
    for case in built:
        assert -900 < float(np.median(case.vol[case.lung])) < -780
        assert case.truth["nodules"]
        for n in case.truth["nodules"]:
            kinds.add(n["subtype"] or n["type"])
            if n["type"] == "solid" and not n["subtype"]:
                assert -100 <= n["mean_hu"] <= 100, n
            if n["type"] == "ground_glass":
                assert n["mean_hu"] <= -600, n
            if n["subtype"] == "calcified":
                assert n["mean_hu"] > 200, n
    assert len(kinds) >= 2


def test_truth_centres_in_the_lungs_and_consistent(built: list[tg.TestCase]) -> None:
    for case in built:
        truth = CaseTruth.from_dict(case.truth)  # the project's schema reads it
        g = truth.geometry
        for n in truth.nodules:
            k, i, j = (int(round(v)) for v in n.centre_voxel)
            assert case.lung[k, i, j] or case.lung[max(k - 1, 0) : k + 2, i, j].any(), n
            np.testing.assert_allclose(g.voxel_to_mm(n.centre_voxel), n.centre_mm, atol=1e-2)
            assert 3.0 <= n.diameter_mm <= 40.0


@pytest.mark.parametrize("style", tg_dicom.STYLES)
def test_every_encoding_reads_back(tmp_path: Path, built: list[tg.TestCase], style: str) -> None:
    case = built[0]
    layout = tg_dicom.SeriesLayout(style=style, head_first=style != "uint12", implicit_vr=style == "int16_hu")
    truth = json.loads(json.dumps(case.truth))
    paths = tg_dicom.write_series(case.vol, truth, tmp_path / "series", layout)
    g = truth["geometry"]
    dss = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
    np.testing.assert_allclose(z, g["origin"][2] + np.arange(g["slices"]) * g["slice_spacing"], atol=1e-3)
    numbers = [int(d.InstanceNumber) for d in dss]
    assert numbers == (list(range(len(dss), 0, -1)) if layout.head_first else list(range(1, len(dss) + 1)))
    for d in dss:
        assert [float(v) for v in d.PixelSpacing] == g["pixel_spacing"]
        assert float(d.SliceThickness) == g["slice_thickness"] and float(d.SpacingBetweenSlices) == g["slice_spacing"]
        assert d.SeriesInstanceUID == truth["series_instance_uid"]
    outside = tg_dicom.outside_circle(g["rows"])
    for k in (0, len(dss) // 2):
        dec = decode_frames(Path(dss[k].filename).read_bytes())[0]
        expected = np.clip(np.rint(case.vol[k]), -1024 if style == "uint12" else -32768, 3071)
        if style == "int16_pad":
            assert dec.pixel_padding_value == -3024.0 and int(dss[k].PixelPaddingValue) == -2000
            assert np.all(dec.hu[outside] == -3024.0)
            np.testing.assert_array_equal(dec.hu[~outside], expected[~outside])
        else:
            assert dec.pixel_padding_value is None
            np.testing.assert_array_equal(dec.hu, expected)
    slab = preprocess_slab([Path(d.filename).read_bytes() for d in dss[:5]], Options(model_size=128))
    assert slab.images.shape[0] == 5


def test_murray_radii_and_tapering() -> None:
    rng = np.random.default_rng(0)
    att = rng.uniform([0, 0, 0], [80, 80, 80], size=(600, 3))
    tree = tg_trees.grow(rng, np.array([[40.0, 40.0, -10.0]]), att, r_leaf=0.4, r_max=50.0)
    r, parent = tree.radius, tree.parent
    assert len(r) > 100
    for p in np.unique(parent[parent >= 0]):
        children = np.flatnonzero(parent == p)
        assert np.isclose(r[p] ** 3, (r[children] ** 3).sum(), rtol=1e-6)
        assert np.all(r[children] <= r[p] + 1e-9)
    assert r.max() > 3 * r.min()  # trunks taper to the periphery


def test_fbp_noise_is_stronger_where_more_tissue_attenuates() -> None:
    yy, xx = np.mgrid[0:128, 0:128]
    ell = ((xx - 63.5) / 58) ** 2 + ((yy - 63.5) / 40) ** 2
    hu = np.where(ell < 1, 0.0, -1000.0)
    nz = tg_noise.noise_realisations(np.random.default_rng(0), hu, 2.5, 3, "ram-lak")
    centre, rim = ell < 0.1, (ell > 0.6) & (ell < 0.95)
    assert nz[:, centre].std() > 1.15 * nz[:, rim].std()
    # correlated, as reconstruction makes it: neighbours are not independent
    corr = np.corrcoef(nz[0][centre], np.roll(nz[0], 1, axis=1)[centre])[0, 1]
    assert abs(corr) > 0.1


@pytest.mark.slow  # imports the evaluation (torch)
def test_cli_writes_what_evaluate_reads(tmp_path: Path) -> None:
    from damoyolo.eval.evaluation import ensure_cases

    seed = tg.TESTGEN_SEED + 3
    cfg = tg.TestgenConfig(**{**SMALL.__dict__, "slices_max": 8})
    manifest = tg.generate_set(tmp_path, 1, seed, cfg)
    assert manifest["seed"] == seed and manifest["cases"][0]["case_id"] == tg.case_id_of(seed)
    dirs = ensure_cases(tmp_path, 1, seed, progress=False)  # found, not generated: same manifest format
    assert dirs == [tmp_path / tg.case_id_of(seed)]
    truth = CaseTruth.load(dirs[0] / "truth.json")
    assert truth.profile == "testgen" and len(list((dirs[0] / "series").glob("*.dcm"))) == truth.geometry.slices
    assert cli_main(["--out", str(tmp_path / "cli"), "--cases", "0"]) == 2
