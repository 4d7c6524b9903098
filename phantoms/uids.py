"""Deterministic DICOM UIDs and fake patient data: the same seed gives byte-identical files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def case_uid(seed: int, *parts: object) -> str:
    """A 2.25-rooted UID (UUID-derived form, PS3.5 B.2) from a hash of the seed and a role.

    No clock, no host, no randomness: the same seed gives the same UIDs (pydicom's generate_uid
    with prefix=None would ignore its entropy sources and draw a random UUID).
    """
    digest = hashlib.sha256("|".join(["ctlesion-phantom", str(seed), *map(str, parts)]).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big") >> 1)


@dataclass
class CaseIdentity:
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str
    accession: str

    @classmethod
    def for_seed(cls, seed: int, case_id: str) -> CaseIdentity:
        # clearly synthetic: no real person could carry these (and the system must not log them anyway)
        return cls(
            study_uid=case_uid(seed, "study"),
            series_uid=case_uid(seed, "series"),
            frame_of_reference_uid=case_uid(seed, "frame"),
            patient_name=f"PHANTOM^SYNTHETIC^{seed % 100000:05d}",
            patient_id=f"PHANTOM-{case_id}",
            accession=f"PH{seed % 10**12:012d}"[:16],
        )

    def sop_uid(self, seed: int, index: int) -> str:
        return case_uid(seed, "sop", index)
