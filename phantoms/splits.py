"""Seed ranges of the phantom data splits: one place, so training never sees a held-out case.

A case's content is a pure function of its seed, so disjoint seed ranges are disjoint data sets.
"""

from __future__ import annotations

TRAIN_SEED = 100_000  # training cases: TRAIN_SEED + i
VALIDATION_SEED = 500_000  # per-epoch validation during training
TEST_SEED = 900_000  # held-out evaluation (model card metrics); never used in training or tuning
DEMO_SEED = 20_001  # the case `ctlesion demo` and the serving tests send (not in any range above)
_RANGE = 100_000


def split_of(seed: int) -> str:
    """Name of the split a seed belongs to ("other" outside all ranges)."""
    for name, base in (("train", TRAIN_SEED), ("validation", VALIDATION_SEED), ("test", TEST_SEED)):
        if base <= seed < base + _RANGE:
            return name
    return "other"
