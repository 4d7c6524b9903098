"""Under ``make test`` a missing real part (tritonserver, Orthanc, the checkpoint, a tool the setup
installs) fails the run instead of skipping: the real parts are the point of those tests.

``make test`` exports ``CTLESION_REQUIRE_REAL_PARTS=1``; ``CI=true`` means the same. Then every skip
becomes a failure, except the ones that depend on hardware this machine kind never has:

- tests marked ``gpu`` (no CUDA device here);
- skips whose reason names TensorRT (engine builds need TensorRT and an NVIDIA GPU).

Loaded as a pytest plugin by ``tests/conftest.py``; ``missing_real_part`` is the explicit form for
fixtures and helpers.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

STRICT_ENV = "CTLESION_REQUIRE_REAL_PARTS"
ALLOWED_MARKERS = ("gpu",)
ALLOWED_REASON_WORDS = ("tensorrt",)


def real_parts_required() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0") or os.environ.get("CI", "").lower() == "true"


def missing_real_part(reason: str) -> NoReturn:
    """Skip with ``reason`` on a developer machine; fail under ``make test`` / CI."""
    if real_parts_required():
        pytest.fail(f"{reason} [{STRICT_ENV}=1 or CI=true: a missing real part fails the run]", pytrace=False)
    pytest.skip(reason)


def skip_allowed(markers: set[str], reason: str) -> bool:
    """May this skip stand under ``make test``? Only for hardware the CI machine never has."""
    return bool(markers & set(ALLOWED_MARKERS)) or any(w in reason.lower() for w in ALLOWED_REASON_WORDS)


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # noqa: ANN201 - hook wrapper
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not real_parts_required():
        return
    reason = _skip_reason(report.longrepr)
    if skip_allowed({m.name for m in item.iter_markers()}, reason):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped under make test / CI, which needs every real part: {reason} ({STRICT_ENV}=1 or CI=true)"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # noqa: ANN201 - hook wrapper
    """A module skipped at import (``pytest.importorskip``) fails the same way."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and real_parts_required():
        reason = _skip_reason(report.longrepr)
        if not skip_allowed(set(), reason):
            report.outcome = "failed"
            report.longrepr = f"module skipped under make test / CI: {reason} ({STRICT_ENV}=1 or CI=true)"
