"""Server memory over many requests (good and bad mixed): measured and reported, loosely bounded.

RSS is the sum over tritonserver and its Python stub processes (``TritonServer.rss_bytes``). The
figure goes to stdout (run with ``-s``), to the JUnit properties and, when ``RELIABILITY_OUT`` is
set, to ``$RELIABILITY_OUT/memory.json`` for docs/reliability.md. The bound only catches a gross
leak (a slab kept per request); allocator caches and shm pools make small growth normal.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from bad_dicom_corpus import build_cases, good_series
from tritonclient.utils import InferenceServerException

pytestmark = [pytest.mark.triton, pytest.mark.slow]

ROUNDS = int(os.environ.get("RELIABILITY_ROUNDS", "20"))
MIB = 1024 * 1024


def _send(client: grpcclient.InferenceServerClient, items: list[bytes]) -> bool:
    tensor = grpcclient.InferInput("dicom", [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(len(items)))
    try:
        client.infer("lesion_detection", [tensor], client_timeout=120)
        return True
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.INVALID_ARGUMENT", exc.message()
        return False


def test_server_rss_before_and_after_many_requests(triton: object, record_property: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # cases refused for their per-request window need that input, which _send does not send
        bad = [c for c in build_cases() if c.limits is None and c.window is None]
    good = good_series(z=8, size=256)
    client = grpcclient.InferenceServerClient(triton.grpc_url)  # type: ignore[attr-defined]
    for _ in range(3):  # warm-up: shm pools, ORT arenas and the batcher reach their working size
        assert _send(client, good)
    before = triton.rss_bytes()  # type: ignore[attr-defined]
    started = time.perf_counter()
    ok = refused = 0
    for _ in range(ROUNDS):
        ok += _send(client, good)
        for case in bad:
            refused += not _send(client, case.items)
    elapsed = time.perf_counter() - started
    after = triton.rss_bytes()  # type: ignore[attr-defined]
    client.close()
    figures = {
        "requests": ok + refused,
        "good_ok": ok,
        "bad_refused": refused,
        "failures": ROUNDS * (1 + len(bad)) - ok - refused,
        "rss_before_mib": round(before / MIB, 1),
        "rss_after_mib": round(after / MIB, 1),
        "growth_mib": round((after - before) / MIB, 1),
        "seconds": round(elapsed, 1),
    }
    print(f"memory: {figures}")
    for key, value in figures.items():
        record_property(key, value)  # type: ignore[operator]
    if os.environ.get("RELIABILITY_OUT"):
        out = Path(os.environ["RELIABILITY_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory.json").write_text(json.dumps(figures, indent=2) + "\n")
    assert before > 0 and ok == ROUNDS and refused == ROUNDS * len(bad)
    assert after < 2 * before + 512 * MIB, figures  # gross leaks only
    assert triton.is_ready()  # type: ignore[attr-defined]
