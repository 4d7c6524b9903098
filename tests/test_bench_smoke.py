"""Smoke runs of the benchmark harness and the locust load test (real tritonserver, tiny sizes).

No timing is asserted: only that the reports exist, carry the expected columns and saw no failures.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.triton]


@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctlesion_bench.common import phantom_series_dir

    return phantom_series_dir(tmp_path_factory.mktemp("bench-data"), 4)


def test_metrics_parser_reads_triton_counters(triton: object) -> None:
    from ctlesion_bench.metrics import diff, scrape

    snap = scrape(triton.metrics_url)  # type: ignore[attr-defined]
    assert "nv_inference_exec_count" in snap and "lesion_detection" in snap["nv_inference_request_success"]
    assert diff(snap, snap).reachable


def test_locust_headless_against_real_server(triton: object, small_series: Path, tmp_path: Path) -> None:
    from ctlesion_bench.loadtest import main

    out = tmp_path / "loadtest"
    rc = main(["--url", triton.grpc_url, "--metrics-url", triton.metrics_url,  # type: ignore[attr-defined]
               "--users", "1", "--spawn-rate", "1", "--run-time", "4s", "--slab-size", "4",
               "--series-dir", str(small_series), "--out", str(out)])  # fmt: skip
    with open(out / "locust_stats.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for column in ("Request Count", "Failure Count", "50%", "95%", "99%", "Requests/s"):
        assert column in rows[0], column
    agg = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(agg["Request Count"]) >= 1 and int(agg["Failure Count"]) == 0
    assert (out / "locust.html").stat().st_size > 0
    data = json.loads((out / "loadtest.json").read_text())
    assert data["client"]["failures"] == 0 and data["server"]["reachable"]
    detector = next(m for m in data["server"]["models"] if m["model"] == "detector")
    assert detector["executions"] >= 1 and detector["avg_batch"] >= 1
    assert rc == 0


def test_bench_tiny_run(detector_onnx: Path, small_series: Path, tmp_path: Path) -> None:
    from ctlesion_bench.bench import main

    out = tmp_path / "bench"
    results = tmp_path / "RESULTS.md"
    rc = main(["--onnx", str(detector_onnx), "--series-dir", str(small_series), "--out", str(out),
               "--slab-size", "4", "--batches", "1", "2", "--int8-batches", "1", "--concurrency", "1", "2",
               "--repeat", "1", "--requests-per-worker", "1", "--results-md", str(results)])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    assert [d["batch"] for d in data["detector"]] == [1, 2]
    assert [e["concurrency"] for e in data["ensemble"]] == [1, 2]
    assert all(e["failures"] == 0 for e in data["ensemble"])
    assert data["naive"]["slices"] == 4 and data["int8"][0]["batch"] == 1
    assert data["ratios"]["serving_over_detector"] is not None and data["server_rss_end_bytes"] > 0
    for name in ("bench.md", "latency.png", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    text = results.read_text()
    assert "ctlesion bench" in text and "No GPU figures were measured" in text
