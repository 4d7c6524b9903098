"""``ctlesion loadtest``: a headless locust run against the Triton ensemble, with the server's own view.

    ctlesion loadtest --url 127.0.0.1:8001 --metrics-url http://127.0.0.1:8002/metrics \
        --users 4 --spawn-rate 1 --run-time 60s --out work/loadtest
    ctlesion loadtest --model-repository work/model_repository/cpu --users 4 ...   # starts its own server
    ctlesion loadtest --checkpoint models/ctlesion_damoyolo.pt ...                 # builds the repo too
    ctlesion loadtest --soak --warmup 30s --run-time 180s ...   # memory must stay flat after the warm-up

Writes to --out: locust_stats.csv, locust_stats_history.csv, locust_failures.csv,
locust_exceptions.csv, locust.html, loadtest.json, loadtest.md, and, when the server runs on this
machine, memory.csv / memory.png (the server's process tree sampled every --sample-interval).
With --soak, locust runs --warmup + --run-time and the exit code is the soak verdict: no failed
request, and the server's PSS grew less than max(--max-growth-mib, --max-growth-fraction x start)
from the start to the end of the measured phase.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ctlesion_bench import stack_dumps
from ctlesion_bench.common import (
    DEFAULT_CHECKPOINT,
    REPO_ROOT,
    Machine,
    build_cpu_repository,
    configure_logging,
    phantom_series_dir,
    write_json,
)
from ctlesion_bench.memory import MemorySample, MemorySampler, SoakVerdict, judge_soak, write_csv
from ctlesion_bench.metrics import ServerView, diff, format_view, scrape, scrape_settled, view_markdown

if TYPE_CHECKING:
    from ctlesion_client.server import TritonServer

log = logging.getLogger(__name__)
LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"


@dataclass
class LoadtestConfig:
    users: int = 4
    spawn_rate: float = 1.0
    run_time: str = "60s"
    slab_size: int | None = None  # owned slices per request; None: the client library's (served k and batch)
    series_dir: Path | None = None
    out: Path = Path("work/loadtest")
    # at the end of --run-time users finish the slab in flight (counted) instead of cancelling it,
    # which the server would count as failed requests (reason CANCELED)
    stop_timeout_s: int = 120
    warmup_s: float = 0.0  # soak: locust runs warmup + run_time; memory is judged after the warm-up


@dataclass
class ClientStats:
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    requests_per_s: float
    slices_per_s: float
    slices_per_request: float = float("nan")  # locust's Average Content Size: what the client library sent


@dataclass
class LoadtestResult:
    config: LoadtestConfig
    url: str
    client: ClientStats
    server: ServerView
    rss_before_bytes: int | None
    rss_after_bytes: int | None
    machine: Machine
    returncode: int
    reports: dict[str, str] = field(default_factory=dict)
    command: str = ""
    memory: list[MemorySample] = field(default_factory=list)
    soak: SoakVerdict | None = None


def parse_duration_s(text: str) -> float:
    """Locust's duration syntax: ``90``, ``90s``, ``3m``, ``1h30m``, ``2m30s``."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 3m, 1h30m)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _f(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return float("nan")


