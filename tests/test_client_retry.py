"""The one retry loop both clients use: the blocking and the asyncio call retry alike, map the last
failure to the same client error, and pass anything that is not a transport error through untouched."""

from __future__ import annotations

import asyncio
import random

import pytest
from tritonclient.utils import InferenceServerException

from ctlesion_client.errors import InvalidInputError, ServerUnavailableError
from ctlesion_client.retry import RetryPolicy, call_with_retry, call_with_retry_async

POLICY = RetryPolicy(max_attempts=3, initial_backoff_s=0.5, max_backoff_s=2.0)


def _failing(statuses: list[str], result: str = "ok"):  # noqa: ANN202
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= len(statuses):
            raise InferenceServerException("boom", status=f"StatusCode.{statuses[len(calls) - 1]}")
        return result

    return fn, calls


def _both(statuses: list[str]) -> list[tuple[object, list[float], list[tuple[int, str, float]], int]]:
    """(outcome, sleeps, on_retry notes, calls) of the blocking and the asyncio call."""
    out = []
    for mode in ("sync", "async"):
        fn, calls = _failing(statuses)
        sleeps: list[float] = []
        notes: list[tuple[int, str, float]] = []
        kwargs = {"rng": random.Random(7), "slab": 2, "on_retry": lambda *a, notes=notes: notes.append(a)}
        try:
            if mode == "sync":
                outcome: object = call_with_retry(fn, POLICY, sleep=sleeps.append, **kwargs)
            else:
                async def sleep(s: float, sleeps: list[float] = sleeps) -> None:
                    sleeps.append(s)

                async def afn(fn=fn) -> str:  # noqa: ANN001
                    return fn()

                outcome = asyncio.run(call_with_retry_async(afn, POLICY, sleep=sleep, **kwargs))
        except Exception as exc:  # noqa: BLE001 - compared below
            outcome = (type(exc).__name__, str(exc))
        out.append((outcome, sleeps, notes, len(calls)))
    return out


def test_unavailable_then_success_is_retried_alike() -> None:
    sync, aio = _both(["UNAVAILABLE", "UNAVAILABLE"])
    assert sync == aio and sync[0] == "ok" and sync[3] == 3 and len(sync[1]) == 2
    assert [n[0] for n in sync[2]] == [1, 2] and all(n[1] == "UNAVAILABLE" for n in sync[2])


def test_last_failure_maps_to_the_same_client_error() -> None:
    sync, aio = _both(["UNAVAILABLE"] * 5)
    assert sync == aio and sync[0][0] == ServerUnavailableError.__name__ and sync[3] == POLICY.max_attempts


def test_invalid_argument_is_not_retried() -> None:
    sync, aio = _both(["INVALID_ARGUMENT"])
    assert sync == aio and sync[0][0] == InvalidInputError.__name__ and sync[3] == 1 and sync[1] == []


def test_other_errors_pass_through_untouched() -> None:
    def broken() -> None:
        raise KeyError("not a transport error")

    async def abroken() -> None:
        broken()

    with pytest.raises(KeyError):
        call_with_retry(broken, POLICY, sleep=lambda s: None)
    with pytest.raises(KeyError):
        asyncio.run(call_with_retry_async(abroken, POLICY))
