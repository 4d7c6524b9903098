"""gRPC clients of the ``lesion_detection`` ensemble: ``LesionClient`` (blocking, threads) and
``AsyncLesionClient`` (asyncio).

The protocol is written once, in ``_ClientBase``, as step generators (``ctlesion_client.steps``):
readiness polling, the metadata check, one slab request, one FPR cube request, and the bookkeeping
around them, with requests and results built by ``ctlesion_client.core``. The two clients only
perform those steps (blocking vs awaited) and run many at once (a thread pool vs tasks under a
semaphore).

    with LesionClient("localhost:8001") as client:
        client.wait_ready(60)
        result = client.detect_series("study/series_dir")
        print(result.to_json())
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from ctlesion_client import fpr as fpr_pass
from ctlesion_client.core import (
    PreparedSeries,
    ReadyPoll,
    SeriesInput,
    Transport,
    build_inputs,
    check_metadata,
    enrich_invalid_input,
    finish,
    infer_kwargs,
    parse_response,
    prepare_image,
    prepare_series,
    transport_kwargs,
)
from ctlesion_client.errors import InvalidInputError, ModelMismatchError, ServerError
from ctlesion_client.options import ClientOptions, DetectOptions
from ctlesion_client.result import SeriesResult
from ctlesion_client.retry import call_with_retry, call_with_retry_async, status_of
from ctlesion_client.slabs import DEFAULT_K, RequestShape, SlabPlan, step_model_names
from ctlesion_client.steps import Gather, ModelCheck, Offload, Pause, Rpc, SlabTally, Step, StepRunner, Steps
from preprocess_backend.lesion_filters import LesionFilter
from preprocess_backend.types import Detection

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (slabs done, slabs in all); first call (0, total)
ImageInput = str | Path | bytes | bytearray | pydicom.Dataset
T = TypeVar("T")
SlabOutcome = tuple[SlabPlan, list[Detection], float]


class _ClientBase:
    """State and the protocol shared by both clients, as steps (no I/O here)."""

    _grpc_client: Callable[..., Any]  # tritonclient's blocking or asyncio gRPC client class
    _lock_type: Callable[[], Any]  # threading.Lock or asyncio.Lock

    def __init__(
        self, url: str, options: ClientOptions | None = None, detect_options: DetectOptions | None = None, *, transport: Any = None
    ) -> None:
        self.url = url
        self.options = options or ClientOptions()
        self.detect_options = detect_options or DetectOptions()
        self._transport = transport or self._grpc_client(**transport_kwargs(url, self.options))
        self._lock = self._lock_type()
        self._checked = not self.options.check_metadata
        self._fpr: fpr_pass.FprServing | None = None
        self._fpr_known = False  # whether the server was asked for its FPR model yet
        self._shape: RequestShape | None = None  # what the served ensemble declares (k, detector batch)

    def _fpr_verdict(self, config: Any) -> None:
        self._fpr = None if config is None else fpr_pass.serving_from_config(config)
        self._fpr_known = True
        if self._fpr is None:
            log.info("no %s model served: lesions keep the detector's score", fpr_pass.FPR_MODEL)

    def _server_detect(self, detect: DetectOptions) -> DetectOptions:
        """The per-slice options sent with each slab: the candidate threshold of the FPR model."""
        use_fpr = detect.fpr and self._fpr is not None
        candidate = detect.candidate_threshold
        if candidate is None:
            candidate = self._fpr.candidate_threshold if use_fpr else (  # type: ignore[union-attr]
                detect.score_threshold if detect.score_threshold is not None else fpr_pass.ARTICLE_SCORE_THRESHOLD)
        return replace(detect, candidate_threshold=candidate)

    def _lesion_rule(self, detect: DetectOptions) -> LesionFilter:
        use_fpr = detect.fpr and self._fpr is not None
        threshold = detect.score_threshold
        if threshold is None:
            threshold = self._fpr.operating_threshold if use_fpr else fpr_pass.ARTICLE_SCORE_THRESHOLD  # type: ignore[union-attr]
        return LesionFilter(
            min_size_mm=LesionFilter.min_size_mm if detect.min_size_mm is None else detect.min_size_mm,
            max_size_mm=LesionFilter.max_size_mm if detect.max_size_mm is None else detect.max_size_mm,
            score_threshold=threshold,
        )

    def _cube_requests(self, prepared: PreparedSeries, result: SeriesResult, detect: DetectOptions,
                       followups: list[int] | None = None) -> list[fpr_pass.CubeRequest]:  # fmt: skip
        """The FPR requests of a series; ``followups``: only those lesions, with their airway probes' whole window."""
        if not (detect.fpr and self._fpr is not None and result.lesions and prepared.geometry is not None and prepared.merge):
            return []
        if followups is None:
            return fpr_pass.plan_cube_requests(result.lesions, prepared.geometry, self._fpr.spec)
        subset = [result.lesions[i] for i in followups]
        plans = fpr_pass.plan_cube_requests(subset, prepared.geometry, self._fpr.spec, probe_window=True)
        return [replace(r, lesions=tuple(followups[i] for i in r.lesions)) for r in plans]

    def _cube_kwargs(self, prepared: PreparedSeries, result: SeriesResult, request: fpr_pass.CubeRequest) -> dict[str, Any]:
        slices = [item.read() for item in prepared.items[request.start : request.stop]]
        centres = [result.lesions[i].centre_mm for i in request.lesions]
        kwargs = infer_kwargs(self.options, fpr_pass.cube_inputs(slices, centres))
        kwargs["model_name"] = fpr_pass.FPR_MODEL
        kwargs["outputs"] = None
        return kwargs

    def _complete(self, result: SeriesResult, probs: Any, detect: DetectOptions, fpr_s: float) -> SeriesResult:
        """Rescore with the FPR probabilities (None: no FPR ran), then the 3D size rule and threshold."""
        t0 = time.perf_counter()
        result.candidates = len(result.lesions)
        result.lesions = fpr_pass.finalize(result.lesions, probs, self._fpr if probs is not None else None, self._lesion_rule(detect))
        result.timings["fpr_s"] = fpr_s
        result.timings["filter_s"] = time.perf_counter() - t0
        result.options["fpr"] = None if probs is None or self._fpr is None else {
            "rule": self._fpr.rule, "operating_threshold": self._fpr.operating_threshold,
            "candidate_threshold": self._fpr.candidate_threshold}  # fmt: skip
        result.options["lesion_filter"] = self._lesion_rule(detect).__dict__
        return result

    def _metadata_verdict(self, metadata: Any) -> None:
        problems = check_metadata(metadata)
        if problems:
            raise ModelMismatchError(self.options.model_name, problems)
        self._checked = True

    @staticmethod
    def _on_retry(plan: SlabPlan, sink: list[str]) -> Callable[[int, str, float], None]:
        def note(attempt: int, status: str, delay: float) -> None:
            sink.append(f"slab {plan.index}: {status}, retry {attempt} after {delay:.2f} s")

        return note

    def _slab_request(self, prepared: PreparedSeries, plan: SlabPlan, detect: DetectOptions) -> dict[str, Any]:
        return infer_kwargs(self.options, build_inputs(prepared.slab_bytes(plan), detect))

    # ------------------------------------------------------------------ the protocol, as steps

    def _ready_steps(self, timeout_s: float) -> Steps[None]:
        """Poll server and model readiness until both answer ready; ``DeadlineExceededError`` after ``timeout_s``."""
        poll = ReadyPoll(self.url, timeout_s)
        name = self.options.model_name
        while True:
            try:
                server = yield Rpc(lambda t: t.is_server_ready(client_timeout=poll.probe_timeout()))
                if server and (yield Rpc(lambda t: t.is_model_ready(name, client_timeout=poll.probe_timeout()))):
                    return
                status = "not ready"
            except InferenceServerException as exc:
                status = status_of(exc)
            yield Pause(poll.next_delay(status))

    def _check_steps(self) -> Steps[None]:
        """Once per client: the served request shape and metadata against the contract, then whether an
        FPR model is served."""
        if self._shape is None:
            self._shape = yield from self._shape_steps()
        if self._checked:
            return
        timeout = self.options.client_timeout_s
        metadata = yield Rpc(lambda t: t.get_model_metadata(self.options.model_name, client_timeout=timeout), self.options.retry)
        self._metadata_verdict(metadata)
        if not self._fpr_known:
            self._fpr_verdict((yield from self._fpr_config_steps()))

    def _shape_steps(self) -> Steps[RequestShape]:
        """The ensemble's and its steps' configs -> the served k and detector batch (``RequestShape``)."""
        timeout = self.options.client_timeout_s

        def config(name: str) -> Any:
            return lambda t: t.get_model_config(name, as_json=True, client_timeout=timeout)

        try:
            ensemble = yield Rpc(config(self.options.model_name), self.options.retry)
            steps = {}
            for name in step_model_names(ensemble):
                steps[name] = yield Rpc(config(name), self.options.retry)
        except (InferenceServerException, ServerError, AttributeError):  # configs refused (old server, test transport)
            return RequestShape()
        return RequestShape.from_configs(ensemble, steps)

    def planning_options(self) -> ClientOptions:
        """The options slabs are cut with: k from the served model (an explicit, different k is a
        ``ModelMismatchError``), the slab size that lets two requests merge into one detector batch
        unless ``slab_size`` is set."""
        shape = self._shape or RequestShape()
        if shape.k is not None and self.options.k is not None and self.options.k != shape.k:
            raise ModelMismatchError(self.options.model_name, [f"the served model takes k = {shape.k} context slices, the client was told k = {self.options.k}"])
        k = shape.k or self.options.k or DEFAULT_K
        slab = self.options.slab_size or RequestShape(k, shape.max_batch_size).slab_size()
        return replace(self.options, k=k, slab_size=slab, context_mm=shape.context_mm if self._shape else self.options.context_mm)

    def _prepare(self, series: SeriesInput, series_uid: str | None = None) -> PreparedSeries:
        """Headers read, series ordered, slabs cut with ``planning_options`` (after the model check)."""
        return prepare_series(series, self.planning_options(), series_uid)

    def _fpr_config_steps(self) -> Steps[Any]:
        timeout = self.options.client_timeout_s
        try:
            if not (yield Rpc(lambda t: t.is_model_ready(fpr_pass.FPR_MODEL, client_timeout=timeout))):
                return None
            return (yield Rpc(lambda t: t.get_model_config(fpr_pass.FPR_CLASSIFIER, as_json=True, client_timeout=timeout)))
        except InferenceServerException:
            return None

    def _slab_steps(self, prepared: PreparedSeries, plan: SlabPlan, detect: DetectOptions, retries: list[str]) -> Steps[SlabOutcome]:
        """One slab: read its files and build the request, send it with retries, parse the detections."""
        t0 = time.perf_counter()
        kwargs = yield Offload(self._slab_request, (prepared, plan, detect))
        retry = {"slab": plan.index, "on_retry": self._on_retry(plan, retries)}
        try:
            result = yield Rpc(lambda t: t.infer(**kwargs), self.options.retry, retry)
        except InvalidInputError as exc:
            raise enrich_invalid_input(exc, prepared, plan) from exc
        return plan, parse_response(result), time.perf_counter() - t0

    def _cube_steps(self, prepared: PreparedSeries, result: SeriesResult, request: fpr_pass.CubeRequest) -> Steps[tuple[list[int], Any]]:
        """One FPR request: the cubes of some lesions -> their probabilities and airway probes."""
        kwargs = yield Offload(self._cube_kwargs, (prepared, result, request))
        out = yield Rpc(lambda t: t.infer(**kwargs), self.options.retry)
        return list(request.lesions), fpr_pass.probabilities(out)

    def _detect_steps(self, load: Offload, detect_options: DetectOptions | None, progress: ProgressFn | None) -> Steps[SeriesResult]:
        """Read the input (``load``), check the model, send the slabs, link lesions, run the FPR pass."""
        started = time.perf_counter()
        yield ModelCheck()  # first: the served k and detector batch decide the slabs (planning_options)
        prepared: PreparedSeries = yield load
        final = detect_options or self.detect_options
        detect, tally, t0 = self._server_detect(final), SlabTally(len(prepared.plans), progress), time.perf_counter()
        yield Gather(self._slab_jobs(prepared, detect, tally), tally.add)
        result = self._finish(prepared, tally, detect, started, time.perf_counter() - t0)
        t1, answers, cubes = time.perf_counter(), [], self._cube_jobs(prepared, result, final)
        yield Gather(cubes, answers.append)
        probs, probes = self._gathered(len(result.lesions), answers) if cubes else (None, None)
        followups = fpr_pass.probe_followups(result.lesions, probes)
        if followups:  # airway probes that reached the end of the slices sent: their whole window
            again: list[tuple[list[int], Any]] = []
            yield Gather(self._cube_jobs(prepared, result, final, followups), again.append)
            for lesions, (_, p) in again:
                if p is not None:
                    probes[lesions] = p  # type: ignore[index]
        return self._second_pass(result, probs, probes, final, t1, started, len(followups))

    def _slab_jobs(self, prepared: PreparedSeries, detect: DetectOptions, tally: SlabTally) -> list[Callable[[], Steps[SlabOutcome]]]:
        return [lambda plan=plan: self._slab_steps(prepared, plan, detect, tally.retries) for plan in prepared.plans]

    def _cube_jobs(self, prepared: PreparedSeries, result: SeriesResult, detect: DetectOptions,
                   followups: list[int] | None = None) -> list[Callable[[], Steps[Any]]]:  # fmt: skip
        return [lambda r=r: self._cube_steps(prepared, result, r) for r in self._cube_requests(prepared, result, detect, followups)]

    @staticmethod
    def _gathered(n: int, answers: list[tuple[list[int], Any]]) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-lesion FPR probabilities (NaN where no cube came back) and airway probes (None: an old server)."""
        probs = np.full(n, np.nan, dtype=np.float32)
        probes = None
        for lesions, (p, pr) in answers:
            probs[lesions] = p
            if pr is not None:
                probes = np.full((n, pr.shape[1]), np.nan, dtype=np.float32) if probes is None else probes
                probes[lesions] = pr
        return probs, probes

    def _finish(self, prepared: PreparedSeries, tally: SlabTally, detect: DetectOptions, started: float, infer_s: float) -> SeriesResult:
        result = finish(prepared, tally.results, self.planning_options(), detect, tally.timings(infer_s), tally.retries)
        result.timings["total_s"] = time.perf_counter() - started
        log.info(
            "series %s: %d slices, %d slabs, %d detections, %d lesions in %.2f s",
            result.series_instance_uid, result.num_slices, result.num_slabs,
            len(result.detections), len(result.lesions), result.timings["total_s"],
        )
        return result

    def _second_pass(self, result: SeriesResult, probs: np.ndarray | None, probes: np.ndarray | None, detect: DetectOptions,
                     fpr_started: float, started: float, followups: int = 0) -> SeriesResult:  # fmt: skip
        """FPR probabilities (None when no cube was sent), airway lumens vetoed -> rescored, filtered lesions; total time."""
        vetoed = 0
        if probs is not None:
            before = probs
            probs = fpr_pass.vetoed(probs, probes, result.lesions)
            vetoed = int(np.sum((probs == 0) & (before != 0)))
        result = self._complete(result, probs, detect, time.perf_counter() - fpr_started)
        if result.options.get("fpr") is not None:  # how many candidates the airway probe removed, and its extra requests
            result.options["fpr"].update(airway_vetoed=vetoed, airway_followups=followups)
        result.timings["total_s"] = time.perf_counter() - started
        return result

class LesionClient(_ClientBase):
    """Blocking client; slabs of a series go out concurrently from a thread pool.

    ``LesionClient(url, options=None, detect_options=None, *, transport=None)``; ``transport`` is a
    ``tritonclient.grpc.InferenceServerClient`` look-alike (tests), made from ``url`` when None.
    """

    _grpc_client = grpcclient.InferenceServerClient
    _lock_type = threading.Lock
    _transport: Transport

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> LesionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _perform(self, step: Step) -> Any:
        if isinstance(step, Rpc):
            call = lambda: step.call(self._transport)  # noqa: E731
            return call_with_retry(call, step.retry, **step.retry_kwargs) if step.retry else call()
        if isinstance(step, Offload):
            return step.fn(*step.args)
        if isinstance(step, Gather):
            return self._gather(step.jobs, step.on_result)
        if isinstance(step, ModelCheck):
            return self.check_model()
        return time.sleep(step.seconds)

    def _drive(self, steps: Steps[T]) -> T:
        run = StepRunner(steps)
        while (step := run.next()) is not None:
            try:
                run.reply = self._perform(step)
            except Exception as exc:  # handed to the protocol at its yield
                run.error = exc
        return run.value  # type: ignore[return-value]

    def _gather(self, jobs: list[Callable[[], Steps[Any]]], on_result: Callable[[Any], None]) -> None:
        # The pool size is the in-flight bound: each worker reads its slab's files, then waits on gRPC.
        workers = max(1, min(self.options.concurrency, len(jobs)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctlesion-slab") as pool:
            pending = {pool.submit(lambda job=job: self._drive(job())) for job in jobs}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        on_result(fut.result())  # raises the first error
            except BaseException:
                for fut in pending:
                    fut.cancel()  # not started yet; running ones end within their deadline
                raise

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the server and the model are ready; ``DeadlineExceededError`` after ``timeout_s``."""
        self._drive(self._ready_steps(timeout_s))

    def check_model(self) -> None:
        """Compare the served model's metadata with the contract (once; ``ModelMismatchError``)."""
        with self._lock:
            self._drive(self._check_steps())

    def prepare(self, series: SeriesInput, series_uid: str | None = None) -> PreparedSeries:
        """The ordered series and the slabs this client sends for it (the served k and detector batch
        decide them): what ``detect_series`` sends, for load tests and benchmarks to send too."""
        self.check_model()
        return self._prepare(series, series_uid)

    def detect_image(self, image: ImageInput, detect_options: DetectOptions | None = None) -> SeriesResult:
        """One radiograph, one CT slice or one multi-frame file in a single request."""
        return self._drive(self._detect_steps(Offload(prepare_image, (image,)), detect_options, None))

    def detect_series(self, series: SeriesInput, *, series_uid: str | None = None, detect_options: DetectOptions | None = None,
                      progress: ProgressFn | None = None) -> SeriesResult:
        """A directory, file paths, Part-10 bytes or pydicom datasets of one series -> ``SeriesResult``."""
        return self._drive(self._detect_steps(Offload(self._prepare, (series, series_uid)), detect_options, progress))


