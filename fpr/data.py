"""Mined cubes on disk -> arrays for training and per-case lesions for validation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctlesion_fpr.mining import LABEL_IGNORED, load_lesions
from preprocess_backend.cubes import CubeSpec
from preprocess_backend.types import Lesion


@dataclass
class CubeSet:
    cubes: np.ndarray  # uint8 [N, D, H, W]
    label: np.ndarray  # int8 [N] 1 nodule / 0 false positive
    source: np.ndarray  # int8 [N] 0 candidate / 1 truth-centred
    det_score: np.ndarray  # float32 [N] (NaN for truth-centred)
    spec: CubeSpec


def load_training(mined_dir: Path) -> CubeSet:
    """Every case's cubes, ignored candidates left out."""
    parts: dict[str, list[np.ndarray]] = {"cubes": [], "label": [], "source": [], "det_score": []}
    spec = None
    for f in sorted(Path(mined_dir).glob("*.npz")):
        if f.name.endswith(".tmp.npz"):  # a miner still writing it
            continue
        with np.load(f) as z:
            keep = z["label"] != LABEL_IGNORED
            for k in parts:
                parts[k].append(z[k][keep])
            spec = spec or CubeSpec.from_dict(json.loads(str(z["spec"])))
    if spec is None:
        raise FileNotFoundError(f"no mined cases in {mined_dir}")
    return CubeSet(**{k: np.concatenate(v) for k, v in parts.items()}, spec=spec)  # type: ignore[arg-type]


@dataclass
class EvalCase:
    case_id: str
    lesions: list[Lesion]
    cubes: np.ndarray  # one per lesion, same order
    truth_path: Path
    group: str = ""  # the validation set it came from (each --val of ctlesion_fpr.train is one group)
    airway_hu: np.ndarray | None = None  # [lesions, planes] airway probes (None: mined before the probe)

    def vetoed(self, probabilities: np.ndarray, keep: list[int]) -> np.ndarray:
        """``probabilities`` of lesions ``keep`` with airway lumens set to 0, as the client does."""
        from preprocess_backend.airways import veto_airways

        probes = None if self.airway_hu is None else self.airway_hu[keep]
        return veto_airways(probabilities, probes, [self.lesions[i].diameter_mm for i in keep])


def load_eval(mined_dir: Path, cases_dir: Path) -> list[EvalCase]:
    """Mined evaluation cases (one untransformed cube per candidate lesion) with their truth files;
    their ``group`` is ``cases_dir``."""
    out = []
    for f in sorted(Path(mined_dir).glob("*.npz")):
        if f.name.endswith(".tmp.npz"):  # a miner still writing it
            continue
        with np.load(f) as z:
            lesions = load_lesions(z)
            idx = z["lesion_index"]
            cubes = np.zeros((len(lesions), *z["cubes"].shape[1:]), np.uint8)
            # the first cube of each candidate is the untransformed one (training files add copies)
            first = np.unique(idx, return_index=True)[1]
            first = first[idx[first] >= 0]
            cubes[idx[first]] = z["cubes"][first]
            case_id = str(z["case_id"])
            probes = z["airway_hu"] if "airway_hu" in z.files else None
        out.append(EvalCase(case_id, lesions, cubes, Path(cases_dir) / case_id / "truth.json", str(cases_dir), probes))
    return out
