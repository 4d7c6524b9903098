"""Retry policy: exponential backoff with full jitter for transient gRPC statuses only.

INVALID_ARGUMENT (and every other non-transient status) fails at once: resending the same DICOM
bytes cannot succeed and would only load the server. DEADLINE_EXCEEDED is not retried by default:
the per-call deadline is the caller's time budget, and a slab that was too slow once will
usually be too slow again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tritonclient.utils import InferenceServerException

from ctlesion_client.errors import (
    DeadlineExceededError,
    InvalidInputError,
    LesionClientError,
    ServerError,
    ServerUnavailableError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED"})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # including the first try
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    retry_deadline_exceeded: bool = False
    retryable: frozenset[str] = TRANSIENT

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Sleep before retry number ``retry`` (1-based): full jitter in [0, min(cap, base * m^(retry-1))].

        Full jitter spreads the retries of many concurrent slabs so they do not hit a recovering
        server in lock-step.
        """
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return rng.uniform(0.0, cap)

    def is_retryable(self, status: str) -> bool:
        return status in self.retryable or (self.retry_deadline_exceeded and status == "DEADLINE_EXCEEDED")


def status_of(exc: BaseException) -> str:
    """'UNAVAILABLE' from an InferenceServerException ('StatusCode.UNAVAILABLE') or a grpc.RpcError."""
    status: object = None
    if isinstance(exc, InferenceServerException):
        status = exc.status()
    elif hasattr(exc, "code") and callable(exc.code):  # grpc.RpcError / grpc.aio.AioRpcError
        try:
            status = exc.code()
        except Exception:
            status = None
    text = str(status or "UNKNOWN")
    return text.rsplit(".", 1)[-1].upper()


def message_of(exc: BaseException) -> str:
    if isinstance(exc, InferenceServerException):
        return str(exc.message() or exc)
    if hasattr(exc, "details") and callable(exc.details):
        try:
            return str(exc.details())
        except Exception:
            pass
    return str(exc)


def to_client_error(exc: BaseException, attempts: int = 1, slab: int | None = None) -> LesionClientError:
    """Map a transport exception to the client's typed errors."""
    if isinstance(exc, LesionClientError):
        return exc
    status, message = status_of(exc), message_of(exc)
    if status == "INVALID_ARGUMENT":
        return InvalidInputError(message, status, slab)
    if status == "DEADLINE_EXCEEDED":
        return DeadlineExceededError(f"deadline exceeded after {attempts} attempt(s): {message}")
    if status in TRANSIENT:
        return ServerUnavailableError(message, status, attempts)
    return ServerError(message, status)


def _is_transport_error(exc: BaseException) -> bool:
    return isinstance(exc, InferenceServerException) or (hasattr(exc, "code") and callable(exc.code))


async def call_with_retry_async(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
    slab: int | None = None,
    on_retry: Callable[[int, str, float], None] | None = None,
) -> T:
    """Await ``fn()`` until it succeeds, a non-retryable status occurs, or attempts run out."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except Exception as exc:
            if not _is_transport_error(exc):
                raise
            status = status_of(exc)
            if not policy.is_retryable(status) or attempt >= policy.max_attempts:
                raise to_client_error(exc, attempt, slab) from exc
            delay = policy.backoff_s(attempt, rng)
            log.info("slab %s: %s, retry %d in %.2f s", slab, status, attempt, delay)
            if on_retry is not None:
                on_retry(attempt, status, delay)
            await sleep(delay)


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    slab: int | None = None,
    on_retry: Callable[[int, str, float], None] | None = None,
) -> T:
    """Blocking twin of ``call_with_retry_async`` (same policy, same error mapping)."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not _is_transport_error(exc):
                raise
            status = status_of(exc)
            if not policy.is_retryable(status) or attempt >= policy.max_attempts:
                raise to_client_error(exc, attempt, slab) from exc
            delay = policy.backoff_s(attempt, rng)
            log.info("slab %s: %s, retry %d in %.2f s", slab, status, attempt, delay)
            if on_retry is not None:
                on_retry(attempt, status, delay)
            sleep(delay)
