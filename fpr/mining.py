"""Mine labelled candidate cubes from phantom series through the serving pipeline.

For each case: the detector pipeline (``run_detector_on_case``: the slabs, preprocessing, detector,
postprocessing and 3D linking the server and client run) at the evaluation's low threshold gives
the candidate lesions; LUNA16 matching labels them (hit = nodule, ignored = neither, else false
positive); cubes are cut around each with ``preprocess_backend.cubes``. Training cases add
augmented copies (in-plane rotation, scale, shift) and cubes centred on every truth nodule, so
nodules the detector misses still teach the model. One ``.npz`` per case: resumable, and the
detector never runs twice on a case. Each candidate's airway probe (``preprocess_backend.airways``)
is stored beside its cubes; ``--add-probes`` adds it to files mined before the probe existed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocess_backend.airways import probe_profiles
from preprocess_backend.cubes import DEFAULT_CUBE, CubeSpec, decode_codes, extract_cubes
from preprocess_backend.matching import match_lesions
from preprocess_backend.series import SeriesGeometry
from preprocess_backend.types import Lesion, Options

log = logging.getLogger(__name__)

LABEL_NODULE, LABEL_FP, LABEL_IGNORED = 1, 0, -1
SOURCE_CANDIDATE, SOURCE_TRUTH = 0, 1


@dataclass
class Augment:
    """Copies per cube and their random transform ranges (training only)."""

    positive_copies: int = 8
    negative_copies: int = 2
    truth_copies: int = 8
    max_shift_mm: float = 1.5
    scale: tuple[float, float] = (0.85, 1.15)


def series_codes(case_dir: Path, spec: CubeSpec = DEFAULT_CUBE) -> tuple[list[np.ndarray], SeriesGeometry]:
    """uint8 cube codes of every slice of a case's series in series order, and its geometry."""
    d = case_dir / "series" if (case_dir / "series").is_dir() else case_dir
    files = sorted(p for p in d.iterdir() if p.is_file())
    return decode_codes([p.read_bytes() for p in files], spec)


def _variants(centre: np.ndarray, copies: int, aug: Augment, rng: np.random.Generator, jitter_mm: float = 0.0):
    """(centres [C, 3], rotation [C], scale [C]); copy 0 is the untransformed cube."""
    c = np.repeat(centre[None], copies, axis=0).astype(np.float64)
    rot = rng.uniform(0, 2 * np.pi, copies)
    sc = rng.uniform(*aug.scale, copies)
    shift = rng.uniform(-1, 1, (copies, 3)) * max(aug.max_shift_mm, jitter_mm)
    rot[0], sc[0], shift[0] = 0.0, 1.0, 0.0
    return c + shift, rot, sc


def mine_case(
    predict_fn, case_dir: Path, out_path: Path, options: Options, augment: Augment | None, seed: int,
    spec: CubeSpec = DEFAULT_CUBE,
) -> dict[str, int]:
    """Run the pipeline on one case and write its labelled cubes to ``out_path`` (.npz)."""
    from ctlesion_phantoms.truth import CaseTruth
    from damoyolo.evaluate import run_detector_on_case

    truth = CaseTruth.load(case_dir / "truth.json")
    _, lesions = run_detector_on_case(predict_fn, case_dir, options)
    match = match_lesions(lesions, truth)
    labels = []
    for i in range(len(lesions)):
        if match.lesion_nodule[i] is not None:
            labels.append(LABEL_NODULE)
        elif match.ignored(i):
            labels.append(LABEL_IGNORED)
        else:
            labels.append(LABEL_FP)
    codes, geometry = series_codes(case_dir, spec)
    rng = np.random.default_rng(seed)
    centres, rots, scales, lab, src, det, lesion_index = [], [], [], [], [], [], []
    for i, les in enumerate(lesions):
        copies = 1 if augment is None else (augment.positive_copies if labels[i] == LABEL_NODULE else augment.negative_copies)
        if augment is None:
            c, r, s = np.asarray(les.centre_mm, np.float64)[None], np.zeros(1), np.ones(1)
        else:
            c, r, s = _variants(np.asarray(les.centre_mm), copies, augment, rng)
        centres.append(c), rots.append(r), scales.append(s)
        lab += [labels[i]] * len(c)
        src += [SOURCE_CANDIDATE] * len(c)
        det += [les.max_score] * len(c)
        lesion_index += [i] * len(c)
    if augment is not None:
        for n in truth.nodules:
            if n.diameter_mm < 3.0:
                continue
            c, r, s = _variants(np.asarray(n.centre_mm), augment.truth_copies, augment, rng, jitter_mm=0.2 * n.diameter_mm)
            centres.append(c), rots.append(r), scales.append(s)
            lab += [LABEL_NODULE] * len(c)
            src += [SOURCE_TRUTH] * len(c)
            det += [np.nan] * len(c)
            lesion_index += [-1] * len(c)
    if centres:
        cubes = extract_cubes(codes, geometry, np.concatenate(centres), spec, rotation_rad=np.concatenate(rots), scale=np.concatenate(scales))
    else:
        cubes = np.zeros((0, *spec.shape), np.uint8)
    _write(out_path, cubes=cubes, label=np.asarray(lab, np.int8), source=np.asarray(src, np.int8),
           det_score=np.asarray(det, np.float32), lesion_index=np.asarray(lesion_index, np.int32),
           lesions=np.asarray(json.dumps([les.to_dict() for les in lesions])), case_id=np.asarray(truth.case_id),
           spec=np.asarray(json.dumps(spec.to_dict())), airway_hu=_probes(codes, geometry, lesions))  # fmt: skip
    return {"lesions": len(lesions), "nodule": labels.count(LABEL_NODULE), "fp": labels.count(LABEL_FP), "cubes": int(cubes.shape[0])}


