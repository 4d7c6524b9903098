"""PACS over DIMSE (pynetdicom): C-FIND, C-GET or C-MOVE to our own storage SCP, C-STORE.

For PACSes without DICOMweb. Received instances are kept as the Part-10 bytes that came over the
wire (``event.encoded_dataset()``), the same form the DICOMweb path returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from .pacs_types import DimseEndpoint, PacsError, SeriesInfo

# Storage SOP classes we accept on C-GET (one association carries at most 128 contexts, the query
# context included, so list the ones this pipeline reads rather than all of them).
_GET_STORAGE = (CTImageStorage, EnhancedCTImageStorage, Comprehensive3DSRStorage, ComprehensiveSRStorage)
_SUCCESS, _PENDING = 0x0000, (0xFF00, 0xFF01)


@dataclass
class DimsePacs:
    endpoint: DimseEndpoint
    timeout_s: float = 60.0

    def _ae(self) -> AE:
        ae = AE(ae_title=self.endpoint.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        return ae

    @contextmanager
    def _association(self, ae: AE, **kwargs: object) -> Iterator[object]:
        assoc = ae.associate(self.endpoint.host, self.endpoint.port, ae_title=self.endpoint.called_aet, **kwargs)
        if not assoc.is_established:
            raise PacsError(f"association with {self.endpoint.called_aet}@{self.endpoint.host}:"
                            f"{self.endpoint.port} rejected or failed")
        try:
            yield assoc
        finally:
            assoc.release()

    # --- query ---------------------------------------------------------------------------------
    def _find(self, query: Dataset) -> list[Dataset]:
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        out: list[Dataset] = []
        with self._association(ae) as assoc:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                code = getattr(status, "Status", None)
                if code in _PENDING and identifier is not None:
                    out.append(identifier)
                elif code is None or code != _SUCCESS:
                    raise PacsError(f"C-FIND failed with status {code!r}")
        return out

    def find_series(self, study_uid: str, modality: str | None = None) -> list[SeriesInfo]:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID, q.SeriesInstanceUID = study_uid, ""
        q.Modality, q.SeriesDescription, q.NumberOfSeriesRelatedInstances = modality or "", "", ""
        out = []
        for ds in self._find(q):
            n = ds.get("NumberOfSeriesRelatedInstances")
            out.append(SeriesInfo(study_uid, str(ds.SeriesInstanceUID), str(ds.get("Modality", "")),
                                  str(ds.get("SeriesDescription", "")), int(n) if n not in (None, "") else None))
        return out

    def find_instances(self, study_uid: str, series_uid: str) -> list[str]:
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = study_uid, series_uid, ""
        return [str(ds.SOPInstanceUID) for ds in self._find(q)]

    # --- retrieve ------------------------------------------------------------------------------
    @staticmethod
    def _series_query(study_uid: str, series_uid: str) -> Dataset:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID, q.SeriesInstanceUID = study_uid, series_uid
        return q

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[bytes]:
        """C-GET: the PACS sends the instances back on the same association (no firewall holes)."""
        return self._get(self._series_query(study_uid, series_uid))

    def _get(self, query: Dataset) -> list[bytes]:
        received: list[bytes] = []

        def on_store(event: evt.Event) -> int:
            received.append(bytes(event.encoded_dataset(include_meta=True)))
            return _SUCCESS

        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        for uid in _GET_STORAGE:
            ae.add_requested_context(uid, syntaxes)
        roles = [build_role(uid, scp_role=True) for uid in _GET_STORAGE]
        with self._association(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            self._check_retrieve(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet), "C-GET")
        return received

    def move_series(self, study_uid: str, series_uid: str, listen_host: str, listen_port: int,
                    listen_aet: str | None = None) -> list[bytes]:
        """C-MOVE to a storage SCP we run for the duration of the call.

        The PACS must know ``listen_aet`` -> (host, port) as a modality; that is PACS configuration.
        """
        received: list[bytes] = []

        def on_store(event: evt.Event) -> int:
            received.append(bytes(event.encoded_dataset(include_meta=True)))
            return _SUCCESS

        dest = listen_aet or self.endpoint.calling_aet
        scp_ae = AE(ae_title=dest)
        scp_ae.supported_contexts = StoragePresentationContexts
        server = scp_ae.start_server((listen_host, listen_port), block=False,
                                     evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            ae = self._ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            with self._association(ae) as assoc:
                self._check_retrieve(assoc.send_c_move(self._series_query(study_uid, series_uid), dest,
                                                       StudyRootQueryRetrieveInformationModelMove), "C-MOVE")
        finally:
            server.shutdown()
        return received

    @staticmethod
    def _check_retrieve(responses: Iterator[tuple[Dataset, Dataset | None]], what: str) -> None:
        final = None
        for status, _identifier in responses:
            code = getattr(status, "Status", None)
            if code is None:
                raise PacsError(f"{what}: no response (timeout or aborted association)")
            final = status
        if final is None or final.Status != _SUCCESS:
            failed = final.get("NumberOfFailedSuboperations", "?") if final is not None else "?"
            raise PacsError(f"{what} ended with status {getattr(final, 'Status', None)!r}, "
                            f"{failed} failed sub-operations")

    # --- store ---------------------------------------------------------------------------------
    def store(self, datasets: Sequence[Dataset]) -> None:
        ae = self._ae()
        for uid in {str(ds.SOPClassUID) for ds in datasets}:
            ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        with self._association(ae) as assoc:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code != _SUCCESS:
                    raise PacsError(f"C-STORE of {ds.SOPInstanceUID} failed with status {code!r}")

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        q = self._series_query(study_uid, series_uid)
        q.QueryRetrieveLevel, q.SOPInstanceUID = "IMAGE", sop_uid
        items = self._get(q)
        if len(items) != 1:
            raise PacsError(f"C-GET returned {len(items)} objects for instance {sop_uid}")
        return items[0]