def read_stats(csv_path: Path, slab_size: int | None = None) -> ClientStats:
    """The ``Aggregated`` row of locust's ``*_stats.csv``; slices per request from its Average Content
    Size (the locust user reports each slab's slice count as its response length)."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    agg = next((r for r in rows if r.get("Name") == "Aggregated"), rows[-1] if rows else {})
    rps = _f(agg, "Requests/s")
    per_request = _f(agg, "Average Content Size")
    if per_request != per_request and slab_size:  # NaN: an old CSV without it
        per_request = float(slab_size)
    return ClientStats(
        requests=int(_f(agg, "Request Count") or 0),
        failures=int(_f(agg, "Failure Count") or 0),
        p50_ms=_f(agg, "50%"),
        p95_ms=_f(agg, "95%"),
        p99_ms=_f(agg, "99%"),
        mean_ms=round(_f(agg, "Average Response Time"), 2),
        requests_per_s=round(rps, 3),
        slices_per_s=round(rps * per_request, 2),
        slices_per_request=round(per_request, 2),
    )


def run_locust(url: str, cfg: LoadtestConfig, series_dir: Path) -> int:
    cfg.out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--users", str(cfg.users), "--spawn-rate", str(cfg.spawn_rate),
        "--run-time", f"{cfg.warmup_s + parse_duration_s(cfg.run_time):g}s",
        "--host", f"grpc://{url}", "--csv", str(cfg.out / "locust"), "--csv-full-history",
        "--html", str(cfg.out / "locust.html"), "--only-summary", "--stop-timeout", str(cfg.stop_timeout_s),
        "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]  # fmt: skip
    env = dict(os.environ, CTLESION_SERIES_DIR=str(series_dir), CTLESION_SLAB_SIZE=str(cfg.slab_size or ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    log.info("locust: %s", " ".join(cmd))
    budget_s = cfg.warmup_s + parse_duration_s(cfg.run_time) + cfg.stop_timeout_s + LOCUST_STARTUP_S
    log_path = cfg.out / "locust.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # the locustfile writes its stacks to locust.log
                for sig in (stack_dumps.THREAD_SIGNAL, stack_dumps.GREENLET_SIGNAL):
                    proc.send_signal(sig)
                    time.sleep(1.0)
            raise LocustHung(f"locust ran past its {budget_s:.0f} s budget and was stopped; its stacks and "
                             f"output: {log_path}\n{_tail(log_path)}") from None  # fmt: skip
        finally:
            stop_process(proc)


LOCUST_STARTUP_S = 90.0  # reading the series and planning slabs before the run; then locust's own exit


class LocustHung(RuntimeError):
    """locust did not exit within run time + stop timeout + start-up allowance."""


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; always reaped, so no zombie is left for the caller."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class LocalProcess:
    """A server given by --url that listens on this machine: its RSS is readable here (psutil)."""

    pid: int

    @classmethod
    def listening_on(cls, url: str) -> LocalProcess | None:
        try:
            import psutil
        except ImportError:  # the `load` extra is not installed
            return None
        host, _, port = url.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "0.0.0.0", "::1", "[::1]") or not port.isdigit():
            return None
        with contextlib.suppress(psutil.Error, OSError):
            for conn in psutil.net_connections("tcp"):
                if (
                    conn.status == psutil.CONN_LISTEN
                    and conn.laddr
                    and conn.laddr.port == int(port)
                    and conn.pid
                ):
                    return cls(conn.pid)
        return None

    def rss_bytes(self) -> int | None:
        """RSS of the process and its children (the Python-backend stubs)."""
        import psutil

        try:
            proc = psutil.Process(self.pid)
            return sum(p.memory_info().rss for p in (proc, *proc.children(recursive=True)))
        except psutil.Error:
            return None


def server_pid(server: TritonServer | LocalProcess | None) -> int | None:
    if isinstance(server, LocalProcess):
        return server.pid
    process = getattr(server, "process", None)
    return process.pid if process is not None else None


@contextlib.contextmanager
def serving(
    args: argparse.Namespace, work: Path
) -> Iterator[tuple[str, str | None, TritonServer | LocalProcess | None]]:
    """(grpc url, metrics url, process whose RSS is read): the given --url, or a server started here."""
    if args.url:
        yield args.url, args.metrics_url, LocalProcess.listening_on(args.url)
        return
    from ctlesion_client.server import TritonServer

    repo = args.model_repository
    if repo is None:
        repo = build_cpu_repository(args.checkpoint, work / "artifacts").repository
    server = TritonServer(Path(repo), log_path=args.out / "tritonserver.log")
    with server:
        yield server.grpc_url, server.metrics_url, server


def markdown(res: LoadtestResult) -> str:
    c, cfg = res.client, res.config
    mib = lambda b: f"{b / 2**20:.0f} MiB" if b else "n/a"  # noqa: E731
    lines = [
        f"# Load test: {cfg.users} users, spawn {cfg.spawn_rate}/s, {cfg.run_time}, "
        f"slab {cfg.slab_size or 'as the client library plans it'} ({c.slices_per_request:.1f} slices per request)",
        "",
        f"Client machine: {res.machine.cpu_model}, {res.machine.cores} cores, {res.machine.date_utc} (load average "
        f"{res.machine.loadavg_1m:.2f} at the start); server {res.url}"
        + (" (started here, on the same cores)" if res.rss_before_bytes is not None else ""),
        "",
        "| requests | failures | p50 ms | p95 ms | p99 ms | mean ms | req/s | slices/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {c.requests} | {c.failures} | {c.p50_ms:.0f} | {c.p95_ms:.0f} | {c.p99_ms:.0f} | {c.mean_ms:.0f} | "
        f"{c.requests_per_s:.2f} | {c.slices_per_s:.1f} |",
        "",
        f"Server RSS before / after: {mib(res.rss_before_bytes)} / {mib(res.rss_after_bytes)}",
        "",
    ]
    if res.soak is not None:
        v = res.soak
        lines += [
            f"Soak: **{'PASS' if v.passed else 'FAIL'}** ({v.reason}). Warm-up {v.warmup_s:.0f} s, then "
            f"{v.measured_s:.0f} s measured ({v.samples} samples): server PSS {mib(v.baseline_bytes)} at the start, "
            f"{mib(v.end_bytes)} at the end ({v.growth_bytes / 2**20:+.1f} MiB; allowed "
            f"< {v.allowed_bytes / 2**20:.0f} MiB), slope {v.slope_mib_per_min:+.2f} MiB/min.",
            "",
        ]
        if v.growth_by_process:
            lines += [
                "PSS change over the measured phase, by process: "
                + ", ".join(f"{k} {b / 2**20:+.1f} MiB" for k, b in sorted(v.growth_by_process.items())),
                "",
            ]
        if res.memory:
            first, last = res.memory[0], res.memory[-1]
            lines += [
                "| memory of the server's process tree | first sample | last sample |",
                "|---|---:|---:|",
                f"| PSS sum (judged) | {mib(first.pss_bytes)} | {mib(last.pss_bytes)} |",
                f"| RSS sum (shared pages once per process) | {mib(first.rss_bytes)} | {mib(last.rss_bytes)} |",
                f"| private anonymous | {mib(first.anon_bytes)} | {mib(last.anon_bytes)} |",
                f"| shared region (/dev/shm) | {mib(first.shmem_bytes)} | {mib(last.shmem_bytes)} |",
                "",
            ]
    lines += [
        "Server's own view (Triton metrics, before -> after the run; times in ms per request, "
        "avg batch = inferences / executions):",
        "",
        *view_markdown(res.server),
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> LoadtestResult:
    cfg = LoadtestConfig(
        args.users,
        args.spawn_rate,
        args.run_time,
        args.slab_size,
        args.series_dir,
        args.out,
        args.stop_timeout,
        parse_duration_s(args.warmup) if args.soak else 0.0,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out  # the built repository (if any) is kept in --out/artifacts
    series = cfg.series_dir or phantom_series_dir(args.out / "data", max((cfg.slab_size or 30) * 4, 128))
    with serving(args, work) as (url, metrics_url, server):
        rss_before = server.rss_bytes() if server is not None else None
        before = scrape(metrics_url) if metrics_url else {}
        pid = server_pid(server)
        if args.soak and pid is None:
            raise RuntimeError(f"--soak needs the server's memory: {url} is not a process on this machine")
        sampler = MemorySampler(pid, args.sample_interval).start() if pid is not None else None
        try:
            rc = run_locust(url, cfg, series)
        finally:
            samples = sampler.stop() if sampler is not None else []
        after = scrape_settled(metrics_url) if metrics_url else {}
        rss_after = server.rss_bytes() if server is not None else None
    stats_csv = args.out / "locust_stats.csv"
    if not stats_csv.exists():
        raise RuntimeError(f"locust wrote no {stats_csv} (exit {rc}); see {args.out / 'locust.log'}")
    reports = {p.name: str(p) for p in sorted(args.out.glob("locust*"))}
    client = read_stats(stats_csv, cfg.slab_size)
    soak = None
    if args.soak:
        soak = judge_soak(samples, cfg.warmup_s, client.failures, floor_bytes=int(args.max_growth_mib * 2**20),
                          fraction=args.max_growth_fraction)  # fmt: skip
    if samples:
        from ctlesion_bench.plots import memory_plot

        reports["memory.csv"] = str(write_csv(samples, args.out / "memory.csv"))
        reports["memory.png"] = str(memory_plot(samples, args.out / "memory.png", cfg.warmup_s or None, soak,
                                                args.out / "locust_stats_history.csv", sampler.t0_unix))  # fmt: skip
    return LoadtestResult(cfg, url, client, diff(before, after), rss_before, rss_after, Machine.here(), rc,
                          reports, memory=samples, soak=soak)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctlesion loadtest", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", help="gRPC HOST:PORT of a running server (else one is started here)")
    src.add_argument("--model-repository", type=Path, help="start tritonserver on this repository")
    p.add_argument(
        "--metrics-url", help="Prometheus endpoint of the --url server, e.g. http://HOST:8002/metrics"
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=DEFAULT_CHECKPOINT,
        help="used when neither --url nor --model-repository",
    )
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--spawn-rate", type=float, default=1.0)
    p.add_argument("--run-time", default="60s", help="locust duration, e.g. 60s, 5m")
    p.add_argument("--slab-size", type=int, default=None,
                   help="owned slices per request (default: the client library's, from the served model)")
    p.add_argument("--series-dir", type=Path, help="DICOM series to send (default: a generated phantom)")
    p.add_argument(
        "--stop-timeout",
        type=int,
        default=120,
        help="seconds users get to finish the slab in flight at the end",
    )
    p.add_argument("--soak", action="store_true",
                   help="judge memory: exit 1 unless it stays flat after --warmup and nothing failed")  # fmt: skip
    p.add_argument("--warmup", default="30s", help="--soak: load before the measured phase (locust duration)")
    p.add_argument("--sample-interval", type=float, default=2.0, help="seconds between memory samples")
    p.add_argument("--max-growth-mib", type=float, default=64.0, help="--soak: allowed PSS growth floor")
    p.add_argument("--max-growth-fraction", type=float, default=0.10,
                   help="--soak: allowed PSS growth as a fraction of the start (the larger of the two)")  # fmt: skip
    p.add_argument("--out", type=Path, default=REPO_ROOT / "work" / "loadtest")
    p.add_argument(
        "--results-md",
        default="",
        help="also record the run in this results file, e.g. bench/RESULTS.md (default: do not)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from ctlesion_client.server import sigterm_as_interrupt

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.url and not args.metrics_url:
        host = args.url.rsplit(":", 1)[0]
        args.metrics_url = f"http://{host}:8002/metrics"
    sigterm_as_interrupt()  # a killed load test takes its tritonserver and locust down with it
    try:
        res = run(args)
    except KeyboardInterrupt:
        print("load test interrupted: server and locust stopped", file=sys.stderr)
        return 130
    res.command = "ctlesion loadtest " + shlex.join(argv)
    write_json(args.out / "loadtest.json", res)
    (args.out / "loadtest.md").write_text(markdown(res))
    if args.results_md:
        from ctlesion_bench.report import replace_section

        body = markdown(res).replace(
            "# Load test:", "## Load test (latest recorded `ctlesion loadtest` run):", 1
        )
        replace_section(Path(args.results_md), "loadtest:cpu", f"{body}\nCommand: `{res.command}`\n")
    c = res.client
    print(f"locust: {c.requests} requests, {c.failures} failures; latency p50 {c.p50_ms:.0f} ms, p95 {c.p95_ms:.0f} ms, "
          f"p99 {c.p99_ms:.0f} ms; {c.requests_per_s:.2f} req/s = {c.slices_per_s:.1f} slices/s")  # fmt: skip
    print(format_view(res.server))
    if res.rss_before_bytes is not None:
        print(
            f"server RSS: {res.rss_before_bytes / 2**20:.0f} MiB before, {(res.rss_after_bytes or 0) / 2**20:.0f} MiB after"
        )
    if res.soak is not None:
        v = res.soak
        print(f"soak: {'PASS' if v.passed else 'FAIL'} ({v.reason}); server PSS {v.baseline_bytes / 2**20:.0f} -> "
              f"{v.end_bytes / 2**20:.0f} MiB over {v.measured_s:.0f} s after a {v.warmup_s:.0f} s warm-up "
              f"({v.growth_bytes / 2**20:+.1f} MiB, allowed < {v.allowed_bytes / 2**20:.0f} MiB; "
              f"slope {v.slope_mib_per_min:+.2f} MiB/min)")  # fmt: skip
        if v.growth_by_process:
            print("  by process: " + ", ".join(f"{k} {b / 2**20:+.1f} MiB" for k, b in sorted(v.growth_by_process.items())))
    print(
        f"reports: {args.out}/locust_stats.csv, {args.out}/locust.html, {args.out}/loadtest.json, {args.out}/loadtest.md"
        + (f", {args.out}/memory.png" if res.memory else "")
    )
    ok = c.failures == 0 and res.returncode == 0
    return 0 if ok and (res.soak is None or res.soak.passed) else 1


if __name__ == "__main__":
    raise SystemExit(main())
