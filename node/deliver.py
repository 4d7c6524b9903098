"""Destinations for results, through the client library's PACS back ends (C-STORE or STOW-RS)."""

from __future__ import annotations

from dataclasses import replace

from ctlesion_client.pacs import PacsClient, connect
from ctlesion_client.pacs_dimse import DimsePacs
from ctlesion_client.pacs_types import DimseEndpoint, PacsError, load_credentials, parse_pacs_url
from ctlesion_node.config import NodeConfig


def destination_for(config: NodeConfig, calling_aet: str) -> tuple[PacsClient, str]:
    """(PACS client, a printable name without credentials) for one batch's results."""
    dest = config.destination
    our_aet = dest.calling_aet or config.listener.ae_title
    if dest.url == "sender":
        address = config.peers.get(calling_aet)
        if address is None:
            raise PacsError(f"destination 'sender': calling AE {calling_aet!r} has no address in [peers]")
        # "host:port" (called AE = the sender's own) or "CALLEDAET@host:port" (e.g. the sender's archive)
        called, _, hostport = address.rpartition("@")
        host, _, port = hostport.rpartition(":")
        endpoint = DimseEndpoint(host, int(port), called or calling_aet, our_aet)
        return DimsePacs(endpoint, timeout_s=dest.timeout_s), f"{endpoint.called_aet}@{hostport}"
    kind, target = parse_pacs_url(dest.url)
    if kind == "dimse":
        assert isinstance(target, DimseEndpoint)
        if dest.calling_aet or "calling=" not in dest.url:
            target = replace(target, calling_aet=our_aet)
        return DimsePacs(target, timeout_s=dest.timeout_s), f"{target.called_aet}@{target.host}:{target.port}"
    return connect(dest.url, load_credentials(None), dest.timeout_s), str(target)
