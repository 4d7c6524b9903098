"""LUNA16 format end to end on small data written in it: phantom series exported as MetaImage
(.mhd/.raw via SimpleITK) with annotations.csv and annotations_excluded.csv, read back through
``damoyolo.data``, served through the DICOM cache and scored with the official protocol against a
hand computation of the CPM."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from ctlesion_phantoms import PhantomConfig, generate_case  # noqa: E402
from ctlesion_phantoms.truth import CaseTruth  # noqa: E402
from damoyolo.data import open_source  # noqa: E402
from damoyolo.data.luna16 import Luna16Source  # noqa: E402
from damoyolo.eval.dataset_eval import evaluate_source  # noqa: E402
from damoyolo.eval.runner import ModelInfo, eval_options, order_series, series_files  # noqa: E402
from damoyolo.eval.truth_geometry import SeriesTruth, truth_slice_boxes  # noqa: E402
from preprocess_backend.pipeline import preprocess_slab  # noqa: E402

SMALL = PhantomConfig(
    slices_max=24, nodules_min=1, nodules_max=1, p_no_nodules=0.0, diameter_mm=(8.0, 12.0),
    attachment_weights={"isolated": 1.0},
)
HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]


def uid_of(seed: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{seed}"


def phantom_to_mhd(seed: int, work: Path, mhd: Path, flip_z: bool = False) -> CaseTruth:
    """A phantom's DICOM series as a MetaImage volume, as LUNA16 made its volumes from DICOM.

    ``flip_z`` stores the slices in descending z with direction z = -1 (same physical image).
    """
    truth = generate_case(seed, work, SMALL)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(work / truth.case_id / "series")))
    image = reader.Execute()
    if flip_z:
        arr = sitk.GetArrayFromImage(image)[::-1]
        flipped = sitk.GetImageFromArray(np.ascontiguousarray(arr))
        flipped.SetSpacing(image.GetSpacing())
        flipped.SetOrigin(image.TransformIndexToPhysicalPoint((0, 0, image.GetSize()[2] - 1)))
        flipped.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
        image = flipped
    mhd.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(mhd))  # .mhd header + .raw pixels
    return truth


def write_csv(path: Path, rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)


def nodule_row(uid: str, truth: CaseTruth) -> list[object]:
    n = truth.nodules[0]
    return [uid, *n.centre_mm, n.diameter_mm]


def test_luna16_reader_round_trip_matches_the_dicom_path(tmp_path: Path) -> None:
    root = tmp_path / "luna16"
    truth = phantom_to_mhd(11, tmp_path / "ph", root / "subset3" / f"{uid_of(21)}.mhd")
    phantom_to_mhd(11, tmp_path / "ph2", root / "subset4" / f"{uid_of(22)}.mhd", flip_z=True)
    assert (root / "subset3" / f"{uid_of(21)}.raw").exists()
    write_csv(root / "annotations.csv", [nodule_row(uid_of(21), truth), nodule_row(uid_of(22), truth)])
    write_csv(root / "annotations_excluded.csv", [[uid_of(21), 10.0, 20.0, -180.0, -1]])

    cases = list(Luna16Source(root, tmp_path / "cache").cases())
    assert [(c.case_id, c.fold) for c in cases] == [(uid_of(21), 3), (uid_of(22), 4)]
    c = cases[0]
    n = truth.nodules[0]
    assert c.nodules[0].centre_mm == pytest.approx(n.centre_mm) and c.nodules[0].diameter_mm == pytest.approx(n.diameter_mm)
    assert [(x.centre_mm, x.diameter_mm) for x in c.irrelevant] == [((10.0, 20.0, -180.0), -1.0)]
    assert [x.case_id for x in Luna16Source(root, tmp_path / "cache").cases({4})] == [uid_of(22)]

    # the DICOM written from the MetaImage gives the server exactly the images of the original series
    options = eval_options()
    original_files, original_geometry = order_series(series_files(tmp_path / "ph" / truth.case_id / "series"), options)
    reference = preprocess_slab([f.read_bytes() for f in original_files], options).images
    for case in cases:  # identity direction, and slices stored top-down with direction z = -1
        files, geometry = order_series(series_files(case.series_dir()), options)
        np.testing.assert_allclose(geometry.positions, original_geometry.positions, atol=1e-3)
        np.testing.assert_allclose(geometry.orientation, original_geometry.orientation, atol=1e-6)
        assert geometry.pixel_spacing == pytest.approx(original_geometry.pixel_spacing)
        np.testing.assert_array_equal(preprocess_slab([f.read_bytes() for f in files], options).images, reference)
        # world coordinates land where the phantom's voxel truth says: same boxes on the same slices
        boxes = truth_slice_boxes(SeriesTruth(case.case_id, case.nodules, geometry))
        expected = truth_slice_boxes(truth)
        assert sorted(boxes) == sorted(expected) and len(expected) > 2
        for k in expected:
            np.testing.assert_allclose(boxes[k], expected[k], atol=0.05)
    # cached: a second read does not rewrite the series
    first = sorted(cases[0].series_dir().glob("*.dcm"))[0]
    mtime = first.stat().st_mtime_ns
    assert sorted(next(iter(Luna16Source(root, tmp_path / "cache").cases())).series_dir().glob("*.dcm"))[0].stat().st_mtime_ns == mtime


def _box_at(col: float, row: float, size_px: float = 11.0) -> np.ndarray:
    return np.array([col - size_px / 2, row - size_px / 2, col + size_px / 2, row + size_px / 2])


class Oracle:
    """A fake detector: answers given (box, score) lists for slices it recognises by their bytes."""

    def __init__(self) -> None:
        self.table: dict[str, list[tuple[np.ndarray, float]]] = {}

    @staticmethod
    def key(centre_channel: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(centre_channel).tobytes()).hexdigest()

    def add(self, series_dir: Path, answers: dict[int, list[tuple[np.ndarray, float]]]) -> None:
        files, _ = order_series(series_files(series_dir), eval_options())
        images = preprocess_slab([f.read_bytes() for f in files], eval_options()).images
        for k in range(len(images)):
            self.table.setdefault(self.key(images[k, 1]), []).extend(answers.get(k, []))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = np.zeros((len(images), 8, 1), np.float32)
        boxes = np.zeros((len(images), 8, 4), np.float32)
        for i, img in enumerate(images):
            for j, (b, s) in enumerate(self.table[self.key(img[1])]):
                scores[i, j, 0], boxes[i, j] = s, b
        return scores, boxes


def build_fold0(tmp_path: Path) -> tuple[Path, dict[str, CaseTruth]]:
    """subset0: scans A, B, C (phantom seeds 12, 14, 16), each with its phantom nodule; A and B annotated."""
    root = tmp_path / "luna16"
    truths = {name: phantom_to_mhd(seed, tmp_path / "ph", root / "subset0" / f"{uid_of(seed)}.mhd")
              for name, seed in (("A", 12), ("B", 14), ("C", 16))}
    write_csv(root / "annotations.csv", [nodule_row(uid_of(12), truths["A"]), nodule_row(uid_of(14), truths["B"])])
    return root, truths


def test_luna16_protocol_cpm_equals_the_hand_computation(tmp_path: Path) -> None:
    root, truths = build_fold0(tmp_path)
    source = open_source(f"luna16:{root}", tmp_path / "cache")
    cases = {c.case_id: c for c in source.cases({0})}
    oracle = Oracle()
    fp_slices = range(10, 14)  # a 4-slice false positive (~10 mm box) far from the nodule

    def answers(name: str, tp_score: float | None, fps: list[tuple[float, float, float]]) -> dict[int, list]:
        case = cases[uid_of({"A": 12, "B": 14, "C": 16}[name])]
        _, geometry = order_series(series_files(case.series_dir()), eval_options())
        out: dict[int, list] = {}
        if tp_score is not None:
            for k, b in truth_slice_boxes(SeriesTruth(case.case_id, case.nodules, geometry)).items():
                out.setdefault(k, []).append((b[0], tp_score))
        for col, row, score in fps:
            for k in fp_slices:
                out.setdefault(k, []).append((_box_at(col, row), score))
        oracle.add(case.series_dir(), out)
        return out

    # scores chosen so the staircase has no ties: A: TP 0.9, FP 0.8, a candidate on an excluded finding 0.95
    # B: FP 0.7, TP 0.6.  C (no annotation): FP 0.5.
    answers("A", 0.9, [(420.0, 120.0, 0.8), (420.0, 400.0, 0.95)])
    answers("B", 0.6, [(420.0, 120.0, 0.7)])
    answers("C", None, [(420.0, 120.0, 0.5)])
    a_case = cases[uid_of(12)]
    _, ga = order_series(series_files(a_case.series_dir()), eval_options())
    excluded_mm = ga.pixel_to_patient(11.5, 420.0, 400.0)  # centre of the 4-slice candidate (slices 10..13)
    excluded_mm[2] = (ga.positions[11, 2] + ga.positions[12, 2]) / 2
    write_csv(root / "annotations_excluded.csv", [[uid_of(12), *excluded_mm, -1]])  # no diameter: 10 mm, as LUNA16

    # Hand computation, 3 scans, 2 nodules, candidates by score:
    #   0.9 TP(A) -> (0 FP/scan, 0.5); 0.8 FP(A) -> (1/3, 0.5); 0.7 FP(B) -> (2/3, 0.5); 0.6 TP(B) -> (2/3, 1.0);
    #   0.5 FP(C) -> (1, 1.0).  Sensitivity at 1/8, 1/4, 1/2 = 0.5; at 1, 2, 4, 8 = 1.0.
    expected = [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    info = ModelInfo(source="oracle", backend="fake", model_size=512, in_channels=3)
    options = eval_options(anatomy="none")
    source = open_source(f"luna16:{root}", tmp_path / "cache")
    report = evaluate_source((oracle, info), source, {0}, tmp_path / "eval", options, bootstrap=200, progress=False)
    r = report.froc_all
    assert r.scans == 3 and r.nodules == 2 and r.false_positives == 3
    assert r.sensitivities == pytest.approx(expected)
    assert r.cpm == pytest.approx(5.5 / 7)
    assert r.cpm_ci is not None and r.cpm_ci[0] <= r.cpm <= r.cpm_ci[1]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["froc_all"]["cpm"] == pytest.approx(5.5 / 7) and metrics["protocol"] == "luna16 fold 0"
    assert sum(pc["match"]["ignored"] for pc in metrics["per_case"]) == 1
    with open(tmp_path / "eval" / "candidates.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["seriesuid"] for r in rows} == {uid_of(12), uid_of(14), uid_of(16)}

    # the submission file scored on its own (as ten folds' files together would be): the same figure
    from damoyolo.eval.cli import main

    assert main(["--submission", str(tmp_path / "eval" / "candidates.csv"), "--data", f"luna16:{root}", "--fold", "0",
                 "--bootstrap", "0", "--out", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "metrics.json").read_text())["froc_all"]
    assert scored["cpm"] == pytest.approx(5.5 / 7) and scored["false_positives"] == 3

    # without the excluded finding its candidate is the top false positive:
    #   0.95 FP(A) -> (1/3, 0); 0.9 TP(A) -> (1/3, 0.5); ... -> 1/8, 1/4: 0; 1/2: 0.5; 1..8: 1.0
    (root / "annotations_excluded.csv").unlink()
    plain = evaluate_source((oracle, info), open_source(f"luna16:{root}", tmp_path / "cache"), {0}, tmp_path / "eval2",
                            options, bootstrap=0, progress=False)
    assert plain.froc_all.sensitivities == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert plain.froc_all.cpm == pytest.approx(4.5 / 7) and not math.isclose(plain.froc_all.cpm, r.cpm)


def test_evaluate_refuses_folds_the_checkpoint_was_trained_on(tmp_path: Path) -> None:
    from damoyolo.data import DataError

    root = tmp_path / "luna16"
    (root / "subset1").mkdir(parents=True)
    write_csv(root / "annotations.csv", [])
    info = ModelInfo(source="m.pt", backend="torch", model_size=512, in_channels=3,
                     meta={"train_config": {"data": f"luna16:{root}", "test_fold": 0}})
    source = open_source(f"luna16:{root}", tmp_path / "cache")
    with pytest.raises(DataError, match=r"trained or validated on fold\(s\) \[1\]"):
        evaluate_source((lambda x: x, info), source, {1}, tmp_path / "eval", progress=False)
    with pytest.raises(FileNotFoundError, match="no subset"):  # fold 0 is held out: allowed, but no volume here
        evaluate_source((lambda x: x, info), source, {0}, tmp_path / "eval", progress=False)
