"""Under make test / CI a skip for a missing real part fails; GPU and TensorRT skips stay skips."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from real_parts import STRICT_ENV

TESTS = Path(__file__).resolve().parent

PROBE = '''
import pytest

def test_missing_server():
    pytest.skip("tritonserver binary not found")

@pytest.mark.gpu
def test_needs_cuda():
    pytest.skip("no CUDA device visible to torch")

def test_needs_tensorrt():
    pytest.skip("needs TensorRT 10 and an NVIDIA GPU")

def test_passes():
    assert True
'''
PROBE_MODULE_SKIP = 'import pytest\npytest.importorskip("no_such_module_for_ctlesion")\n\ndef test_x():\n    pass\n'


def _run(tmp_path: Path, strict: bool, probe: str = PROBE) -> dict[str, int]:
    (tmp_path / "test_probe.py").write_text(probe)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: probe\n")
    env = {k: v for k, v in os.environ.items() if k not in (STRICT_ENV, "CI")}
    env["PYTHONPATH"] = str(TESTS)
    if strict:
        env[STRICT_ENV] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "real_parts", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"),
         "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    tail = proc.stdout.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (failed|passed|skipped|errors?)", tail)}
    return counts | {"rc": proc.returncode}


def test_missing_real_part_fails_under_make_test(tmp_path: Path) -> None:
    counts = _run(tmp_path, strict=True)
    # the missing server fails; the CUDA and TensorRT skips stand
    assert counts.get("failed") == 1 and counts.get("skipped") == 2 and counts.get("passed") == 1, counts
    assert counts["rc"] == 1, counts


def test_module_that_cannot_import_its_real_part_fails_under_make_test(tmp_path: Path) -> None:
    assert _run(tmp_path, strict=True, probe=PROBE_MODULE_SKIP).get("error") == 1
    assert _run(tmp_path, strict=False, probe=PROBE_MODULE_SKIP).get("skipped") == 1


def test_missing_real_part_skips_on_a_developer_machine(tmp_path: Path) -> None:
    counts = _run(tmp_path, strict=False)
    assert counts.get("skipped") == 3 and counts.get("passed") == 1 and counts["rc"] == 0, counts
