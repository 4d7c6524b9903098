"""PACS over DICOMweb: QIDO-RS search, WADO-RS retrieve (raw Part-10 bytes), STOW-RS store."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO

import pydicom
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session, create_session_from_user_pass
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword

from .pacs_types import PacsCredentials, PacsError, SeriesInfo

# Any stored transfer syntax: the ensemble decodes compressed DICOM itself, and asking the PACS
# to transcode would cost time and could change pixels (lossy syntaxes).
_ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _tag(item: dict, keyword: str) -> str | None:
    """Value of one attribute in a DICOM JSON (QIDO) answer."""
    entry = item.get(f"{tag_for_keyword(keyword):08X}", {})
    values = entry.get("Value") or []
    return str(values[0]) if values else None


@dataclass
class DicomWebPacs:
    """A DICOMweb endpoint, e.g. ``http://host:8042/dicom-web`` (Orthanc)."""

    url: str
    credentials: PacsCredentials | None = None
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        session = (
            create_session_from_user_pass(self.credentials.username, self.credentials.password)
            if self.credentials else create_session()
        )
        self._client = DICOMwebClient(url=self.url.rstrip("/"), session=session)

    # --- query ---------------------------------------------------------------------------------
    def find_series(self, study_uid: str, modality: str | None = None) -> list[SeriesInfo]:
        filters = {"Modality": modality} if modality else None
        found = self._client.search_for_series(
            study_instance_uid=study_uid, search_filters=filters,
            fields=["SeriesDescription", "NumberOfSeriesRelatedInstances", "Modality"],
        )
        out = []
        for item in found:
            count = _tag(item, "NumberOfSeriesRelatedInstances")
            out.append(SeriesInfo(
                study_uid=study_uid,
                series_uid=_tag(item, "SeriesInstanceUID") or "",
                modality=_tag(item, "Modality") or "",
                description=_tag(item, "SeriesDescription") or "",
                n_instances=int(count) if count else None,
            ))
        return out

    def find_instances(self, study_uid: str, series_uid: str) -> list[str]:
        found = self._client.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid)
        return [uid for item in found if (uid := _tag(item, "SOPInstanceUID"))]

    # --- retrieve ------------------------------------------------------------------------------
    def iter_series_bytes(self, study_uid: str, series_uid: str) -> Iterable[bytes]:
        """Part-10 files of a series, exactly as stored (no decode / re-encode round trip).

        dicomweb-client's public retrieve_* decode every part into a pydicom Dataset; the
        detector wants bytes, so we reuse its HTTP session and multipart decoder (pinned 0.61.2).
        """
        url = f"{self.url.rstrip('/')}/studies/{study_uid}/series/{series_uid}"
        response = self._client._http_get(url, params=None, headers={"Accept": _ACCEPT_AS_STORED}, stream=True)
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("application/dicom"):  # non-multipart single part (some servers)
            yield response.content
            return
        yield from self._client._decode_multipart_message(response, stream=True)

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[bytes]:
        return list(self.iter_series_bytes(study_uid, series_uid))

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        url = f"{self.url.rstrip('/')}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"
        response = self._client._http_get(url, params=None, headers={"Accept": _ACCEPT_AS_STORED}, stream=False)
        parts = list(self._client._decode_multipart_message(response, stream=False))
        if len(parts) != 1:
            raise PacsError(f"WADO-RS returned {len(parts)} parts for instance {sop_uid}")
        return parts[0]

    # --- store ---------------------------------------------------------------------------------
    def store(self, datasets: Sequence[Dataset]) -> None:
        """STOW-RS; raises PacsError when the PACS reports any failed instance."""
        if not datasets:
            return
        study_uid = str(datasets[0].StudyInstanceUID)
        answer = self._client.store_instances(list(datasets), study_instance_uid=study_uid)
        failed = answer.get("FailedSOPSequence", [])
        if failed:
            reasons = [str(item.get("FailureReason", "?")) for item in failed]
            raise PacsError(f"STOW-RS failed for {len(failed)} instance(s), reasons {reasons}")


def read_header(part10: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(part10), stop_before_pixels=True)
