"""The clients' protocol written once, free of any transport ("sans I/O").

A protocol is a generator that yields what it needs done (``Rpc``: a transport call, with or
without retries; ``Pause``: wait; ``Offload``: file / CPU work; ``Gather``: other protocols at
once; ``ModelCheck``) and receives each answer, or has the call's exception thrown into it at the
``yield``. ``LesionClient`` performs the steps blocking,
``AsyncLesionClient`` awaits them; neither holds protocol logic of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ctlesion_client.retry import RetryPolicy

T = TypeVar("T")


@dataclass(frozen=True)
class Rpc:
    """``call(transport)``; through ``call_with_retry`` (``retry_kwargs`` passed on) when ``retry`` is set."""

    call: Callable[[Any], Any]
    retry: RetryPolicy | None = None
    retry_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Offload:
    """Work off the event loop (file reads, request building): a worker thread under asyncio."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Gather:
    """Run protocols concurrently (at most ``concurrency`` in flight); ``on_result`` gets each value
    as it arrives; the first error cancels the ones not started and is raised."""

    jobs: list[Callable[[], Generator[Any, Any, Any]]]
    on_result: Callable[[Any], None]


@dataclass(frozen=True)
class ModelCheck:
    """The client's one-time model check (under the client's own lock)."""


Step = Rpc | Pause | Offload | Gather | ModelCheck
Steps = Generator[Step, Any, T]


class StepRunner(Generic[T]):
    """Advances a protocol: ``next()`` gives the step to perform (None when done: ``value``);
    set ``reply`` or ``error`` with its outcome before the next ``next()``."""

    def __init__(self, steps: Steps[T]) -> None:
        self._steps = steps
        self.reply: Any = None
        self.error: BaseException | None = None
        self.value: T | None = None

    def next(self) -> Step | None:
        try:
            step = self._steps.throw(self.error) if self.error is not None else self._steps.send(self.reply)
        except StopIteration as done:
            self.value = done.value
            return None
        self.reply, self.error = None, None
        return step


@dataclass
class SlabTally:
    """Bookkeeping of one series' slabs: results as they arrive, latencies, retry notes, progress."""

    total: int
    progress: Callable[[int, int], None] | None = None
    results: list[tuple[Any, list[Any]]] = field(default_factory=list)  # (SlabPlan, detections)
    latencies: list[float] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)  # per call: concurrent series on one client keep theirs apart

    def __post_init__(self) -> None:
        if self.progress is not None:
            self.progress(0, self.total)  # the bar shows before the first (possibly slow) slab returns

    def add(self, outcome: tuple[Any, list[Any], float]) -> None:
        plan, detections, latency = outcome
        self.results.append((plan, detections))
        self.latencies.append(latency)
        if self.progress is not None:
            self.progress(len(self.results), self.total)

    def timings(self, infer_s: float) -> dict[str, float]:
        lat = self.latencies
        return {
            "infer_s": infer_s,
            "slab_latency_mean_s": sum(lat) / len(lat) if lat else 0.0,
            "slab_latency_max_s": max(lat, default=0.0),
            "retries": float(len(self.retries)),
        }
