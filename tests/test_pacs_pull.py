"""Pull a CT series back from a real Orthanc over DICOMweb and DIMSE (C-GET, C-MOVE)."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from orthanc_server import make_ct_series, orthanc_fixture

from ctlesion_client.pacs_dicomweb import DicomWebPacs
from ctlesion_client.pacs_dimse import DimsePacs
from ctlesion_client.pacs_types import DimseEndpoint, PacsCredentials, PacsError

pytestmark = pytest.mark.pacs
orthanc = orthanc_fixture()


@pytest.fixture(scope="module")
def study(orthanc):
    """TEST INPUT: a 6-slice synthetic CT series, uploaded the way a modality would."""
    items = make_ct_series(n_slices=6, seed=1)
    for item in items:
        orthanc.upload(item)
    header = pydicom.dcmread(BytesIO(items[0]), stop_before_pixels=True)
    return items, str(header.StudyInstanceUID), str(header.SeriesInstanceUID)


def _by_uid(items):
    out = {}
    for item in items:
        ds = pydicom.dcmread(BytesIO(item))
        out[str(ds.SOPInstanceUID)] = ds
    return out


def test_dicomweb_pull_returns_the_stored_bytes(orthanc, study):
    items, study_uid, series_uid = study
    pacs = DicomWebPacs(orthanc.dicomweb_url, PacsCredentials(orthanc.username, orthanc.password))
    series = pacs.find_series(study_uid, modality="CT")
    assert [s.series_uid for s in series] == [series_uid]
    assert series[0].n_instances == len(items)
    assert sorted(pacs.find_instances(study_uid, series_uid)) == sorted(_by_uid(items))
    # WADO-RS with transfer-syntax=* returns the file as stored: byte for byte.
    assert sorted(pacs.retrieve_series(study_uid, series_uid)) == sorted(items)


def test_dicomweb_wrong_password_is_refused_without_echoing_it(orthanc, study):
    _, study_uid, _ = study
    pacs = DicomWebPacs(orthanc.dicomweb_url, PacsCredentials(orthanc.username, "wrong-secret-123"))
    with pytest.raises(Exception) as info:
        pacs.find_series(study_uid)
    assert "wrong-secret-123" not in str(info.value)


def test_dimse_cget_pull_matches_the_upload(orthanc, study):
    items, study_uid, series_uid = study
    pacs = DimsePacs(DimseEndpoint("127.0.0.1", orthanc.dicom_port, orthanc.aet, "CTLESIONTEST"))
    assert [s.series_uid for s in pacs.find_series(study_uid, modality="CT")] == [series_uid]
    assert sorted(pacs.find_instances(study_uid, series_uid)) == sorted(_by_uid(items))
    got, sent = _by_uid(pacs.retrieve_series(study_uid, series_uid)), _by_uid(items)
    assert got.keys() == sent.keys()
    for uid, ds in got.items():
        # The file meta is rewritten by the receiving AE; the data set itself must be identical.
        assert ds == sent[uid]
        assert ds.PixelData == sent[uid].PixelData


def test_dimse_cmove_to_our_own_scp(orthanc, study):
    items, study_uid, series_uid = study
    dest = orthanc.modalities["ctlesion"]
    pacs = DimsePacs(DimseEndpoint("127.0.0.1", orthanc.dicom_port, orthanc.aet, "CTLESIONTEST"))
    got = _by_uid(pacs.move_series(study_uid, series_uid, dest.host, dest.port, dest.aet))
    assert got.keys() == _by_uid(items).keys()


def test_dimse_wrong_called_aet_is_rejected(orthanc):
    pacs = DimsePacs(DimseEndpoint("127.0.0.1", orthanc.dicom_port, "NOTTHEPACS", "CTLESIONTEST"), timeout_s=10)
    with pytest.raises(PacsError, match="rejected"):
        pacs.find_series("1.2.3")
