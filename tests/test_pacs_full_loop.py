"""The whole article loop with real parts: Orthanc (PACS) -> LesionClient -> tritonserver -> DICOM SR -> Orthanc.

A held-out phantom series is uploaded to a real Orthanc, `process_study` pulls it over DICOMweb,
detects through the real gRPC client against the real server, pushes a TID 1500 SR, and the SR read
back from the PACS carries exactly the lesions the client returned for the same series.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from orthanc_server import orthanc_fixture

from ctlesion_client.pacs import make_detector, process_study
from ctlesion_client.pacs_dicomweb import DicomWebPacs
from ctlesion_client.pacs_types import PacsCredentials
from ctlesion_client.sr_report import parse_sr

pytestmark = [pytest.mark.pacs, pytest.mark.triton, pytest.mark.slow]
orthanc = orthanc_fixture()


def test_process_study_with_the_real_server(orthanc, triton: object, phantom_case: Path) -> None:  # noqa: ANN001
    files = sorted((phantom_case / "series").glob("*.dcm"))
    for f in files:
        orthanc.upload(f.read_bytes())
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, series_uid = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
    pacs = DicomWebPacs(orthanc.dicomweb_url, PacsCredentials(orthanc.username, orthanc.password))
    detector = make_detector(triton.grpc_url, timeout_s=120.0)  # type: ignore[attr-defined]

    outcomes = process_study(study_uid, pacs, detector, progress=False)
    assert [o.series_uid for o in outcomes] == [series_uid]
    outcome = outcomes[0]
    assert outcome.n_images == len(files) and outcome.sr_sop_uid

    # The same series sent straight through the client: the SR must carry those lesions.
    direct = detector.detect_series([f.read_bytes() for f in files])
    assert len(direct.lesions) >= 1, "the trained detector should find something in a series with 3-4 nodules"
    sr_series_uid, sr_sop_uid = _sr_location(pacs, study_uid)
    assert sr_sop_uid == outcome.sr_sop_uid
    findings = parse_sr(pydicom.dcmread(BytesIO(pacs.retrieve_instance(study_uid, sr_series_uid, sr_sop_uid))))
    assert len(findings) == len(outcome.findings or []) == len(direct.lesions)
    want = sorted(les.diameter_mm for les in direct.lesions)
    got = sorted(f.diameter_mm for f in findings)
    assert all(abs(a - b) < 0.05 for a, b in zip(want, got, strict=True))
    # Idempotent: a second run finds the report and does not detect again.
    again = process_study(study_uid, pacs, detector, progress=False)
    assert again[0].skipped_reason and len(pacs.find_series(study_uid, modality="SR")) == 1


def _sr_location(pacs: DicomWebPacs, study_uid: str) -> tuple[str, str]:
    (sr_series,) = pacs.find_series(study_uid, modality="SR")
    (sop_uid,) = pacs.find_instances(study_uid, sr_series.series_uid)
    return sr_series.series_uid, sop_uid
