"""DICOM to model tensors, detections to findings: pure numpy / pydicom / scipy, no Triton import.

Modules, one job each: ``errors``, ``types``, ``dicom_io``, ``windowing``, ``series``, ``stacking``,
``letterbox``, ``masks``, ``postprocess``, ``lesions``, ``pipeline`` (the two halves the Triton
Python models call).
"""

from preprocess_backend.errors import DicomInputError, LimitExceeded

__all__ = ["DicomInputError", "LimitExceeded"]
