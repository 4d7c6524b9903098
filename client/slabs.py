"""Slab planning moved to ``preprocess_backend.slabs`` (one implementation shared by the client and the
evaluation runner); re-exported here so ``ctlesion_client.slabs`` keeps working."""

from preprocess_backend.slabs import SlabPlan, plan_slabs

__all__ = ["SlabPlan", "plan_slabs"]