def _probes(codes: list, geometry: SeriesGeometry, lesions: list[Lesion]) -> np.ndarray:
    """float32 [lesions, planes]: each candidate lesion's airway probe, cut from the whole series."""
    return probe_profiles(codes, geometry, np.asarray([les.centre_mm for les in lesions], np.float64).reshape(-1, 3))


def _write(out_path: Path, **arrays: np.ndarray) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(f".{os.getpid()}.tmp.npz")  # several miners may share a folder
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out_path)


def add_probes(mined: Path, cases_dir: Path) -> int:
    """Add the airway probes to mined files without them (no detector run); returns files updated."""
    from tqdm import tqdm

    files = [f for f in sorted(Path(mined).glob("*.npz")) if not f.name.endswith(".tmp.npz")]
    done = 0
    for f in tqdm(files, desc="probes", unit="case", file=sys.stderr):
        with np.load(f) as z:
            if "airway_hu" in z.files:
                continue
            arrays = {k: z[k] for k in z.files}
        codes, geometry = series_codes(Path(cases_dir) / str(arrays["case_id"]))
        arrays["airway_hu"] = _probes(codes, geometry, [Lesion.from_dict(d) for d in json.loads(str(arrays["lesions"]))])
        _write(f, **arrays)
        done += 1
    return done


def load_lesions(npz: np.lib.npyio.NpzFile) -> list[Lesion]:
    return [Lesion.from_dict(d) for d in json.loads(str(npz["lesions"]))]


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from damoyolo.evaluate import onnx_predictor

    p = argparse.ArgumentParser(prog="python -m ctlesion_fpr.mining", description=__doc__.splitlines()[0])
    p.add_argument("--cases-dir", type=Path, required=True, help="phantom cases (DIR/<case>/series + truth.json)")
    p.add_argument("--out", type=Path, required=True, help="one <case_id>.npz per case")
    p.add_argument("--onnx", type=Path, help="detector ONNX (fp32 or INT8) run as the server runs it")
    p.add_argument("--add-probes", action="store_true",
                   help="only add the airway probes to the files in --out that lack them (mined before the probe)")
    p.add_argument("--augment", action="store_true", help="training: augmented copies + truth-centred cubes")
    p.add_argument("--limit", type=int, default=0, help="at most this many cases (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score-threshold", type=float, default=None,
                   help="per-slice detector threshold before 3D linking (default: the evaluation's low one); the served "
                   "FPR model's candidate threshold gives the lesions the client sends it, linked as the client links them")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if a.add_probes:
        log.info("airway probes added to %d files in %s", add_probes(a.out, a.cases_dir), a.out)
        return 0
    if a.onnx is None:
        p.error("--onnx is required to mine")
    predict_fn, info = onnx_predictor(a.onnx)
    options = info.options() if a.score_threshold is None else info.options(score_threshold=a.score_threshold)
    cases = sorted(d for d in a.cases_dir.iterdir() if (d / "truth.json").exists())
    if a.limit:
        cases = cases[: a.limit]
    t0 = time.perf_counter()
    totals: dict[str, int] = {}
    for i, case_dir in enumerate(tqdm(cases, desc="mine", unit="case", file=sys.stderr)):
        out = a.out / f"{case_dir.name}.npz"
        if out.exists():
            continue
        stats = mine_case(predict_fn, case_dir, out, options, Augment() if a.augment else None, a.seed * 100_000 + i)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
    log.info("mined %d cases in %.0f s: %s", len(cases), time.perf_counter() - t0, totals)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
