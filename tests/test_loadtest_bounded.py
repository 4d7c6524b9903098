"""A locust run that never ends is stopped within its budget, with its stacks, and nothing is left.

Real locust processes: one whose locustfile blocks in its init hook (the shape of the intermittent
hang seen once in CI), and a child that ignores SIGTERM for ``stop_process``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ctlesion_bench import loadtest

HUNG_LOCUSTFILE = '''
import time
from locust import User, events, task
from ctlesion_bench import stack_dumps
stack_dumps.install()

@events.init.add_listener
def _block(environment, **_):
    while True:
        time.sleep(0.2)  # never returns: locust never starts its users

class Idle(User):
    @task
    def nothing(self):
        pass
'''


def test_hung_locust_is_stopped_with_its_stacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locustfile = tmp_path / "hung_locustfile.py"
    locustfile.write_text(HUNG_LOCUSTFILE)
    monkeypatch.setattr(loadtest, "LOCUSTFILE", locustfile)
    monkeypatch.setattr(loadtest, "LOCUST_STARTUP_S", 8.0)
    cfg = loadtest.LoadtestConfig(users=1, run_time="1s", out=tmp_path / "lt", stop_timeout_s=0)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    t0 = time.monotonic()
    with pytest.raises(loadtest.LocustHung, match="budget") as err:
        loadtest.run_locust("127.0.0.1:1", cfg, tmp_path)
    assert time.monotonic() - t0 < 60
    log = (cfg.out / "locust.log").read_text()
    assert "Current thread" in log and "greenlet stacks" in log
    assert "_block" in log and "hung_locustfile.py" in log, log[-2000:]  # the greenlet dump
    assert "locust.log" in str(err.value)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not left, [(p.pid, p.status()) for p in left]  # reaped: no zombie either


def test_stop_process_kills_what_ignores_sigterm() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
    loadtest.stop_process(proc, grace_s=0.5)
    assert proc.returncode is not None and proc.returncode < 0
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE
