"""Evaluation: LUNA16 matching and FROC / CPM on hand-made cases, truth slice boxes, slice mAP, and the
serving pipeline on a small phantom with a fake detector that answers exactly at the truth."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ctlesion_phantoms import PhantomConfig, generate_case
from ctlesion_phantoms.matching import match_lesions
from ctlesion_phantoms.truth import CaseTruth, NoduleTruth, ScanGeometry
from damoyolo.evaluate import (
    FP_RATES,
    CaseResult,
    ModelInfo,
    case_result,
    eval_options,
    evaluate,
    froc,
    run_detector_on_case,
    slice_map,
    slice_map_inputs,
    truth_slice_boxes,
)
from preprocess_backend.pipeline import preprocess_slab
from preprocess_backend.types import Lesion

GEOMETRY = ScanGeometry(
    rows=512,
    columns=512,
    slices=40,
    pixel_spacing=(0.5, 0.8),
    slice_spacing=1.0,
    slice_thickness=1.0,
    origin=(-200.0, -150.0, -300.0),
)


def _nodule(nid: int, centre_kij: tuple[float, float, float], diameter: float, kind: str = "solid", attachment: str = "isolated") -> NoduleTruth:
    centre_mm = tuple(float(v) for v in GEOMETRY.voxel_to_mm(centre_kij))
    return NoduleTruth(nid, centre_mm, centre_kij, diameter, kind, attachment, 0.0)  # type: ignore[arg-type]


def _truth(case_id: str, nodules: list[NoduleTruth]) -> CaseTruth:
    return CaseTruth(case_id=case_id, seed=0, geometry=GEOMETRY, nodules=nodules)


def _lesion(centre_mm: tuple[float, ...] | np.ndarray, score: float) -> Lesion:
    c = tuple(float(v) for v in centre_mm)
    return Lesion(0, 0, c, 5.0, 5.0, [0], ["1"], score, score, 0.0, "solid", "left", "upper")  # type: ignore[arg-type]


def _at(n: NoduleTruth, score: float, offset: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Lesion:
    return _lesion(np.asarray(n.centre_mm) + np.asarray(offset), score)


FAR = (10_000.0, 10_000.0, 10_000.0)  # a candidate hitting nothing


# ----------------------------------------------------------------------------- matching


def test_hit_is_strictly_inside_the_radius() -> None:
    n = _nodule(1, (20, 200, 200), 10.0)
    truth = _truth("c", [n])
    just_in, on_edge, out = _at(n, 0.9, (4.999, 0, 0)), _at(n, 0.8, (0, 5.0, 0)), _at(n, 0.7, (0, 0, 5.001))
    m = match_lesions([just_in, on_edge, out], truth)
    assert m.lesion_nodule == [1, None, None]
    assert m.nodule_hit == {1: True} and m.nodule_best_score == {1: 0.9}
    assert m.false_positives == 2 and m.true_positives == 1
    # radius_scale widens the criterion
    assert match_lesions([_at(n, 0.5, (0, 0, 9.0))], truth, radius_scale=2.0).lesion_nodule == [1]


def test_duplicate_hits_count_once_with_the_best_score_and_are_not_fps() -> None:
    n = _nodule(7, (20, 200, 200), 12.0)
    truth = _truth("c", [n])
    m = match_lesions([_at(n, 0.6, (1, 0, 0)), _at(n, 0.9), _at(n, 0.4, (0, 2, 0))], truth)
    assert m.lesion_nodule == [7, 7, 7]
    assert m.nodule_best_score[7] == 0.9
    assert m.false_positives == 0 and m.duplicate_hits == 2
    r = froc([CaseResult("c", truth.nodules, m)], bootstrap=0)
    assert r.false_positives == 0 and r.cpm == 1.0


def test_no_lesions_and_no_nodules() -> None:
    n = _nodule(1, (20, 200, 200), 8.0)
    m = match_lesions([], _truth("c", [n]))
    assert m.nodule_hit == {1: False} and math.isnan(m.nodule_best_score[1])
    m2 = match_lesions([_lesion(FAR, 0.5)], _truth("d", []))
    assert m2.false_positives == 1 and m2.lesion_nodule == [None]


# ----------------------------------------------------------------------------- FROC / CPM


def test_perfect_detector_has_cpm_one() -> None:
    results = []
    for i in range(4):
        n = _nodule(1, (20, 100 + 10 * i, 300), 10.0)
        truth = _truth(f"c{i}", [n])
        results.append(case_result([_at(n, 0.9)], truth))
    r = froc(results, bootstrap=200)
    assert r.sensitivities == [1.0] * 7 and r.cpm == 1.0
    assert r.cpm_ci == (1.0, 1.0)
    assert r.nodules == 4 and r.false_positives == 0 and r.scans == 4


def test_known_false_positive_counts_give_known_sensitivities() -> None:
    # 2 scans, 2 nodules each. Ranked: TP .9, FP .8, TP .7, FP .6, TP .5, FP .4, TP .3, FP .2;
    # one FP = 0.5 FP/scan, one nodule = 0.25 sensitivity.
    a, b = _nodule(1, (10, 100, 100), 10.0), _nodule(2, (30, 300, 300), 10.0)
    c, d = _nodule(1, (10, 100, 100), 10.0), _nodule(2, (30, 300, 300), 10.0)
    case1 = case_result([_at(a, 0.9), _at(b, 0.7), _lesion(FAR, 0.8), _lesion(FAR, 0.4)], _truth("s1", [a, b]))
    case2 = case_result([_at(c, 0.5), _at(d, 0.3), _lesion(FAR, 0.6), _lesion(FAR, 0.2)], _truth("s2", [c, d]))
    r = froc([case1, case2], bootstrap=0)
    expected = [0.25, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP/scan
    assert r.fp_rates == FP_RATES
    assert r.sensitivities == pytest.approx(expected)
    assert r.cpm == pytest.approx(sum(expected) / 7)
    assert r.false_positives == 4 and r.candidates == 8
    assert r.curve_fps[-1] == pytest.approx(2.0) and r.curve_sensitivity[-1] == pytest.approx(1.0)
    # the 4 FP/scan operating point keeps everything: threshold is the lowest score
    assert r.threshold_at_target == pytest.approx(0.2)


def test_missed_nodule_caps_the_sensitivity() -> None:
    a, b = _nodule(1, (10, 100, 100), 10.0), _nodule(2, (30, 300, 300), 10.0)
    r = froc([case_result([_at(a, 0.9)], _truth("s", [a, b]))], bootstrap=0)
    assert r.sensitivities == [0.5] * 7 and r.max_sensitivity == 0.5 and r.detected == 1


def test_nodules_below_min_diameter_are_excluded_and_their_hits_ignored() -> None:
    small, big = _nodule(1, (10, 100, 100), 3.5), _nodule(2, (30, 300, 300), 10.0)
    # one scan: the top candidate sits on the 3.5 mm nodule; counted as an FP it would cost 1 FP/scan
    # before the big nodule's hit, and sensitivity at 1/8 would be 0.
    cr = case_result([_at(small, 0.9), _at(big, 0.5), _lesion(FAR, 0.3)], _truth("s", [small, big]))
    r = froc([cr], min_diameter_mm=4.0, bootstrap=0)
    assert r.nodules == 1 and r.excluded_nodules == 1
    assert r.false_positives == 1
    assert r.sensitivities == [1.0] * 7
    # the size breakdown still shows the excluded bin; type / attachment only count the >= 4 mm nodules
    assert r.breakdown["size_mm"]["3-4"].nodules == 1 and r.breakdown["size_mm"]["10-20"].detected == 1
    assert sum(g.nodules for g in r.breakdown["type"].values()) == 1
    everything = froc([cr], min_diameter_mm=0.0, bootstrap=0)
    assert everything.nodules == 2 and everything.sensitivities == [1.0] * 7


def test_breakdown_at_four_fp_per_scan() -> None:
    # 1 scan, 5 FPs above the ground-glass nodule's score: at 4 FP/scan it is not yet detected
    solid, ggo = _nodule(1, (10, 100, 100), 5.0, "solid"), _nodule(2, (30, 300, 300), 25.0, "ground_glass", "juxtapleural")
    fps = [_lesion((1000.0 + i, 0, 0), 0.8 - 0.01 * i) for i in range(5)]
    r = froc([case_result([_at(solid, 0.9), *fps, _at(ggo, 0.5)], _truth("s", [solid, ggo]))], bootstrap=0)
    assert r.sensitivity_at(4.0) == 0.5 and r.sensitivity_at(8.0) == 1.0
    assert r.breakdown["type"]["solid"].sensitivity == 1.0
    assert r.breakdown["type"]["ground_glass"].sensitivity == 0.0
    assert r.breakdown["attachment"]["juxtapleural"].nodules == 1
    assert r.breakdown["size_mm"]["4-6"].detected == 1 and r.breakdown["size_mm"]["20-30"].detected == 0
    assert math.isnan(r.breakdown["type"]["part_solid"].sensitivity)
    json.dumps(r.to_dict())  # JSON-safe (inf / NaN become null)


def test_candidate_cap_per_scan() -> None:
    n = _nodule(1, (10, 100, 100), 10.0)
    many = [_lesion((1000.0 + i, 0, 0), 0.9) for i in range(150)] + [_at(n, 0.1)]
    cr = case_result(many, _truth("s", [n]), max_candidates=100)
    assert len(cr.match.lesion_scores) == 100 and not cr.match.nodule_hit[1]


def test_bootstrap_interval_brackets_the_cpm() -> None:
    rng = np.random.default_rng(0)
    results = []
    for i in range(12):
        n = _nodule(1, (20, 200, 200), 10.0)
        les = [_at(n, float(rng.uniform(0.2, 1.0)))] if i % 4 else []
        les += [_lesion((1000.0 + j, 0, 0), float(rng.uniform(0, 1))) for j in range(int(rng.integers(0, 6)))]
        results.append(case_result(les, _truth(f"c{i}", [n])))
    r = froc(results, bootstrap=300, seed=1)
    assert r.cpm_ci is not None and r.cpm_ci[0] <= r.cpm <= r.cpm_ci[1] and r.cpm_ci[0] < r.cpm_ci[1]
    assert len(r.sensitivity_ci or []) == 7 and len(r.band_fps) == len(r.band_low) == len(r.band_high)


# ----------------------------------------------------------------------------- truth slice boxes + mAP


def test_truth_slice_boxes_are_sphere_cross_sections() -> None:
    n = _nodule(1, (10.0, 100.0, 200.0), 10.0)  # R = 5 mm, slices 1 mm apart, pixels 0.5 (row) x 0.8 (col) mm
    boxes = truth_slice_boxes(_truth("c", [n]))
    # r >= R / 2 = 2.5 mm while |dz| <= sqrt(25 - 6.25) = 4.33 mm: slices 6..14
    assert sorted(boxes) == list(range(6, 15))
    x1, y1, x2, y2 = boxes[10][0]
    assert (x2 - x1) == pytest.approx(10.0 / 0.8) and (y2 - y1) == pytest.approx(10.0 / 0.5)
    assert ((x1 + x2) / 2, (y1 + y2) / 2) == pytest.approx((200.0, 100.0))
    w14 = boxes[14][0][2] - boxes[14][0][0]
    assert w14 == pytest.approx(2 * math.sqrt(25 - 16) / 0.8)
    assert 5 not in boxes and 15 not in boxes  # |dz| = 5 mm: on the sphere's surface
    assert sorted(truth_slice_boxes(_truth("c", [n]), min_fraction=0.0, min_radius_mm=0.5)) == list(range(6, 15))
    assert truth_slice_boxes(_truth("c", [])) == {}


def test_slice_map_perfect_and_empty() -> None:
    gt = [(np.array([[10.0, 10.0, 30.0, 30.0]]), np.array([0])), (np.zeros((0, 4)), np.zeros(0)), (np.array([[100.0, 50.0, 120.0, 80.0]]), np.array([0]))]
    perfect = [(b, np.full(len(b), 0.9), np.zeros(len(b), int)) for b, _ in gt]
    m = slice_map(perfect, gt)
    assert m["map50"] == pytest.approx(1.0) and m["map50_95"] == pytest.approx(1.0)
    empty = [(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)) for _ in gt]
    assert slice_map(empty, gt)["map50"] == 0.0
    # a box shifted to IoU ~0.33 misses at 0.5: half the truth found
    half = [perfect[0], perfect[1], (np.array([[110.0, 50.0, 130.0, 80.0]]), np.array([0.9]), np.array([0]))]
    assert slice_map(half, gt)["map50"] == pytest.approx(0.5, abs=0.02)
    assert math.isnan(slice_map(empty[:1], [gt[1]])["map50"])


# ----------------------------------------------------------------------------- the serving pipeline on a phantom

SMALL = PhantomConfig(
    slices_max=24,
    nodules_min=1,
    nodules_max=1,
    p_no_nodules=0.0,
    diameter_mm=(8.0, 12.0),
    attachment_weights={"isolated": 1.0},
)


def _series_bytes(case_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((case_dir / "series").glob("*.dcm"))]


def _oracle(case_dirs: list[Path], truths: list[CaseTruth]) -> tuple[object, list[int]]:
    """A fake detector answering exactly the truth box of whatever slice it is shown.

    It recognises a slice by the bytes of its centre 2.5D channel (the slice itself), so it works
    whatever slabs, halos and batches the code under test cuts the series into; ``calls`` counts images.
    """
    table: dict[str, np.ndarray] = {}
    for case_dir, truth in zip(case_dirs, truths, strict=True):
        images = preprocess_slab(_series_bytes(case_dir), eval_options()).images
        boxes = truth_slice_boxes(truth)
        for k in range(len(images)):
            table[hashlib.sha1(images[k, 1].tobytes()).hexdigest()] = boxes.get(k, np.zeros((0, 4)))
    calls = [0]

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls[0] += len(images)
        scores = np.zeros((len(images), 4, 1), np.float32)
        out = np.zeros((len(images), 4, 4), np.float32)
        for i, img in enumerate(images):
            b = table[hashlib.sha1(np.ascontiguousarray(img[1]).tobytes()).hexdigest()]
            scores[i, : len(b), 0] = 0.9
            out[i, : len(b)] = b
        return scores, out

    return predict, calls


def test_run_detector_on_case_finds_the_nodule(tmp_path: Path) -> None:
    truth = generate_case(11, tmp_path, SMALL)
    case_dir = tmp_path / truth.case_id
    predict, calls = _oracle([case_dir], [truth])
    options = eval_options(anatomy="none")  # the oracle's boxes are the test; the lung filter is tested elsewhere
    dets, lesions = run_detector_on_case(predict, case_dir, options, slab_size=5, halo=1)
    expected = truth_slice_boxes(truth)
    assert expected, "the phantom's nodule must cross some slices"
    assert sorted(d.slice_index for d in dets) == sorted(expected)  # series indices, no halo duplicates
    n_slices = truth.geometry.slices
    assert calls[0] == n_slices + 2 * (math.ceil(n_slices / 5) - 1)  # every slab sent with its halo
    for d in dets:
        np.testing.assert_allclose(d.box_px, expected[d.slice_index][0], atol=1e-3)
    assert len(lesions) == 1
    m = match_lesions(lesions, truth)
    nid = truth.nodules[0].nodule_id
    assert m.lesion_nodule == [nid] and m.nodule_hit[nid]
    dist = np.linalg.norm(np.subtract(lesions[0].centre_mm, truth.nodules[0].centre_mm))
    assert dist < truth.geometry.slice_spacing  # the linked centre lies at the truth centre (z sampled by slices)
    preds, gts = slice_map_inputs(dets, truth)
    assert slice_map(preds, gts)["map50"] == pytest.approx(1.0)


def test_evaluate_writes_metrics_and_plot(tmp_path: Path) -> None:
    from damoyolo.evaluate import ensure_cases

    cases_dir = tmp_path / "cases"
    dirs = ensure_cases(cases_dir, 2, 900_000, progress=False, config=SMALL)
    truths = [CaseTruth.load(d / "truth.json") for d in dirs]
    predict, _ = _oracle(dirs, truths)
    info = ModelInfo(source="oracle", backend="fake", model_size=512, in_channels=3)
    report = evaluate(
        Path("oracle"), cases_dir, tmp_path / "out", cases=2, seed=900_000, options=eval_options(anatomy="none"),
        bootstrap=50, progress=False, predictor=(predict, info),
    )
    assert report.froc_all.cpm == 1.0 and report.slice_map["map50"] == pytest.approx(1.0)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["froc_all"]["sensitivities"]["1/8"] == 1.0 and len(metrics["per_case"]) == 2
    assert (tmp_path / "out" / "froc.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="seed"):
        ensure_cases(cases_dir, 2, 900_500)


def test_torch_predictor_runs_a_fused_checkpoint(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import damoyolo
    from damoyolo.evaluate import torch_predictor

    torch.manual_seed(0)
    model = damoyolo.build_model("Ns", num_classes=1, in_channels=3)
    path = tmp_path / "tiny.pt"
    meta = {"variant": "Ns", "num_classes": 1, "in_channels": 3, "model_size": 64, "window": "mediastinum"}
    torch.save({"model": model.state_dict(), "meta": meta}, path)
    predict, info = torch_predictor(path)
    assert (info.model_size, info.in_channels, info.window, info.backend) == (64, 3, "mediastinum", "torch")
    scores, boxes = predict(np.zeros((2, 3, 64, 64), np.float32))
    anchors = 8 * 8 + 4 * 4 + 2 * 2  # strides 8, 16, 32
    assert isinstance(scores, np.ndarray) and scores.shape == (2, anchors, 1) and boxes.shape == (2, anchors, 4)


def test_breakdown_by_the_scans_slice_thickness_and_pixel_size() -> None:
    """A thick-slice scan's miss shows in its slice / pixel bin, at 4 FP/scan and at the shipped threshold."""
    from dataclasses import replace

    from damoyolo.eval.evaluation import operating_point_stats

    thin, thick = replace(GEOMETRY, slice_thickness=1.0, pixel_spacing=(0.6, 0.6)), replace(GEOMETRY, slice_thickness=5.0, pixel_spacing=(0.9, 0.9))
    a, b = _nodule(1, (20, 200, 200), 10.0), _nodule(1, (20, 200, 200), 10.0)
    results = [
        case_result([_at(a, 0.9)], CaseTruth(case_id="thin", seed=0, geometry=thin, nodules=[a])),
        case_result([_lesion(FAR, 0.8)], CaseTruth(case_id="thick", seed=0, geometry=thick, nodules=[b])),
    ]
    assert (results[1].slice_mm, results[1].pixel_mm) == (5.0, 0.9)
    bd = froc(results, bootstrap=0).breakdown
    assert (bd["slice_mm"]["<=1.25"].detected, bd["slice_mm"]["<=1.25"].nodules) == (1, 1)
    assert (bd["slice_mm"][">2.5"].detected, bd["slice_mm"][">2.5"].nodules) == (0, 1)
    assert bd["pixel_mm"]["<0.7"].nodules == 1 and bd["pixel_mm"][">0.85"].nodules == 1 and bd["pixel_mm"]["0.7-0.85"].nodules == 0
    op = operating_point_stats(results, 0.5)
    assert op["by_scan"]["slice_mm"] == {
        "<=1.25": {"nodules": 1, "detected": 1, "scans": 1, "false_positives": 0},
        ">2.5": {"nodules": 1, "detected": 0, "scans": 1, "false_positives": 1},
    }


def test_operating_point_holds_the_limit_on_every_validation_group() -> None:
    """ctlesion_fpr.train's threshold: the strictest group decides, not the pooled mean (a group of
    clean scans must not buy FP room for a harder one)."""
    from ctlesion_fpr.train import operating_point

    a = _nodule(1, (20, 200, 200), 10.0)
    clean = [case_result([_at(a, 0.9)], _truth(f"d{i}", [a])) for i in range(3)]
    noisy = [case_result([_at(a, 0.9), _lesion(FAR, 0.6), _lesion(FAR, 0.5), _lesion(FAR, 0.4)], _truth(f"w{i}", [a])) for i in range(1)]
    results, groups = clean + noisy, ["default"] * 3 + ["wide"]
    pooled, _, pooled_fp = operating_point(results, 1.0)
    strict, sens, fp = operating_point(results, 1.0, groups)
    assert pooled == 0.0 and pooled_fp == pytest.approx(0.75)  # 3 FPs over 4 scans: all pass the pooled limit
    assert strict == pytest.approx(0.5 + 1e-6)  # the noisy scan alone may keep 1 FP: only the 0.6 one
    assert sens == 1.0 and fp == pytest.approx(0.25)
