"""The soak's memory sampler and verdict: /proc readings of a real process tree, and the judgement."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctlesion_bench.loadtest import parse_duration_s
from ctlesion_bench.memory import (
    MIB,
    MemorySample,
    MemorySampler,
    growth_by_process,
    judge_soak,
    tree_memory,
    write_csv,
)


def _series(values_mib: list[float], step_s: float = 2.0) -> list[MemorySample]:
    return [
        MemorySample(t_s=i * step_s, processes=3, rss_bytes=int(v * MIB * 1.2), pss_bytes=int(v * MIB),
                     anon_bytes=int(v * MIB * 0.9), shmem_bytes=10 * MIB)  # fmt: skip
        for i, v in enumerate(values_mib)
    ]


def test_flat_memory_after_the_warm_up_passes() -> None:
    # a steep climb during the 30 s warm-up (the arena filling), then flat with noise
    values = [300 + 70 * i for i in range(15)] + [1300 + (7 if i % 3 == 0 else 0) for i in range(90)]
    v = judge_soak(_series(values), warmup_s=30, failures=0)
    assert v.passed, v.reason
    assert v.baseline_bytes == 1300 * MIB and abs(v.growth_bytes) < 8 * MIB
    assert abs(v.slope_mib_per_min) < 1.0


def test_growth_is_attributed_to_the_process_that_grew() -> None:
    samples = _series([1000.0] * 10 + [1100.0] * 10)
    for i, s in enumerate(samples):
        s.pss_by_process = {"tritonserver": 300 * MIB, "detector": (600 + (100 if i >= 10 else 0)) * MIB}
    assert growth_by_process(samples, warmup_s=0) == {"tritonserver": 0, "detector": 100 * MIB}


def test_steady_growth_fails_and_says_by_how_much() -> None:
    values = [1000 + 1.0 * i for i in range(120)]  # 1 MiB per 2 s sample = 30 MiB/min, 4 min
    v = judge_soak(_series(values), warmup_s=0, failures=0)
    assert not v.passed and "grew" in v.reason
    assert v.growth_bytes > v.allowed_bytes == int(0.1 * v.baseline_bytes) > 64 * MIB  # 10 % beats the floor
    assert v.slope_mib_per_min == pytest.approx(30.0, rel=0.01)


def test_the_floor_applies_to_small_servers() -> None:
    v = judge_soak(_series([200.0] * 20 + [250.0] * 20), warmup_s=0, failures=0)
    assert v.allowed_bytes == 64 * MIB and v.passed  # +50 MiB on 200 MiB: under the 64 MiB floor


def test_failed_requests_fail_the_soak_even_when_memory_is_flat() -> None:
    v = judge_soak(_series([500.0] * 30), warmup_s=0, failures=2)
    assert not v.passed and "2 failed requests" in v.reason


def test_too_short_a_measured_phase_is_no_verdict() -> None:
    v = judge_soak(_series([500.0] * 20), warmup_s=30, failures=0)
    assert not v.passed and "run longer" in v.reason


def test_one_spike_at_either_end_does_not_move_the_verdict() -> None:
    values = [900.0] + [500.0] * 40 + [900.0]
    v = judge_soak(_series(values), warmup_s=0, failures=0)
    assert v.passed and v.growth_bytes == 0


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("3m", 180), ("1h30m", 5400), ("2m30s", 150)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "3x", "m", "1m junk"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_s(text)


def test_sampler_reads_a_real_process_tree_and_sees_it_grow(tmp_path) -> None:  # noqa: ANN001
    # a parent with one child; the child allocates 200 MiB after a moment
    code = (
        "import subprocess, sys, time;"
        "c = subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(0.6); b = bytearray(200 * 2**20); time.sleep(30)']);"
        "time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)
        with MemorySampler(proc.pid, interval_s=0.1) as sampler:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                sampler.samples and sampler.samples[-1].anon_bytes > 200 * MIB
            ):
                time.sleep(0.1)
        samples = sampler.samples
    finally:
        subprocess.run(["pkill", "-P", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()
    assert samples[0].processes == 2
    assert samples[-1].anon_bytes - samples[0].anon_bytes > 190 * MIB
    assert all(s.pss_bytes <= s.rss_bytes for s in samples)
    assert [s.t_s for s in samples] == sorted(s.t_s for s in samples)
    assert set(samples[-1].pss_by_process) == {Path(sys.executable).name}  # parent and child: one label
    assert sum(samples[-1].pss_by_process.values()) == samples[-1].pss_bytes
    text = write_csv(samples, tmp_path / "memory.csv").read_text().splitlines()
    assert text[0].startswith("t_s,processes,rss_bytes,pss_bytes,anon_bytes,shmem_bytes,pss_")
    assert len(text) == len(samples) + 1


def test_a_gone_process_gives_no_sample() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert tree_memory(proc.pid) is None
