"""The served pipeline's second stage in-process: 3D false-positive reduction and the 3D lesion rules.

What the client does after its ``lesion_fpr`` requests (client/fpr.py), with the same shared code:
cubes cut by ``preprocess_backend.cubes`` from the case's series, the served ONNX in onnxruntime
(``ctlesion_fpr.predict``), the airway veto (``preprocess_backend.airways``), rescoring by the rule
the model declares and ``filter_lesions``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocess_backend.airways import probe_profiles, veto_airways
from preprocess_backend.cubes import decode_codes, extract_cubes
from preprocess_backend.lesion_filters import LesionFilter, filter_lesions
from preprocess_backend.rescoring import apply_fpr
from preprocess_backend.types import Lesion


@dataclass
class FprStage:
    """The served FPR model (its ONNX) with the rule and thresholds it declares."""

    onnx_path: Path

    def __post_init__(self) -> None:
        from ctlesion_fpr.predict import FprPredictor

        self.predict = FprPredictor(Path(self.onnx_path))
        self.info = self.predict.info

    def probabilities(self, case_dir: Path, lesions: Sequence[Lesion]) -> np.ndarray:
        if not lesions:
            return np.zeros(0, np.float32)
        from damoyolo.eval.runner import series_files

        codes, geometry = decode_codes([p.read_bytes() for p in series_files(case_dir)], self.info.spec)
        centres = np.asarray([les.centre_mm for les in lesions])
        cubes = extract_cubes(codes, geometry, centres, self.info.spec)
        probes = probe_profiles(codes, geometry, centres)
        return veto_airways(self.predict(cubes), probes, [les.diameter_mm for les in lesions])

    def rescore(self, case_dir: Path, lesions: Sequence[Lesion]) -> list[Lesion]:
        return apply_fpr(lesions, self.probabilities(case_dir, lesions), self.info.rule, self.info.coefficients)


def candidate_rule(min_size_mm: float = 3.0, max_size_mm: float = 30.0) -> LesionFilter:
    """The 3D size rule without a threshold: FROC needs every candidate."""
    return LesionFilter(min_size_mm=min_size_mm, max_size_mm=max_size_mm, score_threshold=0.0)


def second_stage(case_dir: Path, lesions: Sequence[Lesion], stage: FprStage | None, rule: LesionFilter | None = None) -> list[Lesion]:
    """FPR rescoring (when a stage is given), then the 3D lesion rules."""
    if stage is not None:
        lesions = stage.rescore(case_dir, lesions)
    return filter_lesions(lesions, rule or candidate_rule())
