"""What ``detect_series`` / ``detect_image`` return: one dataclass that round-trips through JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from preprocess_backend.series import SeriesGeometry
from preprocess_backend.types import Detection, Lesion

SCHEMA = "ctlesion.series-result/1"


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass
class SeriesResult:
    """Detections of one series (or one image) in series order, linked into 3D lesions.

    ``detections[i].slice_index`` and ``lesions[j].slices`` index ``sop_instance_uids`` (the series
    ordered by position along the slice normal, preprocess_backend's order). ``sources`` names where
    each slice came from on the client (file path or ``item N``); reports never copy it.
    """

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    num_slices: int
    sop_instance_uids: list[str]
    sources: list[str]
    detections: list[Detection] = field(default_factory=list)
    lesions: list[Lesion] = field(default_factory=list)
    geometry: SeriesGeometry | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # detect options + slab plan actually used
    model_name: str = ""
    num_slabs: int = 0
    candidates: int = 0  # linked lesions before FPR rescoring, the 3D size rule and the threshold

    def slice_number(self, slice_index: int) -> int:
        """1-based slice number in position order (what a radiologist scrolls to)."""
        return int(slice_index) + 1

    def detections_of(self, lesion: Lesion) -> list[Detection]:
        """Per-slice detections that make up ``lesion`` (same class, on its slices), best first."""
        slices = set(lesion.slices)
        dets = [d for d in self.detections if d.slice_index in slices and d.class_id == lesion.class_id]
        # link_lesions does not return membership; on a slice with several boxes of the class,
        # the one whose centre is nearest the lesion's in-plane centre belongs to it.
        best: dict[int, Detection] = {}
        for d in dets:
            cur = best.get(d.slice_index)
            if cur is None or self._distance(d, lesion) < self._distance(cur, lesion):
                best[d.slice_index] = d
        return sorted(best.values(), key=lambda d: -d.score)

    def key_detection(self, lesion: Lesion) -> Detection | None:
        """The lesion's highest-score slice (the report's key image)."""
        dets = self.detections_of(lesion)
        return dets[0] if dets else None

    def _distance(self, det: Detection, lesion: Lesion) -> float:
        if self.geometry is None:
            return 0.0
        cx, cy = (det.box_px[0] + det.box_px[2]) / 2, (det.box_px[1] + det.box_px[3]) / 2
        p = self.geometry.pixel_to_patient(det.slice_index, cx, cy)
        return float((p[0] - lesion.centre_mm[0]) ** 2 + (p[1] - lesion.centre_mm[1]) ** 2)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "series_instance_uid": self.series_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "modality": self.modality,
            "num_slices": self.num_slices,
            "sop_instance_uids": list(self.sop_instance_uids),
            "sources": list(self.sources),
            "detections": [d.to_dict() for d in self.detections],
            "lesions": [les.to_dict() for les in self.lesions],
            "geometry": None if self.geometry is None else self.geometry.to_dict(),
            "warnings": list(self.warnings),
            "timings": {k: _finite(v) for k, v in self.timings.items()},
            "options": dict(self.options),
            "model_name": self.model_name,
            "num_slabs": self.num_slabs,
            "candidates": self.candidates,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeriesResult:
        schema = data.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise ValueError(f"unknown result schema {schema!r} (expected {SCHEMA})")
        geometry = data.get("geometry")
        return cls(
            series_instance_uid=str(data["series_instance_uid"]),
            study_instance_uid=str(data.get("study_instance_uid", "")),
            modality=str(data.get("modality", "")),
            num_slices=int(data["num_slices"]),
            sop_instance_uids=[str(u) for u in data.get("sop_instance_uids", [])],
            sources=[str(s) for s in data.get("sources", [])],
            detections=[Detection.from_dict(d) for d in data.get("detections", [])],
            lesions=[Lesion.from_dict(d) for d in data.get("lesions", [])],
            geometry=None if geometry is None else SeriesGeometry.from_dict(geometry),
            warnings=[str(w) for w in data.get("warnings", [])],
            timings={k: (math.nan if v is None else float(v)) for k, v in data.get("timings", {}).items()},
            options=dict(data.get("options", {})),
            model_name=str(data.get("model_name", "")),
            num_slabs=int(data.get("num_slabs", 0)),
            candidates=int(data.get("candidates", 0)),
        )

    @classmethod
    def from_json(cls, text: str) -> SeriesResult:
        return cls.from_dict(json.loads(text))
