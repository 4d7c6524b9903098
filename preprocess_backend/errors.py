"""The one error family for bad input: every refusal names its source (file or SOPInstanceUID)."""

from __future__ import annotations


class DicomInputError(ValueError):
    """Bad input (not DICOM, truncated, no pixels, wrong geometry, ...).

    ``str()`` is ``"<source>: <reason>"`` so a log line always says which file or instance failed.
    Subclasses ``ValueError`` so generic callers that catch bad values still catch it.
    """

    def __init__(self, source: str | None, reason: str) -> None:
        self.source = source or "<unknown>"
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self):  # keep pickling (multiprocessing, Triton stubs) working with 2 args
        return (type(self), (self.source, self.reason))


class LimitExceeded(DicomInputError):
    """The input is larger than the configured ``Limits`` (refused before any pixel decoding)."""
