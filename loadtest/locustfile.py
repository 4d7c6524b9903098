"""Locust user that sends real DICOM slabs to the Triton ensemble over gRPC (tritonclient).

Non-HTTP client pattern from locust's docs / examples/grpc: gRPC is made gevent-cooperative with
``grpc.experimental.gevent.init_gevent()``, and every call fires ``events.request`` itself with its
timing, response length and exception. One request = one slab exactly as the client library sends
it (``LesionClient.prepare``: series ordered by position, slabs planned with the served model's k and
detector batch, halo slices included), as ``dicom`` BYTES [slab + halo]. ``response_length`` is the
number of slices in the slab, so "Average Content Size" in the reports is slices per request.

Configuration (environment, set by ``ctlesion loadtest``):
  CTLESION_SERIES_DIR   folder of one DICOM series (any file names: ordered by position, as the client does)
  CTLESION_SLAB_SIZE    owned slices per request (default: the client's, from the served model)
  CTLESION_MODEL        ensemble name (default lesion_detection)
  CTLESION_TIMEOUT_S    client timeout per request (default 120)
Host: ``--host grpc://127.0.0.1:8001`` (the scheme is optional).

    locust -f loadtest/locustfile.py --headless -u 4 -r 1 -t 60s --host grpc://127.0.0.1:8001 \
        --csv out/locust --html out/locust.html
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import gevent  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.stats import CSV_STATS_INTERVAL_SEC  # noqa: E402

from ctlesion_bench import stack_dumps  # noqa: E402

stack_dumps.install()  # ctlesion loadtest asks for stacks before it kills a hung run

MODEL = os.environ.get("CTLESION_MODEL", "lesion_detection")
SLAB_SIZE = int(os.environ["CTLESION_SLAB_SIZE"]) if os.environ.get("CTLESION_SLAB_SIZE") else None
TIMEOUT_S = float(os.environ.get("CTLESION_TIMEOUT_S", "120"))
_SLABS: list[list[bytes]] = []


def load_slabs(series_dir: Path, host: str, slab_size: int | None = None) -> list[list[bytes]]:
    """The requests the client library would send for this series to this server (its slabs, halo
    included); the short last slab is dropped when full ones exist, so every request has one shape."""
    from ctlesion_client import ClientOptions, LesionClient

    with LesionClient(host, ClientOptions(model_name=MODEL, slab_size=slab_size, client_timeout_s=TIMEOUT_S)) as client:
        prepared = client.prepare(series_dir)
    slabs = [prepared.slab_bytes(plan) for plan in prepared.plans]
    full = max(len(s) for s in slabs)
    return [s for s in slabs if len(s) == full] or slabs


@events.init.add_listener
def _on_init(environment: object, **_: object) -> None:
    series = os.environ.get("CTLESION_SERIES_DIR")
    if not series:
        raise SystemExit("set CTLESION_SERIES_DIR to a DICOM series folder (ctlesion loadtest does)")
    host = (getattr(environment, "host", None) or "127.0.0.1:8001").split("://", 1)[-1]
    _SLABS.extend(load_slabs(Path(series), host, SLAB_SIZE))


@events.test_stop.add_listener
def _on_test_stop(environment: object, **_: object) -> None:
    """Let the CSV writer record the final numbers before locust shuts down.

    Locust rewrites ``*_stats.csv`` from a greenlet every CSV_STATS_INTERVAL_SEC and closes the file
    at shutdown without a last write, so requests finished in the final second (or while users
    finish their slab during --stop-timeout) were missing from the CSV while the console summary
    and the HTML report had them. test_stop fires once all users have stopped.
    """
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)


class TritonSlabUser(User):
    """One user = one in-flight slab at a time, back to back (no think time)."""

    wait_time = constant(0)

    def __init__(self, environment: object) -> None:
        super().__init__(environment)
        host = (self.host or "127.0.0.1:8001").split("://", 1)[-1]
        self.client = grpcclient.InferenceServerClient(host)
        start = (id(self) // 16) % max(1, len(_SLABS))
        self.slabs = itertools.islice(itertools.cycle(_SLABS), start, None)

    @task
    def infer_slab(self) -> None:
        slab = next(self.slabs)
        tensor = grpcclient.InferInput("dicom", [len(slab)], "BYTES")
        tensor.set_data_from_numpy(np.array(slab, dtype=object))
        exception: BaseException | None = None
        t0 = time.perf_counter()
        try:
            self.client.infer(MODEL, [tensor], client_timeout=TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - reported to locust as a failure
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"{MODEL} slab[{len(slab)}]",
            response_time=(time.perf_counter() - t0) * 1000.0,
            response_length=len(slab),
            exception=exception,
            context={},
        )

    def on_stop(self) -> None:
        self.client.close()
