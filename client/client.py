"""gRPC clients of the ``lesion_detection`` ensemble: ``LesionClient`` (blocking, threads) and
``AsyncLesionClient`` (asyncio). Both build requests and results with ``ctlesion_client.core``; they
differ only in how slabs travel (a thread pool vs tasks under a semaphore).

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
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any

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
from ctlesion_client.errors import InvalidInputError, ModelMismatchError
from ctlesion_client.options import ClientOptions, DetectOptions
from ctlesion_client.result import SeriesResult
from ctlesion_client.retry import call_with_retry, call_with_retry_async, status_of
from ctlesion_client.slabs import SlabPlan
from preprocess_backend.lesion_filters import LesionFilter
from preprocess_backend.types import Detection

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (slabs done, slabs in all); first call (0, total)
ImageInput = str | Path | bytes | bytearray | pydicom.Dataset


class _ClientBase:
    """State and bookkeeping shared by both clients (no I/O here)."""

    def __init__(self, url: str, options: ClientOptions | None, detect_options: DetectOptions | None) -> None:
        self.url = url
        self.options = options or ClientOptions()
        self.detect_options = detect_options or DetectOptions()
        self._checked = not self.options.check_metadata
        self._fpr: fpr_pass.FprServing | None = None
        self._fpr_known = False  # whether the server was asked for its FPR model yet

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
            min_size_mm=3.0 if detect.min_size_mm is None else detect.min_size_mm,
            max_size_mm=30.0 if detect.max_size_mm is None else detect.max_size_mm,
            score_threshold=threshold,
        )

    def _cube_requests(self, prepared: PreparedSeries, result: SeriesResult, detect: DetectOptions) -> list[fpr_pass.CubeRequest]:
        if not (detect.fpr and self._fpr is not None and result.lesions and prepared.geometry is not None and prepared.merge):
            return []
        return fpr_pass.plan_cube_requests(result.lesions, prepared.geometry, self._fpr.spec)

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

    def _finish(
        self,
        prepared: PreparedSeries,
        results: Sequence[tuple[SlabPlan, list[Detection]]],
        detect: DetectOptions,
        started: float,
        infer_s: float,
        latencies: Sequence[float],
        retries: Sequence[str],
    ) -> SeriesResult:
        timings = {
            "infer_s": infer_s,
            "slab_latency_mean_s": sum(latencies) / len(latencies) if latencies else 0.0,
            "slab_latency_max_s": max(latencies, default=0.0),
            "retries": float(len(retries)),
        }
        result = finish(prepared, results, self.options, detect, timings, retries)
        result.timings["total_s"] = time.perf_counter() - started
        log.info(
            "series %s: %d slices, %d slabs, %d detections, %d lesions in %.2f s",
            result.series_instance_uid, result.num_slices, result.num_slabs,
            len(result.detections), len(result.lesions), result.timings["total_s"],
        )
        return result


class LesionClient(_ClientBase):
    """Blocking client; slabs of a series go out concurrently from a thread pool."""

    def __init__(
        self,
        url: str,
        options: ClientOptions | None = None,
        detect_options: DetectOptions | None = None,
        *,
        transport: Transport | None = None,
    ) -> None:
        super().__init__(url, options, detect_options)
        self._transport: Transport = transport or grpcclient.InferenceServerClient(**transport_kwargs(url, self.options))
        self._lock = threading.Lock()

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> LesionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the server and the model are ready; ``DeadlineExceededError`` after ``timeout_s``."""
        poll = ReadyPoll(self.url, timeout_s)
        while True:
            try:
                if self._transport.is_server_ready(client_timeout=poll.probe_timeout()) and self._transport.is_model_ready(
                    self.options.model_name, client_timeout=poll.probe_timeout()
                ):
                    return
                status = "not ready"
            except InferenceServerException as exc:
                status = status_of(exc)
            time.sleep(poll.next_delay(status))

    def check_model(self) -> None:
        """Compare the served model's metadata with the contract (once; ``ModelMismatchError``)."""
        with self._lock:
            if self._checked:
                return
            metadata = call_with_retry(
                lambda: self._transport.get_model_metadata(self.options.model_name, client_timeout=self.options.client_timeout_s),
                self.options.retry,
            )
            self._metadata_verdict(metadata)
        if not self._fpr_known:
            self._fpr_verdict(self._fetch_fpr_config())

    def _fetch_fpr_config(self) -> Any:
        try:
            if not self._transport.is_model_ready(fpr_pass.FPR_MODEL, client_timeout=self.options.client_timeout_s):
                return None
            return self._transport.get_model_config(fpr_pass.FPR_CLASSIFIER, as_json=True, client_timeout=self.options.client_timeout_s)
        except InferenceServerException:
            return None

    def _fpr_probs(self, prepared: PreparedSeries, result: SeriesResult, detect: DetectOptions) -> Any:
        requests = self._cube_requests(prepared, result, detect)
        if not requests:
            return None
        probs = np.full(len(result.lesions), np.nan, dtype=np.float32)

        def one(req: fpr_pass.CubeRequest) -> None:
            kwargs = self._cube_kwargs(prepared, result, req)
            out = call_with_retry(lambda: self._transport.infer(**kwargs), self.options.retry)
            probs[list(req.lesions)] = fpr_pass.probabilities(out)

        with ThreadPoolExecutor(max_workers=max(1, min(self.options.concurrency, len(requests))), thread_name_prefix="ctlesion-fpr") as pool:
            for fut in [pool.submit(one, r) for r in requests]:
                fut.result()
        return probs

    def detect_image(self, image: ImageInput, detect_options: DetectOptions | None = None) -> SeriesResult:
        """One radiograph, one CT slice or one multi-frame file in a single request."""
        started = time.perf_counter()
        return self._run(prepare_image(image), detect_options or self.detect_options, started, None)

    def detect_series(
        self,
        series: SeriesInput,
        *,
        series_uid: str | None = None,
        detect_options: DetectOptions | None = None,
        progress: ProgressFn | None = None,
    ) -> SeriesResult:
        """A directory, file paths, Part-10 bytes or pydicom datasets of one series -> ``SeriesResult``."""
        started = time.perf_counter()
        prepared = prepare_series(series, self.options, series_uid)
        return self._run(prepared, detect_options or self.detect_options, started, progress)

    def _send(
        self, prepared: PreparedSeries, plan: SlabPlan, detect: DetectOptions, retries: list[str]
    ) -> tuple[SlabPlan, list[Detection], float]:
        t0 = time.perf_counter()
        kwargs = self._slab_request(prepared, plan, detect)
        try:
            result = call_with_retry(
                lambda: self._transport.infer(**kwargs), self.options.retry, slab=plan.index, on_retry=self._on_retry(plan, retries)
            )
        except InvalidInputError as exc:
            raise enrich_invalid_input(exc, prepared, plan) from exc
        return plan, parse_response(result), time.perf_counter() - t0

    def _run(self, prepared: PreparedSeries, detect: DetectOptions, started: float, progress: ProgressFn | None) -> SeriesResult:
        self.check_model()
        final = detect
        detect = self._server_detect(detect)
        t0 = time.perf_counter()
        results: list[tuple[SlabPlan, list[Detection]]] = []
        latencies: list[float] = []
        retries: list[str] = []  # per call: concurrent series on one client keep theirs apart
        total = len(prepared.plans)
        if progress is not None:
            progress(0, total)  # the bar shows before the first (possibly slow) slab returns
        workers = max(1, min(self.options.concurrency, total))
        # The pool size is the in-flight bound: each worker reads its slab's files, then waits on gRPC.
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctlesion-slab") as pool:
            futures = [pool.submit(self._send, prepared, plan, detect, retries) for plan in prepared.plans]
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        plan, dets, latency = fut.result()  # raises the first slab error
                        results.append((plan, dets))
                        latencies.append(latency)
                        if progress is not None:
                            progress(len(results), total)
            except BaseException:
                for fut in pending:
                    fut.cancel()  # slabs not started yet; running ones end within their deadline
                raise
        result = self._finish(prepared, results, detect, started, time.perf_counter() - t0, latencies, retries)
        t1 = time.perf_counter()
        probs = self._fpr_probs(prepared, result, final)
        result = self._complete(result, probs, final, time.perf_counter() - t1)
        result.timings["total_s"] = time.perf_counter() - started
        return result


