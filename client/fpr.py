"""The client's second pass: 3D false-positive reduction of the linked lesions (``lesion_fpr``).

After the slabs come back and their detections are linked into 3D lesions, each lesion's cube is cut
on the server from the slices around its centre (``preprocess_backend.cubes``): the client sends
those slices, so a cube crosses slab boundaries freely. Lesions close in z share a request; a
request holds at most ``max_slices`` slices. The served classifier declares the rescoring rule and
the operating threshold chosen on validation data (``export/fpr_repo.py``); ``finalize`` applies
them and the 3D size rule (``preprocess_backend.lesion_filters``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from preprocess_backend.airways import request_half_mm, undecided, veto_airways
from preprocess_backend.cubes import CubeSpec, slice_range_for
from preprocess_backend.lesion_filters import LesionFilter, filter_lesions
from preprocess_backend.rescoring import apply_fpr, check_rule
from preprocess_backend.series import SeriesGeometry
from preprocess_backend.types import Lesion, Options

FPR_MODEL = "lesion_fpr"
FPR_CLASSIFIER = "fpr_classifier"
# without FPR the detector's score is the confidence: the server's own default, the article's 0.3
ARTICLE_SCORE_THRESHOLD = Options().score_threshold
# Smaller requests spread a series' cubes over the fpr_preprocess instances and let the classifier
# start on the first while the next decode: at 96 the 300-slice bench series made 3 requests (the third
# decoded alone on one core), at 48 eight; the FPR pass took 1.18 s against 1.69 (median of 4
# alternating rounds on one server, same lesions; bench/RESULTS.md), at 32 1.40 (more slices resent).
MAX_CUBE_REQUEST_SLICES = 48


@dataclass(frozen=True)
class FprServing:
    """What the served FPR model declares (its config parameters)."""

    rule: str
    operating_threshold: float
    candidate_threshold: float
    spec: CubeSpec
    coefficients: dict[str, Any] | None = None  # the logistic rule's (config parameter "rescoring")


def serving_from_config(config: Any) -> FprServing:
    """``get_model_config(fpr_classifier, as_json=True)`` (or its protobuf) -> ``FprServing``."""
    if hasattr(config, "config"):  # protobuf ModelConfigResponse
        params = {k: v.string_value for k, v in config.config.parameters.items()}
    else:
        cfg = config.get("config", config)
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
    coefficients = json.loads(params["rescoring"]) if params.get("rescoring") else None
    check_rule(params["rule"], coefficients)  # refused when the client connects, not on the first series
    return FprServing(
        rule=params["rule"],
        operating_threshold=float(params["operating_threshold"]),
        candidate_threshold=float(params["candidate_threshold"]),
        spec=CubeSpec.from_dict(json.loads(params["cube"])),
        coefficients=coefficients,
    )


@dataclass(frozen=True)
class CubeRequest:
    start: int  # series slice range [start, stop) sent
    stop: int
    lesions: tuple[int, ...]  # indices into the lesion list


def plan_cube_requests(
    lesions: Sequence[Lesion], geometry: SeriesGeometry, spec: CubeSpec, max_slices: int = MAX_CUBE_REQUEST_SLICES,
    probe_window: bool = False,
) -> list[CubeRequest]:
    """Group lesions by z into requests whose slice range stays within ``max_slices``; each lesion's
    slices cover its cube, or with ``probe_window`` its airway probe's whole window too
    (``preprocess_backend.airways``: the follow-up for the lesions the first answer left undecided).
    Indices in the requests are positions in ``lesions``."""
    ranges = [slice_range_for(geometry, np.asarray([les.centre_mm]), spec,
                              half_mm=request_half_mm(les.diameter_mm, spec) if probe_window else None) for les in lesions]  # fmt: skip
    order = sorted(range(len(lesions)), key=lambda i: ranges[i])
    out: list[CubeRequest] = []
    cur: list[int] = []
    lo = hi = 0
    for i in order:
        s, e = ranges[i]
        if cur and max(hi, e) - lo <= max_slices:
            cur.append(i)
            hi = max(hi, e)
            continue
        if cur:
            out.append(CubeRequest(lo, hi, tuple(cur)))
        cur, lo, hi = [i], s, e
    if cur:
        out.append(CubeRequest(lo, hi, tuple(cur)))
    return out


def cube_inputs(slices: Sequence[bytes], centres_mm: np.ndarray) -> list[grpcclient.InferInput]:
    dicom = grpcclient.InferInput("dicom", [len(slices)], "BYTES")
    dicom.set_data_from_numpy(np.array(list(slices), dtype=object))
    centres = np.ascontiguousarray(centres_mm, dtype=np.float32).reshape(-1, 3)
    c = grpcclient.InferInput("centres_mm", list(centres.shape), "FP32")
    c.set_data_from_numpy(centres)
    return [dicom, c]


def probabilities(result: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(the classifier's probabilities [N], the airway probes [N, planes]); a server from before the
    airway probe sends no ``airway_hu``: None, and nothing is vetoed."""
    probs = np.asarray(result.as_numpy("probability"), dtype=np.float32).reshape(-1)
    probes = result.as_numpy("airway_hu")
    return probs, None if probes is None else np.asarray(probes, dtype=np.float32).reshape(probs.size, -1)


def probe_followups(lesions: Sequence[Lesion], probes: np.ndarray | None) -> list[int]:
    """Lesions whose airway decision needs the probe's whole window (``undecided``)."""
    if probes is None or not len(lesions):
        return []
    return [int(i) for i in np.flatnonzero(undecided(probes, [les.diameter_mm for les in lesions]))]


def vetoed(probs: np.ndarray, probes: np.ndarray | None, lesions: Sequence[Lesion]) -> np.ndarray:
    """``probs`` with the airway lumens among ``lesions`` set to 0."""
    return veto_airways(probs, probes, [les.diameter_mm for les in lesions])


def finalize(
    lesions: Sequence[Lesion], probs: np.ndarray | None, serving: FprServing | None, rule: LesionFilter
) -> list[Lesion]:
    """Rescore (when FPR ran), then the 3D size rule and the operating threshold."""
    if probs is not None and serving is not None:
        lesions = apply_fpr(lesions, probs, serving.rule, serving.coefficients)
    return filter_lesions(lesions, rule)
