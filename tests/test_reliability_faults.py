"""Faults: the server killed mid-series and restarted; a model that fails to load; no repository.

The restart test uses the real client library (LesionClient with its UNAVAILABLE retries): the
series result after a SIGKILL + restart on the same ports must equal an undisturbed run, slice for
slice (nothing lost, nothing counted twice).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from dicom_factory import Nodule, chest_phantom, phantom_series

from ctlesion_client.client import LesionClient
from ctlesion_client.options import ClientOptions, DetectOptions
from ctlesion_client.retry import RetryPolicy
from ctlesion_client.server import TritonServer, TritonStartError

pytestmark = [pytest.mark.triton, pytest.mark.slow]

DETECT = DetectOptions(score_threshold=0.05, min_size_mm=0.0, max_size_mm=1000.0)
# The restart takes a few seconds (model load); retries must outlast it, with a bounded total.
PATIENT = RetryPolicy(max_attempts=120, initial_backoff_s=0.25, max_backoff_s=1.0)


def _series() -> list[bytes]:
    phantom = chest_phantom(
        z=24, size=256, seed=11, nodules=[Nodule((8, 100, 80), 12), Nodule((16, 140, 180), 10)]  # 180 mm field of view
    )
    return phantom_series(phantom, shuffle_seed=5)


def _summary(result: object) -> list[tuple[object, ...]]:
    """What must survive a restart: every detection, keyed by slice, rounded past float noise."""
    rows = [
        (d.sop_instance_uid, d.slice_index, tuple(round(v, 2) for v in d.box_px), round(d.score, 4))
        for d in result.detections  # type: ignore[attr-defined]
    ]
    return sorted(rows)


@pytest.fixture()
def own_server(cpu_repository: Path, tmp_path: Path) -> Iterator[TritonServer]:
    """A server this test may kill (the session one is shared)."""
    server = TritonServer(cpu_repository, log_path=tmp_path / "first.log")
    server.start(timeout_s=240)
    try:
        yield server
    finally:
        server.stop()


def test_kill_and_restart_mid_series_gives_the_undisturbed_result(
    own_server: TritonServer, tmp_path: Path
) -> None:
    items = _series()
    options = ClientOptions(slab_size=4, concurrency=1, retry=PATIENT, client_timeout_s=120)
    with LesionClient(own_server.grpc_url, options, DETECT) as client:
        reference = client.detect_series(items)
    assert reference.num_slices == 24 and reference.num_slabs >= 5
    assert reference.detections, "an empty reference would make the comparison below vacuous"

    replacement: list[TritonServer] = []
    restarts: list[threading.Thread] = []
    killed = threading.Event()

    def kill_then_restart() -> None:
        assert own_server.process is not None
        os.killpg(own_server.process.pid, signal.SIGKILL)  # no graceful drain: a crash or an OOM kill
        own_server.process.wait(timeout=30)
        own_server.stop()
        killed.set()

        def restart() -> None:
            time.sleep(1.0)  # the client sees UNAVAILABLE for a while, as in a real crash-loop
            server = TritonServer(
                own_server.model_repository,
                http_port=own_server.http_port,
                grpc_port=own_server.grpc_port,
                metrics_port=own_server.metrics_port,
                log_path=tmp_path / "restarted.log",
            )
            replacement.append(server)
            server.start(timeout_s=240)

        thread = threading.Thread(target=restart, daemon=True)
        restarts.append(thread)
        thread.start()

    try:
        # The kill is tied to the client's 3rd call (metadata check, slab 0, then slab 1): the series is
        # always interrupted with slabs still to send, however fast the first ones come back.
        transport = KillOnCall(
            grpcclient.InferenceServerClient(own_server.grpc_url), "infer", 2, kill_then_restart
        )
        with LesionClient(own_server.grpc_url, options, DETECT, transport=transport) as client:
            started = time.perf_counter()
            disturbed = client.detect_series(items)
            elapsed = time.perf_counter() - started
        assert killed.is_set(), "the kill never happened"
        assert replacement and replacement[0].is_ready()
        retries = [w for w in disturbed.warnings if "retr" in w.lower()]
        print(
            f"restart: series done in {elapsed:.1f} s after kill; client notes: {retries or disturbed.warnings}"
        )
        assert any("UNAVAILABLE" in w for w in disturbed.warnings), "the kill did not reach the client"
        assert disturbed.num_slices == reference.num_slices
        assert disturbed.sop_instance_uids == reference.sop_instance_uids
        assert _summary(disturbed) == _summary(reference)
        assert [les.slices for les in disturbed.lesions] == [les.slices for les in reference.lesions]
    finally:
        # Wait for a restart still under way: stopping only what has started would orphan a server
        # that comes up after a failed assertion (it holds ports and CPU for the rest of the session).
        for thread in restarts:
            thread.join(timeout=300)
        for server in replacement:
            server.stop()


class KillOnCall:
    """A transport proxy that runs ``action`` just before the ``n``-th call of ``method``."""

    def __init__(self, inner: Any, method: str, n: int, action: Callable[[], None]) -> None:
        self._inner, self._method, self._n, self._action = inner, method, n, action
        self._calls = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._calls += 1
                fire = self._calls == self._n
            if fire:
                self._action()
            return attr(*args, **kwargs)

        return wrapped


def _broken_repository(cpu_repository: Path, out: Path) -> Path:
    repo = out / "broken"
    shutil.copytree(cpu_repository, repo, symlinks=True)
    # The detector's model file replaced by bytes that no runtime can load.
    for model_file in (repo / "detector" / "1").iterdir():
        if model_file.is_file() and model_file.suffix in {".onnx", ".plan", ".pt"}:
            model_file.write_bytes(b"this is not a model")
    return repo


def test_detector_that_fails_to_load_gives_a_clear_start_error(cpu_repository: Path, tmp_path: Path) -> None:
    repo = _broken_repository(cpu_repository, tmp_path)
    server = TritonServer(repo, log_path=tmp_path / "broken.log")
    started = time.perf_counter()
    with pytest.raises(TritonStartError) as info:
        server.start(timeout_s=120)
    elapsed = time.perf_counter() - started
    message = str(info.value)
    print(f"broken detector: TritonStartError after {elapsed:.1f} s: {message.splitlines()[0][:300]}")
    assert elapsed < 90, "a model that cannot load must end start-up, not wait out the timeout"
    first = message.splitlines()[0]
    assert "exited" in first and "detector" in first and "CudaDriverHelper" not in first
    assert server.process is not None and server.process.poll() is not None  # nothing left running


def _python_model_repository(out: Path, initialize_body: str) -> Path:
    """A one-model repository whose Python ``initialize`` runs ``initialize_body`` (no ONNX needed)."""
    model = out / "repo" / "probe"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "probe"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [{ name: "x" data_type: TYPE_FP32 dims: [1] }]\n'
        'output [{ name: "y" data_type: TYPE_FP32 dims: [1] }]\n'
        "instance_group [{ kind: KIND_CPU count: 1 }]\n"
    )
    (model / "1" / "model.py").write_text(
        "import time\n\n\nclass TritonPythonModel:\n"
        f"    def initialize(self, args):\n        {initialize_body}\n\n"
        "    def execute(self, requests):\n        return []\n"
    )
    return out / "repo"


def test_model_whose_initialize_raises_names_the_exception(tmp_path: Path) -> None:
    repo = _python_model_repository(tmp_path, 'raise RuntimeError("weights file checksum mismatch")')
    server = TritonServer(repo, log_path=tmp_path / "raises.log")
    started = time.perf_counter()
    with pytest.raises(TritonStartError) as info:
        server.start(timeout_s=120)
    elapsed = time.perf_counter() - started
    first = str(info.value).splitlines()[0]
    print(f"initialize raises: TritonStartError after {elapsed:.1f} s: {first[:300]}")
    assert elapsed < 60
    assert "probe" in first and "weights file checksum mismatch" in first
    assert server.process is not None and server.process.poll() is not None


def test_model_stuck_loading_times_out_and_leaves_nothing_running(tmp_path: Path) -> None:
    """A load that never finishes (a hung mount, a deadlock) ends at the start timeout, not never."""
    repo = _python_model_repository(tmp_path, "time.sleep(3600)")
    server = TritonServer(repo, log_path=tmp_path / "stuck.log")
    started = time.perf_counter()
    with pytest.raises(TritonStartError, match="not ready after 15 s") as info:
        server.start(timeout_s=15)
    elapsed = time.perf_counter() - started
    print(f"stuck load: TritonStartError after {elapsed:.1f} s: {str(info.value).splitlines()[0][:200]}")
    assert elapsed < 15 + 35  # the timeout plus stop(): SIGTERM, then SIGKILL after 20 s
    assert server.process is not None and server.process.poll() is not None  # stubs went with it (killpg)


def test_missing_repository_fails_at_once(tmp_path: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(TritonStartError, match="does not exist"):
        TritonServer(tmp_path / "no-such-repository").start(timeout_s=120)
    assert time.perf_counter() - started < 5


def test_port_in_use_gives_a_clear_start_error(triton: object, cpu_repository: Path, tmp_path: Path) -> None:
    """A second server on the ports of a running one (a stale process) must say so, not hang."""
    server = TritonServer(
        cpu_repository,
        grpc_port=triton.grpc_port,  # type: ignore[attr-defined]
        log_path=tmp_path / "clash.log",
    )
    started = time.perf_counter()
    with pytest.raises(TritonStartError) as info, contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        server.start(timeout_s=120)
    print(f"port clash: {time.perf_counter() - started:.1f} s: {str(info.value).splitlines()[0][:300]}")
    assert time.perf_counter() - started < 90
    assert "already in use" in str(info.value).splitlines()[0]
