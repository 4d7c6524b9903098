"""Fine-tuning start: load official (COCO) weights into a model with another class count.

The article's ``customize_for_medical`` step: backbone and neck keep their weights; the class
convolutions of the head (``head.gfl_cls.*``) are re-initialised because their shape depends on the
class count. Anything else whose shape differs (e.g. the stem when ``in_channels`` is not 3) is
skipped too and reported, never silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # present in both, shape differs: model's init kept
    missing: list[str] = field(default_factory=list)  # model keys absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model does not have

    @property
    def strict_ok(self) -> bool:
        return not (self.skipped or self.missing or self.unexpected)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)}, skipped {len(self.skipped)} {self.skipped}, "
                f"missing {len(self.missing)}, unexpected {len(self.unexpected)}")


def unwrap_state_dict(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Accept a bare state_dict or ``{'model': state_dict, ...}``; drop a DDP ``module.`` prefix."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise ValueError("checkpoint holds no state_dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_pretrained(model: nn.Module, checkpoint: Mapping[str, object], strict_backbone: bool = True) -> LoadReport:
    """Copy every tensor whose name and shape match; re-initialise the head's class layers if skipped.

    With ``strict_backbone`` a missing or mis-shaped key outside ``head.gfl_cls`` raises ValueError
    unless it is the stem (first conv, depends on ``in_channels``).
    """
    state = unwrap_state_dict(checkpoint)
    own = model.state_dict()
    report = LoadReport()
    to_load = {}
    for key, value in own.items():
        if key not in state:
            report.missing.append(key)
        elif state[key].shape != value.shape:
            report.skipped.append(key)
        else:
            to_load[key] = state[key]
            report.loaded.append(key)
    report.unexpected = [k for k in state if k not in own]
    if strict_backbone:
        bad = [k for k in report.skipped + report.missing + report.unexpected
               if not (k.startswith("head.gfl_cls.") or _is_stem(k))]
        if bad:
            raise ValueError(f"checkpoint does not fit this variant: {bad[:5]} (and {max(0, len(bad) - 5)} more)")
    model.load_state_dict(to_load, strict=False)
    if any(k.startswith("head.gfl_cls.") for k in report.skipped):
        head = getattr(model, "head", None)
        if head is not None and hasattr(head, "reset_class_layers"):
            head.reset_class_layers()
    return report


def _is_stem(key: str) -> bool:
    return key.startswith(("backbone.block_list.0.", "backbone.csp_stage.0."))
