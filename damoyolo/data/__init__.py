"""Data sets behind one interface (``CaseSource`` -> ``Case``): what training, validation and evaluation read.

    open_source("luna16:/data/luna16")     # MetaImage subset0..9 + annotations(_excluded).csv
    open_source("lidc:/data/LIDC-IDRI")    # DICOM + reader XML, >= 3 of 4 readers
    open_source("dicomcsv:/data/ours")     # DICOM folders + nodules.csv in patient mm

Every case is read as a DICOM series through the server's preprocessing (MetaImage volumes are
written once as DICOM into a cache folder), with truth in patient mm (LPS).
"""

from __future__ import annotations

from pathlib import Path

from damoyolo.data.types import Case, CaseSource, DataError, Nodule

KINDS = ("luna16", "lidc", "dicomcsv")


def open_source(spec: str, cache_dir: Path | None = None, min_readers: int = 3) -> CaseSource:
    """``KIND:DIR`` -> a CaseSource; ``cache_dir`` (default DIR/../<name>-dicom-cache under work/) holds converted volumes."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS:
        raise DataError(f"--data must be KIND:DIR with KIND one of {', '.join(KINDS)} (got {spec!r})")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    if kind == "luna16":
        from damoyolo.data.luna16 import Luna16Source

        return Luna16Source(root, cache_dir or Path("work/cache/luna16-dicom"))
    if kind == "lidc":
        from damoyolo.data.lidc import LidcSource

        return LidcSource(root, min_readers)
    from damoyolo.data.dicom_csv import DicomCsvSource

    return DicomCsvSource(root)


def parse_folds(text: str | None) -> set[int] | None:
    """``"0-7"``, ``"0,1,2"`` or ``"all"`` / None -> the set of folds (None: all)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


__all__ = ["KINDS", "Case", "CaseSource", "DataError", "Nodule", "open_source", "parse_folds"]
