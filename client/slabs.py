"""Slab planning (``preprocess_backend.slabs``, one implementation shared by the client, the evaluation
runner, ``ctlesion bench`` and the locust file) and the request shape the served model declares.

The served repository says what a request should look like: the preprocess step's ``context_slices``
parameter is the model's 2.5D context k (so the halo is k // 2), its ``context_mm`` parameter the
spacing of those context planes in mm (then a thin-slice series needs more halo slices:
``context_halo``), and the detector's ``max_batch_size`` bounds one merged batch. ``RequestShape`` reads both from the ensemble's and its
steps' configs (``get_model_config(..., as_json=True)``), so a client never plans with its own guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocess_backend.slabs import SlabPlan, context_halo, merging_slab_size, plan_slabs, request_slab_size

__all__ = [
    "DEFAULT_K", "DEFAULT_SLAB_SIZE", "RequestShape", "SlabPlan", "context_halo", "merging_slab_size", "plan_slabs",
    "request_slab_size",
]  # fmt: skip

DEFAULT_K = 3  # used only when the server declares no context (a repository built before it did)
DEFAULT_SLAB_SIZE = 16
REQUESTS_PER_BATCH = 2  # concurrent slabs that fit one detector batch


@dataclass(frozen=True)
class RequestShape:
    """What the served ensemble declares about requests (None: not declared)."""

    k: int | None = None
    max_batch_size: int | None = None
    context_mm: float | None = None  # the preprocess step's 2.5D plane offset (None: neighbouring slices)

    @property
    def halo(self) -> int:
        return (self.k or DEFAULT_K) // 2

    def slab_size(self) -> int:
        """Owned slices per request: two requests (with their halos) make one full detector batch."""
        if not self.max_batch_size:
            return DEFAULT_SLAB_SIZE
        return merging_slab_size(self.max_batch_size, self.halo, REQUESTS_PER_BATCH)

    @classmethod
    def from_configs(cls, ensemble: Mapping[str, Any], step_configs: Mapping[str, Mapping[str, Any]]) -> RequestShape:
        """From the ensemble's config and its steps' configs (JSON as tritonclient returns them)."""
        k = batch = context = None
        for name in step_model_names(ensemble):
            config = step_configs.get(name) or {}
            config = config.get("config", config)
            params = config.get("parameters") or {}
            value = params.get("context_slices", {}).get("string_value")
            if value and k is None:
                k = int(value)
                mm = params.get("context_mm", {}).get("string_value")
                context = float(mm) if mm not in (None, "", "none") else None
            if name == "detector" or (batch is None and int(config.get("max_batch_size") or 0) > 0):
                batch = int(config.get("max_batch_size") or 0) or batch
        return cls(k, batch, context)

    @classmethod
    def from_repository(cls, repository: str | Path, ensemble: str = "lesion_detection") -> RequestShape:
        """The same, read from a model repository's config.pbtxt files (before any server runs)."""
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2

        def load(name: str) -> dict[str, Any]:
            path = Path(repository) / name / "config.pbtxt"
            if not path.exists():
                return {}
            config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
            return json_format.MessageToDict(config, preserving_proto_field_name=True)

        top = load(ensemble)
        return cls.from_configs(top, {name: load(name) for name in step_model_names(top)})


def step_model_names(ensemble: Mapping[str, Any]) -> list[str]:
    """The model names of an ensemble config's steps, in order."""
    config = ensemble.get("config", ensemble)  # tritonclient's JSON wraps the config in {"config": ...}
    steps = (config.get("ensemble_scheduling") or {}).get("step") or []
    return [str(s.get("model_name")) for s in steps if s.get("model_name")]
