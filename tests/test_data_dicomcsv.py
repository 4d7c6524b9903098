"""A plain DICOM folder + nodules.csv (the format a hospital team can produce): read, folded and fed
to training through the serving preprocessing, with truth boxes where the phantom's truth has them."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from ctlesion_phantoms import PhantomConfig, generate_case
from damoyolo.data import DataError, open_source, parse_folds
from damoyolo.dataset import load_source_case
from damoyolo.eval.truth_geometry import truth_slice_boxes

SMALL = PhantomConfig(slices_max=24, nodules_min=1, nodules_max=1, p_no_nodules=0.0, diameter_mm=(8.0, 12.0),
                      attachment_weights={"isolated": 1.0})


def test_dicom_folder_with_csv(tmp_path: Path) -> None:
    root = tmp_path / "ours"
    truth = generate_case(11, tmp_path / "ph", SMALL)
    shutil.copytree(tmp_path / "ph" / truth.case_id / "series", root / "patient01" / "ct")
    shutil.copytree(tmp_path / "ph" / truth.case_id / "series", root / "patient02" / "ct")
    n = truth.nodules[0]
    with open(root / "nodules.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "x_mm", "y_mm", "z_mm", "diameter_mm", "label", "fold"])
        w.writerow(["patient01/ct", *n.centre_mm, n.diameter_mm, "nodule", 2])
        w.writerow(["patient01/ct", 0.0, 0.0, -180.0, "", "irrelevant", 2])
    cases = list(open_source(f"dicomcsv:{root}").cases())
    assert [c.case_id for c in cases] == ["patient01/ct", "patient02/ct"]
    first, second = cases
    assert first.fold == 2 and first.nodules[0].centre_mm == pytest.approx(n.centre_mm)
    assert [(x.centre_mm, x.diameter_mm) for x in first.irrelevant] == [((0.0, 0.0, -180.0), -1.0)]
    assert second.nodules == [] and second.fold is not None  # a scan without rows: no nodules, a stable fold
    assert [c.case_id for c in open_source(f"dicomcsv:{root}").cases({2})][0] == "patient01/ct"

    # training reads it through the serving preprocessing: same boxes as the phantom's own truth
    data = load_source_case(first, tmp_path / "cache")
    expected = truth_slice_boxes(truth)
    assert sorted(data.boxes) == sorted(expected)
    for k, b in expected.items():
        np.testing.assert_allclose(data.boxes[k], b, atol=0.05)
    assert data.windowed.dtype == np.uint8 and data.windowed.shape == (truth.geometry.slices, 512, 512)
    again = load_source_case(first, tmp_path / "cache")  # from the cache, memory-mapped
    assert isinstance(again.windowed, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.windowed), data.windowed)

    with open(root / "nodules.csv", "a", newline="") as f:
        csv.writer(f).writerow(["patient09/ct", 1.0, 2.0, 3.0, 5.0, "nodule", 0])
    with pytest.raises(FileNotFoundError, match="patient09"):
        list(open_source(f"dicomcsv:{root}").cases())
    with pytest.raises(DataError, match="KIND:DIR"):
        open_source(str(root))
    assert parse_folds("0-2,5") == {0, 1, 2, 5} and parse_folds("all") is None
