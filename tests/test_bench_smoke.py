"""Smoke runs of the benchmark harness and the locust load test (real tritonserver, tiny sizes).

No timing is asserted: only that the reports exist, carry the expected columns and saw no failures.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_METRICS_BEFORE = """# TYPE nv_inference_request_success counter
nv_inference_request_success{model="detector",version="1"} 2
nv_inference_request_failure{model="detector",reason="BACKEND",version="1"} 0
nv_inference_count{model="detector",version="1"} 32
nv_inference_exec_count{model="detector",version="1"} 2
nv_inference_queue_duration_us{model="detector",version="1"} 1000
nv_inference_compute_infer_duration_us{model="detector",version="1"} 200000
nv_gpu_utilization{gpu_uuid="x"} 0
"""
# 4 more slab requests of 16 slices merged pairwise into 2 executions of 32 rows, 100 ms each: Triton
# charges each request its execution's whole compute time (4 x 100 ms), and one request failed.
_METRICS_AFTER = """nv_inference_request_success{model="detector",version="1"} 6
nv_inference_request_failure{model="detector",reason="BACKEND",version="1"} 1
nv_inference_request_failure{model="detector",reason="REJECTED",version="1"} 0
nv_inference_count{model="detector",version="1"} 96
nv_inference_exec_count{model="detector",version="1"} 4
nv_inference_queue_duration_us{model="detector",version="1"} 9000
nv_inference_compute_infer_duration_us{model="detector",version="1"} 600000
"""


def test_metrics_diff_reads_batching_from_counters() -> None:
    from ctlesion_bench.metrics import diff, format_view, parse_metrics

    view = diff(parse_metrics(_METRICS_BEFORE), parse_metrics(_METRICS_AFTER))
    det = view.model("detector")
    assert view.reachable and det is not None
    assert (det.requests, det.failures, det.inferences, det.executions) == (4, 1, 64, 2)
    assert det.avg_batch == 32 and det.requests_per_exec == 2
    assert det.queue_ms == 2.0 and det.compute_infer_ms == 100.0
    assert "avg batch" in format_view(view)
    assert not diff({}, {}).reachable


@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctlesion_bench.common import phantom_series_dir

    return phantom_series_dir(tmp_path_factory.mktemp("bench-data"), 4)


@pytest.mark.slow
@pytest.mark.triton
def test_metrics_parser_reads_triton_counters(triton: object) -> None:
    from ctlesion_bench.metrics import diff, scrape

    snap = scrape(triton.metrics_url)  # type: ignore[attr-defined]
    assert "nv_inference_exec_count" in snap and "lesion_detection" in snap["nv_inference_request_success"]
    assert diff(snap, snap).reachable


@pytest.mark.slow
@pytest.mark.triton
def test_locust_headless_against_real_server(triton: object, small_series: Path, tmp_path: Path) -> None:
    from ctlesion_bench.loadtest import main

    out = tmp_path / "loadtest"
    rc = main(["--url", triton.grpc_url, "--metrics-url", triton.metrics_url,  # type: ignore[attr-defined]
               "--users", "1", "--spawn-rate", "1", "--run-time", "4s", "--slab-size", "4",
               "--series-dir", str(small_series), "--out", str(out),
               "--results-md", str(tmp_path / "RESULTS.md"),
               # the soak machinery end to end; a few seconds judge nothing, hence the loose bound
               "--soak", "--warmup", "2s", "--sample-interval", "0.5", "--max-growth-mib", "4096"])  # fmt: skip
    with open(out / "locust_stats.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for column in ("Request Count", "Failure Count", "50%", "95%", "99%", "Requests/s"):
        assert column in rows[0], column
    agg = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(agg["Request Count"]) >= 1 and int(agg["Failure Count"]) == 0
    assert (out / "locust.html").stat().st_size > 0
    data = json.loads((out / "loadtest.json").read_text())
    assert data["client"]["failures"] == 0 and data["server"]["reachable"]
    ensemble = next(m for m in data["server"]["models"] if m["model"] == "lesion_detection")
    assert ensemble["requests"] == data["client"]["requests"]  # locust's CSV and the server agree
    detector = next(m for m in data["server"]["models"] if m["model"] == "detector")
    assert detector["executions"] >= 1 and detector["avg_batch"] >= 1 and detector["failures"] == 0
    assert data["rss_before_bytes"] > 0 and data["rss_after_bytes"] > 0  # --url on loopback: read via psutil
    assert "avg batch" in (out / "loadtest.md").read_text()
    soak = data["soak"]
    assert soak["passed"] and soak["samples"] >= 6 and soak["failures"] == 0, soak
    assert 0 < soak["baseline_bytes"] <= data["memory"][-1]["rss_bytes"]
    assert data["memory"][0]["processes"] >= 4  # tritonserver and the Python-backend stubs
    assert (out / "memory.png").stat().st_size > 0 and (out / "memory.csv").exists()
    assert "Soak: **PASS**" in (out / "loadtest.md").read_text()
    recorded = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- loadtest:cpu:begin -->" in recorded and "ctlesion loadtest --url" in recorded
    assert rc == 0


@pytest.mark.slow
@pytest.mark.triton
def test_killed_load_test_leaves_no_server_or_locust_behind(cpu_repository: Path, small_series: Path,
                                                            tmp_path: Path) -> None:  # fmt: skip
    """SIGTERM (a CI timeout, kill, docker stop) mid-run: tritonserver, its stubs and locust all go."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    cmd = [sys.executable, "-m", "ctlesion_bench.loadtest", "--model-repository", str(cpu_repository),
           "--users", "1", "--spawn-rate", "1", "--run-time", "120s", "--slab-size", "4",
           "--series-dir", str(small_series), "--out", str(tmp_path / "lt"), "--results-md", ""]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def described(p: psutil.Process) -> str:
            # a child that has just exited (a start-up probe) is a zombie until reaped: skip it
            try:
                return p.name() + " " + " ".join(p.cmdline())
            except psutil.Error:
                return ""

        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 240
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and proc.poll() is None:
            children = parent.children(recursive=True)
            if any("locust" in described(c) for c in children):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"locust never started (loadtest exit {proc.poll()})")
        names = {described(c) for c in children}
        assert any("tritonserver" in n for n in names), names
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 130
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
@pytest.mark.triton
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
    assert all(e["failures"] == 0 and e["detector_avg_batch"] >= 1 for e in data["ensemble"])
    assert data["naive"]["slices"] == 4 and data["int8"][0]["batch"] == 1
    assert data["ratios"]["serving_over_detector"] is not None and data["server_rss_end_bytes"] > 0
    # the second sweep served the INT8 model the bench quantized, from its own repository
    assert [e["concurrency"] for e in data["ensemble_int8"]] == [1, 2]
    assert all(e["failures"] == 0 for e in data["ensemble_int8"])
    assert data["ratios"]["int8_serving_over_naive"] > 0
    served = (out / "artifacts" / "repository" / "cpu-int8" / "detector" / "1" / "model.onnx").read_bytes()
    assert served == (out / "artifacts" / "detector_int8.onnx").read_bytes()
    assert "INT8 (QDQ) detector" in (out / "bench.md").read_text()
    for name in ("bench.md", "latency.png", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    text = results.read_text()
    assert "ctlesion bench" in text and "No GPU figures were measured" in text


def test_results_sections_are_replaced_in_place(tmp_path: Path) -> None:
    from ctlesion_bench.report import replace_section

    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nintro\n\n## GPU\n\nno GPU\n")
    replace_section(path, "loadtest:cpu", "first")
    replace_section(path, "loadtest:cpu", "second")
    text = path.read_text()
    assert text.count("<!-- loadtest:cpu:begin -->") == 1 and "second" in text and "first" not in text
    assert text.index("second") < text.index("## GPU") and text.startswith("# Benchmark results\n\nintro")
    fresh = replace_section(tmp_path / "new" / "RESULTS.md", "bench:cpu", "body").read_text()
    assert "body" in fresh and "No GPU figures were measured" in fresh


def test_ort_memory_bench_runs_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    import damoyolo
    from ctlesion_bench.bench_ort_memory import CONFIGS, MEMORY_SEQUENCE, main
    from ctlesion_export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = damoyolo.build_model("Ns", num_classes=1, in_channels=3).eval()
    model.fuse()
    onnx = export_onnx(model, tmp_path / "ns64.onnx", size=64, in_channels=3)
    assert main(["--onnx", str(onnx), "--batches", "4", "--rounds", "1", "--threads", "1",
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    data = json.loads((tmp_path / "out" / "ort_memory.json").read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert set(rows) == set(CONFIGS) and rows["arena+pattern"]["time_ratio"] == 1.0
    assert rows["arena, runs<=8"]["max_run_batch"] == 8
    for r in rows.values():
        assert len(r["rss_mib_after_each"]) == len(MEMORY_SEQUENCE) and min(r["rss_mib_after_each"]) > 0
        assert r["time_ratio"] > 0
    assert "time ratio" in capsys.readouterr().out


def test_bench_preprocess_prints_every_stage_and_the_ratios(tmp_path: Path) -> None:
    from ctlesion_bench import bench_preprocess

    result = bench_preprocess.run(4, 1, 128)
    assert {"parse (pydicom dcmread)", "preprocess_slab total, uint8, physical (served)", "preprocess_slab total, uint8, native grid",
            "postprocess_findings -> tensors (served)"} <= set(result.ms_per_slice)
    assert result.preprocess_ms == result.ms_per_slice["preprocess_slab total, uint8, physical (served)"]
    assert all(v >= 0 for v in result.ms_per_slice.values())
    assert result.preprocess_ratio == result.preprocess_ms / result.parse_ms
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Preprocess and postprocess per slice\n\nold\n\n## GPU\n\nkept\n")
    bench_preprocess.main(["--slices", "4", "--repeat", "1", "--size", "128", "--results", str(md)])
    text = md.read_text()
    assert "old" not in text and "kept" in text and "x parse" in text and text.count("## Preprocess and postprocess") == 1


def test_bench_preprocess_headline_is_the_committed_detectors_scale() -> None:
    """The headline total is the path build-repo serves: the scale the released checkpoint records."""
    from ctlesion_bench import bench_preprocess

    # the bench labels the physical-scale total "served": true only while the release records a scale
    scale = bench_preprocess.served_scale(REPO / "models" / "ctlesion_damoyolo.pt")
    assert scale["pixel_mm"] is not None and scale["pixel_mm"] > 0 and scale["context_mm"] is not None and scale["context_mm"] > 0


@pytest.mark.slow
@pytest.mark.triton
def test_series_bench_tiny_run(cpu_repository: Path, small_series: Path, tmp_path: Path) -> None:
    from ctlesion_bench import series_bench

    md = tmp_path / "RESULTS.md"
    assert series_bench.main(["--model-repository", str(cpu_repository), "--series-dir", str(small_series), "--repeat", "1",
                              "--detector-repeat", "1", "--out", str(tmp_path / "out"), "--results", str(md)]) == 0
    data = json.loads((tmp_path / "out" / "series_bench.json").read_text())
    assert data["k"] == 3 and data["max_batch_size"] == 32 and len(data["runs"]) == 1
    assert data["runs"][0]["server_cpu_s"] > 0
    by = data["runs"][0]["server_cpu_by_process"]  # every step's stub and the server itself, by name
    assert {"tritonserver", "preprocess stub", "detector stub", "postprocess stub"} <= set(by), by
    assert by["detector stub"] > 0 and abs(sum(by.values()) - data["runs"][0]["server_cpu_s"]) < 0.05
    assert "## Series throughput through the client library" in md.read_text()
    assert "| detector stub |" in md.read_text()


def test_bench_preprocess_runs_on_a_served_series(small_series: Path, tmp_path: Path) -> None:
    """--series-dir: the stages on a real series' matrix, pixel size and spacing, in its own section."""
    from ctlesion_bench import bench_preprocess

    items = bench_preprocess.series_items(small_series, 3)
    assert len(items) == 3
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Preprocess and postprocess per slice\n\nsynthetic kept\n")
    bench_preprocess.main(["--slices", "3", "--repeat", "1", "--series-dir", str(small_series), "--results", str(md),
                           "--json", str(tmp_path / "p.json")])  # fmt: skip
    text = md.read_text()
    assert "synthetic kept" in text and "## Preprocess and postprocess per slice, on a served series" in text
    assert str(small_series) in text and "mm pixels (sparse)" in text
    assert json.loads((tmp_path / "p.json").read_text())["args"]["series_dir"] == str(small_series)
