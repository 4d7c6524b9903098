"""``ctlesion process-study``: PACS study -> detector (Triton over gRPC) -> DICOM SR -> PACS.

    ctlesion process-study STUDY_UID --pacs http://pacs:8042/dicom-web --triton localhost:8001
    ctlesion process-study STUDY_UID --pacs dicom://ORTHANC@pacs:4242 --triton localhost:8001

The PACS URL picks the protocol: http(s) = DICOMweb (QIDO / WADO / STOW), dicom:// = DIMSE
(C-FIND / C-GET / C-STORE). Credentials come from CTLESION_PACS_USER / CTLESION_PACS_PASSWORD or
``--credentials-file`` (mode 0600), never from the command line. One SR per CT series; a series
that already has an SR from this algorithm version is skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Protocol

import numpy as np
import pydicom
from pydicom import Dataset
from tqdm import tqdm

from .pacs_types import (
    DimseEndpoint,
    PacsCredentials,
    PacsError,
    SeriesInfo,
    load_credentials,
    parse_pacs_url,
)
from .sr_report import (
    DEFAULT_ALGORITHM,
    SR_SERIES_DESCRIPTION,
    AlgorithmInfo,
    Finding,
    build_sr,
    finding_from_lesion,
    referenced_series_uids,
    validate_sr,
)

log = logging.getLogger(__name__)


class PacsClient(Protocol):
    """What process_study needs from a PACS; DicomWebPacs and DimsePacs both provide it."""

    def find_series(self, study_uid: str, modality: str | None = None) -> list[SeriesInfo]: ...
    def find_instances(self, study_uid: str, series_uid: str) -> list[str]: ...
    def retrieve_series(self, study_uid: str, series_uid: str) -> list[bytes]: ...
    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes: ...
    def store(self, datasets: Sequence[Dataset]) -> None: ...


class SeriesDetector(Protocol):
    """``ctlesion_client.LesionClient``: Part-10 bytes of one series in, object with ``.lesions`` out."""

    def detect_series(self, dicom_items: Sequence[bytes]) -> object: ...


def connect(url: str, credentials: PacsCredentials | None = None, timeout_s: float = 120.0) -> PacsClient:
    kind, target = parse_pacs_url(url)
    if kind == "dicomweb":
        from .pacs_dicomweb import DicomWebPacs

        return DicomWebPacs(str(target), credentials, timeout_s=timeout_s)
    from .pacs_dimse import DimsePacs

    assert isinstance(target, DimseEndpoint)
    return DimsePacs(target, timeout_s=timeout_s)


@dataclass
class SeriesOutcome:
    series_uid: str
    n_images: int = 0
    findings: list[Finding] | None = None
    sr_sop_uid: str | None = None
    skipped_reason: str | None = None  # set when an existing report made us skip the series


def _header(part10: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(part10), stop_before_pixels=True)


def order_by_position(headers: Sequence[Dataset]) -> list[Dataset]:
    """Slices sorted along the slice normal (what the detector's slice indices refer to)."""
    def key(ds: Dataset) -> float:
        iop = np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
        ipp = np.asarray(ds.get("ImagePositionPatient", [0, 0, float(ds.get("InstanceNumber", 0))]), dtype=float)
        return float(np.dot(np.cross(iop[:3], iop[3:]), ipp))
    return sorted(headers, key=key)


def find_existing_report(pacs: PacsClient, study_uid: str, source_series_uid: str,
                         algorithm: AlgorithmInfo) -> str | None:
    """SOP Instance UID of an SR already made by this algorithm version for this CT series.

    Query narrows by Modality SR + our SeriesDescription; the SR itself (small) is then read to
    match manufacturer, model (algorithm name), software version and the referenced CT series.
    """
    for series in pacs.find_series(study_uid, modality="SR"):
        if series.description != SR_SERIES_DESCRIPTION:
            continue
        for sop_uid in pacs.find_instances(study_uid, series.series_uid):
            ds = _header(pacs.retrieve_instance(study_uid, series.series_uid, sop_uid))
            versions = ds.get("SoftwareVersions", "")
            versions = [str(v) for v in versions] if isinstance(versions, Iterable) and not isinstance(
                versions, str) else [str(versions)]
            if (
                str(ds.get("Manufacturer", "")) == algorithm.manufacturer
                and str(ds.get("ManufacturerModelName", "")) == algorithm.name
                and algorithm.version in versions
                and source_series_uid in referenced_series_uids(ds)
            ):
                return sop_uid
    return None


def report_series(pacs: PacsClient, study_uid: str, items: Sequence[bytes], lesions: Iterable[object],
                  algorithm: AlgorithmInfo = DEFAULT_ALGORITHM, validate: bool = True) -> tuple[Dataset, list[Finding]]:
    """Lesions of one series -> SR (validated) -> stored in the PACS. Returns the SR and its findings."""
    headers = order_by_position([_header(b) for b in items])
    ordered_uids = [str(h.SOPInstanceUID) for h in headers]
    findings = [finding_from_lesion(lesion, i + 1, ordered_uids) for i, lesion in enumerate(lesions)]
    sr = build_sr(findings, headers, algorithm)
    if validate:
        result = validate_sr(sr)
        if not result.ok:
            raise PacsError(f"SR failed {result.tool} validation: {result.messages[:5]}")
    pacs.store([sr])
    return sr, findings


def process_study(
    study_uid: str,
    pacs: PacsClient,
    detector_client: SeriesDetector,
    *,
    algorithm: AlgorithmInfo = DEFAULT_ALGORITHM,
    force: bool = False,
    progress: bool = True,
) -> list[SeriesOutcome]:
    """The whole loop for every CT series of a study: pull -> detect -> SR -> push (idempotent)."""
    series_list = pacs.find_series(study_uid, modality="CT")
    if not series_list:
        raise PacsError(f"study {study_uid}: no CT series found")
    outcomes: list[SeriesOutcome] = []
    bar = tqdm(total=len(series_list) * 3, desc=f"study {study_uid[-12:]}", unit="step", disable=not progress)
    try:
        for series in series_list:
            outcome = SeriesOutcome(series.series_uid)
            outcomes.append(outcome)
            existing = None if force else find_existing_report(pacs, study_uid, series.series_uid, algorithm)
            if existing:
                outcome.skipped_reason = f"SR {existing} from {algorithm.name} {algorithm.version} exists"
                log.info("series %s: %s (use --force to add another)", series.series_uid, outcome.skipped_reason)
                bar.update(3)
                continue
            bar.set_postfix_str("pull")
            items = pacs.retrieve_series(study_uid, series.series_uid)
            outcome.n_images = len(items)
            bar.update(1)
            bar.set_postfix_str("detect")
            result = detector_client.detect_series(items)
            lesions = list(getattr(result, "lesions", result))  # type: ignore[call-overload]
            bar.update(1)
            bar.set_postfix_str("push")
            sr, outcome.findings = report_series(pacs, study_uid, items, lesions, algorithm)
            outcome.sr_sop_uid = str(sr.SOPInstanceUID)
            bar.update(1)
    finally:
        bar.close()
    return outcomes


def make_detector(triton: str, timeout_s: float) -> SeriesDetector:
    """The gRPC client of the ensemble; ``timeout_s`` is its per-request deadline.

    Imported here, not at module level, so the PACS half imports without tritonclient.
    """
    from ctlesion_client.client import LesionClient
    from ctlesion_client.options import ClientOptions

    return LesionClient(triton, ClientOptions(client_timeout_s=timeout_s))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctlesion process-study", description=__doc__.split("\n\n")[0])
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument("--pacs", required=True, metavar="URL",
                   help="http(s)://host:port/dicom-web (DICOMweb) or dicom://AET@host:port[?calling=AET] (DIMSE)")
    p.add_argument("--triton", required=True, metavar="HOST:PORT", help="Triton gRPC endpoint")
    p.add_argument("--credentials-file", type=Path,
                   help="JSON {username,password} or 'user:password', mode 0600; default: "
                        "CTLESION_PACS_USER / CTLESION_PACS_PASSWORD from the environment")
    p.add_argument("--force", action="store_true", help="store a new SR even if one from this algorithm exists")
    p.add_argument("--timeout", type=float, default=120.0, help="PACS and detector timeout in seconds")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        credentials = load_credentials(args.credentials_file)
        pacs = connect(args.pacs, credentials, args.timeout)
        detector = make_detector(args.triton, args.timeout)
        outcomes = process_study(args.study_uid, pacs, detector, force=args.force, progress=not args.no_progress)
    except (PacsError, PermissionError, ValueError, RuntimeError, OSError) as exc:
        # Messages carry URLs and UIDs, never the credentials (they are not in any of them).
        print(f"process-study: error: {exc}", file=sys.stderr)
        return 1
    for o in outcomes:
        if o.skipped_reason:
            print(f"{o.series_uid}: skipped, {o.skipped_reason}")
        else:
            print(f"{o.series_uid}: {o.n_images} images, {len(o.findings or [])} findings, SR {o.sr_sop_uid}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