class AsyncLesionClient(_ClientBase):
    """asyncio client over ``tritonclient.grpc.aio``; slabs are tasks bounded by a semaphore.
    Same constructor as ``LesionClient``; every call is awaited."""

    _grpc_client = grpcaio.InferenceServerClient
    _lock_type = asyncio.Lock

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncLesionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _perform(self, step: Step) -> Any:
        if isinstance(step, Rpc):
            call = lambda: step.call(self._transport)  # noqa: E731
            return await (call_with_retry_async(call, step.retry, **step.retry_kwargs) if step.retry else call())
        if isinstance(step, Offload):  # file reads and request building stay off the event loop
            return await asyncio.to_thread(step.fn, *step.args)
        if isinstance(step, Gather):
            return await self._gather(step.jobs, step.on_result)
        if isinstance(step, ModelCheck):
            return await self.check_model()
        return await asyncio.sleep(step.seconds)

    async def _drive(self, steps: Steps[T]) -> T:
        run = StepRunner(steps)
        while (step := run.next()) is not None:
            try:
                run.reply = await self._perform(step)
            except Exception as exc:  # handed to the protocol at its yield
                run.error = exc
        return run.value  # type: ignore[return-value]

    async def _gather(self, jobs: list[Callable[[], Steps[Any]]], on_result: Callable[[Any], None]) -> None:
        semaphore = asyncio.Semaphore(self.options.concurrency)

        async def one(job: Callable[[], Steps[Any]]) -> None:
            async with semaphore:
                value = await self._drive(job())
            on_result(value)

        tasks = [asyncio.create_task(one(job)) for job in jobs]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        await self._drive(self._ready_steps(timeout_s))

    async def check_model(self) -> None:
        async with self._lock:
            await self._drive(self._check_steps())

    async def detect_image(self, image: ImageInput, detect_options: DetectOptions | None = None) -> SeriesResult:
        return await self._drive(self._detect_steps(Offload(prepare_image, (image,)), detect_options, None))

    async def detect_series(self, series: SeriesInput, *, series_uid: str | None = None,
                            detect_options: DetectOptions | None = None, progress: ProgressFn | None = None) -> SeriesResult:
        # Header reading is file I/O: Offload keeps it off the event loop.
        return await self._drive(self._detect_steps(Offload(self._prepare, (series, series_uid)), detect_options, progress))
