"""The DICOM listener (pynetdicom): C-ECHO, and C-STORE that answers success only once the
instance is durably in the spool; calling AE titles checked at association; optional DICOM TLS."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from ctlesion_node.config import ListenerConfig, TlsConfig

log = logging.getLogger(__name__)

OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
SUCCESS = 0x0000


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.ca:
        ctx.load_verify_locations(tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: only senders with a certificate from our CA
    return ctx


def start_listener(config: ListenerConfig, on_store: Callable[[evt.Event], int],
                   on_echo: Callable[[evt.Event], int],
                   on_association: Callable[[evt.Event, str], None]) -> ThreadedAssociationServer:
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.require_called_aet = True  # a sender that addresses another AE has the wrong node
    if config.allowed_calling_aets:
        ae.require_calling_aet = list(config.allowed_calling_aets)
    else:
        log.warning("listener %s accepts any calling AE title (set listener.allowed_calling_aets)", config.ae_title)
    for cx in StoragePresentationContexts:
        # Every transfer syntax: the ensemble decodes compressed DICOM itself.
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    handlers = [
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_C_ECHO, on_echo),
        (evt.EVT_ACCEPTED, lambda e: on_association(e, "accepted")),
        (evt.EVT_REJECTED, lambda e: on_association(e, "rejected")),
    ]
    ctx = server_ssl_context(config.tls) if config.tls else None
    server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers, ssl_context=ctx)
    assert server is not None
    return server
