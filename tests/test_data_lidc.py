"""LIDC-IDRI reader on real files: the shared LIDC-IDRI-0002 slab (12 GE slices + the original
4-reader XML) read into the nodules its derived table lists (centre, diameter, reader count)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from real_parts import missing_real_part

from damoyolo.data import open_source
from damoyolo.data.lidc import LidcSource

SLAB = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "lidc0002-slab"
SERIES_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919"


@pytest.fixture(scope="module")
def slab() -> Path:
    if not (SLAB / "annotations" / "71.xml").exists():
        missing_real_part(f"the shared LIDC slab is not at {SLAB}")
    return SLAB


def _near(findings: list, centre: tuple[float, float, float], tol: float) -> list:
    return [f for f in findings if np.linalg.norm(np.subtract(f.centre_mm, centre)) < tol]


def test_lidc_slab_reads_into_the_expected_nodules(slab: Path) -> None:
    # README / nodules_derived.csv: one >= 3 mm nodule, contoured by 2 of the 4 readers, centre
    # (59.81, 71.67, -102.32) mm, diameter 30.78 mm (mean of each reader's largest axial extent).
    (case,) = list(LidcSource(slab, min_readers=2).cases())
    assert case.case_id == SERIES_UID and len(sorted(case.series_dir().glob("*.dcm"))) == 12
    (nodule,) = case.nodules
    assert nodule.readers == 2
    assert nodule.diameter_mm == pytest.approx(30.78, abs=0.05)
    assert nodule.centre_mm[:2] == pytest.approx((59.81, 71.67), abs=0.3)
    # z: ours is each reader's area-weighted centroid (the centre of mass, as pylidc's centroid);
    # the table averaged the contoured slices' z unweighted, which sits 1.7 mm higher here
    assert nodule.centre_mm[2] == pytest.approx(-102.32, abs=2.0)

    # LUNA16's rule (3 of 4 readers): no truth nodule; the 2-reader nodule is an irrelevant finding
    (strict,) = list(open_source(f"lidc:{slab}").cases())
    assert strict.nodules == []
    (big,) = _near(strict.irrelevant, nodule.centre_mm, 1.0)
    assert big.readers == 2 and big.diameter_mm == pytest.approx(30.78, abs=0.05)
    # < 3 mm marks and non-nodules are irrelevant findings without a diameter (README: each by 3 readers)
    for centre in ((105.34, 27.95, -89.5), (-95.07, 34.08, -89.5), (-93.7, 24.5, -80.75)):
        (found,) = _near(strict.irrelevant, centre, 1.25)
        assert found.readers == 3 and found.diameter_mm == -1.0
    assert all(f.readers <= 4 for f in strict.irrelevant)
