"""ctlesion_client: gRPC client of the Triton ``lesion_detection`` ensemble, reports, PACS, the CLI.

    from ctlesion_client import LesionClient
    with LesionClient("localhost:8001") as client:
        client.wait_ready(60)
        result = client.detect_series("path/to/series")

Public names load lazily (PEP 562): ``ctlesion --help`` and the PACS modules import this package
without paying for tritonclient / pydicom until a client is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncLesionClient": "ctlesion_client.client",
    "LesionClient": "ctlesion_client.client",
    "DeadlineExceededError": "ctlesion_client.errors",
    "InvalidInputError": "ctlesion_client.errors",
    "LesionClientError": "ctlesion_client.errors",
    "ModelMismatchError": "ctlesion_client.errors",
    "SeriesSelectionError": "ctlesion_client.errors",
    "ServerError": "ctlesion_client.errors",
    "ServerUnavailableError": "ctlesion_client.errors",
    "ClientOptions": "ctlesion_client.options",
    "DetectOptions": "ctlesion_client.options",
    "TlsOptions": "ctlesion_client.options",
    "SeriesResult": "ctlesion_client.result",
    "RetryPolicy": "ctlesion_client.retry",
    "SlabPlan": "ctlesion_client.slabs",
    "plan_slabs": "ctlesion_client.slabs",
    "format_findings_table": "ctlesion_client.report",
    "write_report": "ctlesion_client.report",
}
__all__ = [
    "AsyncLesionClient",
    "ClientOptions",
    "DeadlineExceededError",
    "DetectOptions",
    "InvalidInputError",
    "LesionClient",
    "LesionClientError",
    "ModelMismatchError",
    "RetryPolicy",
    "SeriesResult",
    "SeriesSelectionError",
    "ServerError",
    "ServerUnavailableError",
    "SlabPlan",
    "TlsOptions",
    "format_findings_table",
    "plan_slabs",
    "write_report",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from ctlesion_client.client import AsyncLesionClient, LesionClient
    from ctlesion_client.errors import (
        DeadlineExceededError,
        InvalidInputError,
        LesionClientError,
        ModelMismatchError,
        SeriesSelectionError,
        ServerError,
        ServerUnavailableError,
    )
    from ctlesion_client.options import ClientOptions, DetectOptions, TlsOptions
    from ctlesion_client.report import format_findings_table, write_report
    from ctlesion_client.result import SeriesResult
    from ctlesion_client.retry import RetryPolicy
    from ctlesion_client.slabs import SlabPlan, plan_slabs


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ctlesion_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