class AsyncLesionClient(_ClientBase):
    """asyncio client over ``tritonclient.grpc.aio``; slabs are tasks bounded by a semaphore."""

    def __init__(
        self,
        url: str,
        options: ClientOptions | None = None,
        detect_options: DetectOptions | None = None,
        *,
        transport: Any | None = None,
    ) -> None:
        super().__init__(url, options, detect_options)
        self._transport = transport or grpcaio.InferenceServerClient(**transport_kwargs(url, self.options))
        self._lock: asyncio.Lock | None = None

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncLesionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        poll = ReadyPoll(self.url, timeout_s)
        while True:
            try:
                if await self._transport.is_server_ready(client_timeout=poll.probe_timeout()) and await self._transport.is_model_ready(
                    self.options.model_name, client_timeout=poll.probe_timeout()
                ):
                    return
                status = "not ready"
            except InferenceServerException as exc:
                status = status_of(exc)
            await asyncio.sleep(poll.next_delay(status))

    async def check_model(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._checked:
                return
            metadata = await call_with_retry_async(
                lambda: self._transport.get_model_metadata(self.options.model_name, client_timeout=self.options.client_timeout_s),
                self.options.retry,
            )
            self._metadata_verdict(metadata)
            if not self._fpr_known:
                self._fpr_verdict(await self._fetch_fpr_config())

    async def _fetch_fpr_config(self) -> Any:
        try:
            if not await self._transport.is_model_ready(fpr_pass.FPR_MODEL, client_timeout=self.options.client_timeout_s):
                return None
            return await self._transport.get_model_config(fpr_pass.FPR_CLASSIFIER, as_json=True, client_timeout=self.options.client_timeout_s)
        except InferenceServerException:
            return None

    async def _fpr_probs(self, prepared: PreparedSeries, result: SeriesResult, detect: DetectOptions) -> Any:
        requests = self._cube_requests(prepared, result, detect)
        if not requests:
            return None
        probs = np.full(len(result.lesions), np.nan, dtype=np.float32)
        semaphore = asyncio.Semaphore(self.options.concurrency)

        async def one(req: fpr_pass.CubeRequest) -> None:
            async with semaphore:
                kwargs = await asyncio.to_thread(self._cube_kwargs, prepared, result, req)
                out = await call_with_retry_async(lambda: self._transport.infer(**kwargs), self.options.retry)
            probs[list(req.lesions)] = fpr_pass.probabilities(out)

        await asyncio.gather(*(one(r) for r in requests))
        return probs

    async def detect_image(self, image: ImageInput, detect_options: DetectOptions | None = None) -> SeriesResult:
        started = time.perf_counter()
        prepared = await asyncio.to_thread(prepare_image, image)
        return await self._run(prepared, detect_options or self.detect_options, started, None)

    async def detect_series(
        self,
        series: SeriesInput,
        *,
        series_uid: str | None = None,
        detect_options: DetectOptions | None = None,
        progress: ProgressFn | None = None,
    ) -> SeriesResult:
        started = time.perf_counter()
        # Header reading is file I/O: keep it off the event loop.
        prepared = await asyncio.to_thread(prepare_series, series, self.options, series_uid)
        return await self._run(prepared, detect_options or self.detect_options, started, progress)

    async def _send(
        self, prepared: PreparedSeries, plan: SlabPlan, detect: DetectOptions, retries: list[str]
    ) -> tuple[SlabPlan, list[Detection], float]:
        t0 = time.perf_counter()
        kwargs = await asyncio.to_thread(self._slab_request, prepared, plan, detect)
        try:
            result = await call_with_retry_async(
                lambda: self._transport.infer(**kwargs), self.options.retry, slab=plan.index, on_retry=self._on_retry(plan, retries)
            )
        except InvalidInputError as exc:
            raise enrich_invalid_input(exc, prepared, plan) from exc
        return plan, parse_response(result), time.perf_counter() - t0

    async def _run(self, prepared: PreparedSeries, detect: DetectOptions, started: float, progress: ProgressFn | None) -> SeriesResult:
        await self.check_model()
        final = detect
        detect = self._server_detect(detect)
        t0 = time.perf_counter()
        semaphore = asyncio.Semaphore(self.options.concurrency)
        results: list[tuple[SlabPlan, list[Detection]]] = []
        latencies: list[float] = []
        retries: list[str] = []  # per call: concurrent series on one client keep theirs apart
        total = len(prepared.plans)
        if progress is not None:
            progress(0, total)  # the bar shows before the first (possibly slow) slab returns

        async def one(plan: SlabPlan) -> None:
            async with semaphore:
                plan, dets, latency = await self._send(prepared, plan, detect, retries)
            results.append((plan, dets))
            latencies.append(latency)
            if progress is not None:
                progress(len(results), total)

        tasks = [asyncio.create_task(one(plan)) for plan in prepared.plans]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
            raise
        result = self._finish(prepared, results, detect, started, time.perf_counter() - t0, latencies, retries)
        t1 = time.perf_counter()
        probs = await self._fpr_probs(prepared, result, final)
        result = self._complete(result, probs, final, time.perf_counter() - t1)
        result.timings["total_s"] = time.perf_counter() - started
        return result
