"""Moved: LUNA16 matching lives in ``preprocess_backend.matching`` (one implementation, numpy only).

This module re-exports it so ``from ctlesion_phantoms.matching import match_lesions`` keeps working.
"""

from preprocess_backend.matching import MatchResult, match_lesions

__all__ = ["MatchResult", "match_lesions"]
