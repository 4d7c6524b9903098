"""Synthetic chest CT phantoms with lung nodules: real DICOM series plus truth JSON.

    from ctlesion_phantoms import PhantomConfig, generate_case, generate_volume
    truth = generate_case(seed=7, out_dir=Path("out"), config=PhantomConfig())   # files
    phantom = generate_volume(seed=7, config=PhantomConfig())                    # in memory
"""

from ctlesion_phantoms.config import ATTACHMENTS, NODULE_TYPES, PhantomConfig
from ctlesion_phantoms.generate import case_seeds, generate_case, generate_dataset
from ctlesion_phantoms.truth import CaseTruth, NoduleTruth, ScanGeometry
from ctlesion_phantoms.volume import PhantomVolume, generate_volume

__all__ = [
    "ATTACHMENTS",
    "NODULE_TYPES",
    "CaseTruth",
    "NoduleTruth",
    "PhantomConfig",
    "PhantomVolume",
    "ScanGeometry",
    "case_seeds",
    "generate_case",
    "generate_dataset",
    "generate_volume",
]
