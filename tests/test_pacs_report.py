"""SR push to a real Orthanc: build from lesions, validate, STOW / C-STORE, read back, idempotency."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from orthanc_server import make_ct_series, orthanc_fixture

from ctlesion_client.pacs import find_existing_report, order_by_position, process_study, report_series
from ctlesion_client.pacs_dicomweb import DicomWebPacs
from ctlesion_client.pacs_dimse import DimsePacs
from ctlesion_client.pacs_types import DimseEndpoint, PacsCredentials
from ctlesion_client.sr_report import AlgorithmInfo, build_sr, parse_sr, validate_sr
from preprocess_backend.types import Lesion

pytestmark = pytest.mark.pacs
orthanc = orthanc_fixture()


# TEST INPUT: (centre LPS mm, diameter mm, slice indices, max score, characteristic, side, lobe).
TEST_LESION_SPECS = [
    ((-60.5, -20.25, -97.5), 8.4, [0, 1, 2], 0.91, "solid", "right", "upper"),
    ((45.0, 10.0, -92.5), 5.2, [3], 0.47, "ground-glass", "left", "lower"),
    ((-30.0, 25.0, -95.0), 12.75, [1, 2], 0.63, "part-solid", "right", "middle"),
]


def test_lesions(items: list[bytes]) -> list[Lesion]:
    """TEST INPUT: real preprocess_backend Lesion objects whose key slices are the given series'."""
    uids = _ordered_uids(items)
    return [
        Lesion(lesion_id=i + 1, class_id=0, centre_mm=c, diameter_mm=d, z_extent_mm=2.5 * len(sl), slices=sl,
               sop_instance_uids=[uids[k] for k in sl], max_score=sc, mean_score=sc - 0.05, mean_hu=-40.0,
               characteristic=ch, side=side, lobe=lobe)
        for i, (c, d, sl, sc, ch, side, lobe) in enumerate(TEST_LESION_SPECS)
    ]


test_lesions.__test__ = False  # a helper, not a test


class FixedLesionsDetector:
    """TEST INPUT standing in for ctlesion_client.LesionClient until the lead wires a real Triton:
    returns test_lesions(series) and counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def detect_series(self, dicom_items):
        self.calls += 1
        assert dicom_items, "detector got no slices"
        return type("SeriesResult", (), {"lesions": test_lesions(list(dicom_items))})()


def _upload_study(orthanc, seed: int) -> tuple[list[bytes], str, str]:
    items = make_ct_series(n_slices=6, seed=seed)
    for item in items:
        orthanc.upload(item)
    h = pydicom.dcmread(BytesIO(items[0]), stop_before_pixels=True)
    return items, str(h.StudyInstanceUID), str(h.SeriesInstanceUID)


def _dicomweb(orthanc) -> DicomWebPacs:
    return DicomWebPacs(orthanc.dicomweb_url, PacsCredentials(orthanc.username, orthanc.password))


def _ordered_uids(items):
    headers = order_by_position([pydicom.dcmread(BytesIO(b), stop_before_pixels=True) for b in items])
    return [str(h.SOPInstanceUID) for h in headers]


def test_sr_validates_and_round_trips_in_memory():
    items = make_ct_series(n_slices=6, seed=2)
    headers = [pydicom.dcmread(BytesIO(b), stop_before_pixels=True) for b in items]
    from ctlesion_client.sr_report import finding_from_lesion

    findings = [finding_from_lesion(le, i + 1) for i, le in enumerate(test_lesions(items))]
    sr = build_sr(findings, headers)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    result = validate_sr(sr)
    assert result.ok, result.messages
    back = parse_sr(sr)
    assert len(back) == len(findings)
    for want, got in zip(findings, back, strict=True):
        assert want.close_to(got), (want, got)
    assert [f.label for f in back] == ["Lesion 1", "Lesion 2", "Lesion 3"]


def test_stow_sr_is_linked_to_the_study_and_reads_back(orthanc):
    items, study_uid, series_uid = _upload_study(orthanc, seed=3)
    pacs = _dicomweb(orthanc)
    sr, findings = report_series(pacs, study_uid, items, test_lesions(items))

    # Orthanc's own view: the SR sits in the same study (same patient/study resource).
    sr_series = pacs.find_series(study_uid, modality="SR")
    assert [s.series_uid for s in sr_series] == [str(sr.SeriesInstanceUID)]
    studies = orthanc.rest("/tools/lookup", data=study_uid.encode(), method="POST")
    study_id = next(x["ID"] for x in studies if x["Type"] == "Study")
    assert len(orthanc.rest(f"/studies/{study_id}")["Series"]) == 2  # CT + SR

    stored = pacs.retrieve_instance(study_uid, str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID))
    back = parse_sr(pydicom.dcmread(BytesIO(stored)))
    assert len(back) == len(findings) == len(TEST_LESION_SPECS)
    for want, got in zip(findings, back, strict=True):
        assert want.close_to(got), (want, got)
    # Key slices resolve to images of the CT series that was reported.
    ct_uids = set(pacs.find_instances(study_uid, series_uid))
    assert all(set(f.key_sop_uids) <= ct_uids for f in back)
    assert find_existing_report(pacs, study_uid, series_uid, AlgorithmInfo()) == str(sr.SOPInstanceUID)
    # A different algorithm version does not count as "already reported".
    assert find_existing_report(pacs, study_uid, series_uid, AlgorithmInfo(version="9.9")) is None


def test_cstore_sr_and_dimse_idempotency_lookup(orthanc):
    items, study_uid, series_uid = _upload_study(orthanc, seed=4)
    dimse = DimsePacs(DimseEndpoint("127.0.0.1", orthanc.dicom_port, orthanc.aet, "CTLESIONTEST"))
    sr, _ = report_series(dimse, study_uid, items, test_lesions(items)[:1])
    assert find_existing_report(dimse, study_uid, series_uid, AlgorithmInfo()) == str(sr.SOPInstanceUID)
    back = parse_sr(pydicom.dcmread(BytesIO(
        dimse.retrieve_instance(study_uid, str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID)))))
    assert back[0].characteristic == "solid" and back[0].side == "right" and back[0].lobe == "upper"


def test_process_study_is_idempotent(orthanc):
    _, study_uid, series_uid = _upload_study(orthanc, seed=5)
    pacs, detector = _dicomweb(orthanc), FixedLesionsDetector()

    first = process_study(study_uid, pacs, detector, progress=False)
    assert [o.series_uid for o in first] == [series_uid]
    assert first[0].skipped_reason is None and first[0].n_images == 6 and len(first[0].findings) == 3

    second = process_study(study_uid, pacs, detector, progress=False)
    assert second[0].skipped_reason and "exists" in second[0].skipped_reason
    assert detector.calls == 1  # the skip happens before pulling / detecting
    assert len(pacs.find_series(study_uid, modality="SR")) == 1

    forced = process_study(study_uid, pacs, detector, force=True, progress=False)
    assert forced[0].sr_sop_uid and forced[0].sr_sop_uid != first[0].sr_sop_uid
    assert len(pacs.find_series(study_uid, modality="SR")) == 2
