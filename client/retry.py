"""Retry policy: exponential backoff with full jitter for transient gRPC statuses only.

INVALID_ARGUMENT (and every other non-transient status) fails at once: resending the same DICOM
bytes cannot succeed and would only load the server. DEADLINE_EXCEEDED is not retried by default:
the per-call deadline is the caller's time budget, and a slab that was too slow once will
usually be too slow again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
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


class _Attempt:
    """One try of a retried call: ``with attempt:`` swallows a retryable failure and sets ``delay``
    (the pause before the next try); anything else, or the last failure, leaves as its client error."""

    def __init__(self, number: int, policy: RetryPolicy, rng: random.Random, slab: int | None,
                 on_retry: Callable[[int, str, float], None] | None) -> None:  # fmt: skip
        self.number, self.policy, self.rng, self.slab, self.on_retry = number, policy, rng, slab, on_retry
        self.delay = 0.0

    def __enter__(self) -> _Attempt:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or not isinstance(exc, Exception) or not _is_transport_error(exc):
            return False  # success, or not a transport error: as it is
        status = status_of(exc)
        if not self.policy.is_retryable(status) or self.number >= self.policy.max_attempts:
            raise to_client_error(exc, self.number, self.slab) from exc
        self.delay = self.policy.backoff_s(self.number, self.rng)
        log.info("slab %s: %s, retry %d in %.2f s", self.slab, status, self.number, self.delay)
        if self.on_retry is not None:
            self.on_retry(self.number, status, self.delay)
        return True


def _attempts(policy: RetryPolicy, rng: random.Random | None, slab: int | None,
              on_retry: Callable[[int, str, float], None] | None) -> Iterator[_Attempt]:  # fmt: skip
    """The tries of one call, numbered from 1 (both clients retry through this one policy loop)."""
    rng = rng or random.Random()
    for number in itertools.count(1):
        yield _Attempt(number, policy, rng, slab, on_retry)
    raise AssertionError("unreachable")  # pragma: no cover


async def call_with_retry_async(
    fn: Callable[[], Awaitable[T]], policy: RetryPolicy, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None, slab: int | None = None, on_retry: Callable[[int, str, float], None] | None = None,
) -> T:
    """Await ``fn()`` until it succeeds, a non-retryable status occurs, or attempts run out."""
    for attempt in _attempts(policy, rng, slab, on_retry):
        with attempt:
            return await fn()
        await sleep(attempt.delay)
    raise AssertionError("unreachable")  # pragma: no cover


def call_with_retry(
    fn: Callable[[], T], policy: RetryPolicy, *, sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None, slab: int | None = None, on_retry: Callable[[int, str, float], None] | None = None,
) -> T:
    """Blocking twin of ``call_with_retry_async`` (the same ``_attempts``)."""
    for attempt in _attempts(policy, rng, slab, on_retry):
        with attempt:
            return fn()
        sleep(attempt.delay)
    raise AssertionError("unreachable")  # pragma: no cover
