"""Phantom DICOM output: every file is a valid CT image, rescale gives the intended HU, geometry is consistent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage

from ctlesion_phantoms import CaseTruth, PhantomConfig, generate_case, generate_volume
from ctlesion_phantoms.cli import main
from ctlesion_phantoms.dicom_writer import to_stored

SMALL = PhantomConfig(slices_max=20, nodules_min=2, nodules_max=3, p_no_nodules=0.0)
SEED = 11
REQUIRED = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "Modality", "PatientName", "PatientID", "Rows", "Columns", "PixelSpacing", "ImagePositionPatient",
    "ImageOrientationPatient", "SliceThickness", "SpacingBetweenSlices", "RescaleSlope", "RescaleIntercept",
    "WindowCenter", "WindowWidth", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "PhotometricInterpretation", "SamplesPerPixel", "InstanceNumber", "PixelData",
)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CaseTruth, list[pydicom.Dataset]]:
    out = tmp_path_factory.mktemp("phantom")
    truth = generate_case(SEED, out, SMALL)
    case_dir = out / truth.case_id
    datasets = [pydicom.dcmread(p) for p in sorted((case_dir / "series").glob("*.dcm"))]
    return case_dir, truth, datasets


def test_every_file_is_a_ct_image(case: tuple[Path, CaseTruth, list[pydicom.Dataset]]) -> None:
    _, truth, datasets = case
    assert len(datasets) == truth.geometry.slices
    for ds in datasets:
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for name in REQUIRED:
            assert name in ds, name
        assert ds.Modality == "CT"
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert ds.pixel_array.shape == (512, 512)
        assert ds.pixel_array.dtype in (np.uint16, np.int16)
        assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
        assert "PHANTOM" in str(ds.PatientName) and "PHANTOM" in ds.PatientID
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[key].value for ds in datasets}) == 1
    assert datasets[0].SeriesInstanceUID == truth.series_instance_uid


def test_rescale_gives_the_intended_hu(case: tuple[Path, CaseTruth, list[pydicom.Dataset]]) -> None:
    _, truth, datasets = case
    expected = generate_volume(SEED, SMALL, truth.case_id).hu  # the in-memory variant is the same case
    by_z = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    for k, ds in enumerate(by_z):
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, to_stored(expected[k], signed=False).astype(np.float64) - 1024.0)
        np.testing.assert_allclose(hu, np.clip(expected[k], -1024, 3071), atol=0.5 + 1e-3)
        assert ds.InstanceNumber == k + 1


def test_file_names_do_not_give_the_order(case: tuple[Path, CaseTruth, list[pydicom.Dataset]]) -> None:
    _, _, datasets = case  # read in file-name order
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z != sorted(z) and z != sorted(z, reverse=True)


def test_positions_follow_the_geometry(case: tuple[Path, CaseTruth, list[pydicom.Dataset]]) -> None:
    _, truth, datasets = case
    g = truth.geometry
    by_z = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in by_z])
    np.testing.assert_allclose(pos, g.slice_positions(), atol=1e-3)
    np.testing.assert_allclose(np.diff(pos[:, 2]), g.slice_spacing, atol=1e-3)
    for ds in by_z:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert [float(v) for v in ds.PixelSpacing] == list(g.pixel_spacing)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(g.slice_spacing)
        assert float(ds.SliceThickness) == pytest.approx(g.slice_thickness)
    assert 0.55 <= g.pixel_spacing[0] <= 0.95 and 0.6 <= g.slice_spacing <= 2.5


def test_truth_mm_and_voxels_agree_with_the_dicom(case: tuple[Path, CaseTruth, list[pydicom.Dataset]]) -> None:
    case_dir, truth, datasets = case
    assert CaseTruth.load(case_dir / "truth.json") == truth
    assert truth.nodules, "the small config asks for nodules"
    by_z = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    g = truth.geometry
    for n in truth.nodules:
        np.testing.assert_allclose(g.voxel_to_mm(n.centre_voxel), n.centre_mm, atol=2e-3)
        np.testing.assert_allclose(g.mm_to_voxel(n.centre_mm), n.centre_voxel, atol=2e-3)
        # the same mapping, from the DICOM attributes alone (z index rounded to its slice)
        k, i, j = n.centre_voxel
        ds = by_z[int(round(k))]
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
        np.testing.assert_allclose(ipp[:2] + [j * col_sp, i * row_sp], n.centre_mm[:2], atol=2e-3)
        assert abs(ipp[2] - n.centre_mm[2]) <= g.slice_spacing / 2 + 1e-3


def test_cli_writes_the_layout(tmp_path: Path) -> None:
    rc = main(["--out", str(tmp_path), "--cases", "2", "--seed", "40", "--slices-max", "12", "--quiet"])
    assert rc == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [c["seed"] for c in manifest["cases"]] == [40, 41]
    for c in manifest["cases"]:
        assert (tmp_path / c["truth"]).is_file()
        assert len(list((tmp_path / c["series_dir"]).glob("*.dcm"))) == c["slices"] <= 12


def test_cli_rejects_bad_options(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--nodules-min", "5", "--nodules-max", "2", "--quiet"]) == 2
