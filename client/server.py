"""Start and stop the real ``tritonserver`` binary on loopback.

The binary comes from the ``nvidia-pytriton`` wheel (no Docker here). Its Python-backend stub is
linked against ``libcudart`` through a path relative to the wheel, so the stub for the running
Python version is copied *inside* the wheel's ``backends/python`` folder, where that relative path
resolves. The stub embeds the Python found first on ``PATH``; putting this interpreter's ``bin``
first makes the Python models see this environment's packages (numpy < 2, onnxruntime, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


# Error-level lines that every CPU-only start prints (no GPU, no NVML / DCGM): not the cause of anything.
_HARMLESS_ON_CPU = (
    "CudaDriverHelper has not been initialized",
    "unable to create stream",
    "CUDA driver version is insufficient",
    "NVML",
    "DCGM",
)


class TritonStartError(RuntimeError):
    """The server exited or did not become ready; the message carries the tail of its log."""


def pytriton_home() -> Path:
    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - setup installs it
        raise TritonStartError(
            "tritonserver is not installed: run `make setup` (installs nvidia-pytriton)"
        ) from exc
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def ensure_python_stub(home: Path | None = None) -> Path:
    """Copy the Python-backend stub for this interpreter next to libtriton_python.so (idempotent)."""
    home = home or pytriton_home()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = home / "backends" / "python" / "triton_python_backend_stub"
    if not source.exists():
        raise TritonStartError(f"no Python backend stub for Python {version} in {source.parent.parent}")
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        shutil.copy2(source, target)
    return target


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TritonServer:
    """A tritonserver process serving ``model_repository`` on free loopback ports.

    Use as a context manager; ``stop()`` always runs, also when start-up fails.
    """

    model_repository: Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    log_path: Path | None = None
    # The Python stubs exchange tensors through /dev/shm; slabs of 512x512 slices need more than
    # the 1 MB default, and growing in 1 MB steps costs time on every large request.
    shm_default_bytes: int = 64 * 1024 * 1024
    shm_growth_bytes: int = 64 * 1024 * 1024
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # gRPC over TLS (PEM files). With ``grpc_ssl_mutual`` clients must also present a certificate
    # signed by ``grpc_root_cert``. HTTP (health / metrics) stays plain on loopback for the probes.
    grpc_server_cert: Path | None = None
    grpc_server_key: Path | None = None
    grpc_root_cert: Path | None = None
    grpc_ssl_mutual: bool = False
    process: subprocess.Popen | None = None
    _log_file: object | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        home = pytriton_home()
        return [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={Path(self.model_repository).resolve()}",
            f"--backend-directory={home / 'backends'}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-port={self.metrics_port}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--log-verbose=0",
            f"--backend-config=python,shm-default-byte-size={self.shm_default_bytes}",
            f"--backend-config=python,shm-growth-byte-size={self.shm_growth_bytes}",
            *self.tls_args(),
            *self.extra_args,
        ]

    @property
    def grpc_tls(self) -> bool:
        return self.grpc_server_cert is not None

    def tls_args(self) -> list[str]:
        """tritonserver's --grpc-use-ssl* flags (flag names checked against `tritonserver --help`, 2.51)."""
        if self.grpc_server_cert is None and self.grpc_server_key is None:
            if self.grpc_ssl_mutual or self.grpc_root_cert is not None:
                raise TritonStartError("gRPC TLS needs grpc_server_cert and grpc_server_key")
            return []
        for name in ("grpc_server_cert", "grpc_server_key", *(("grpc_root_cert",) if self.grpc_ssl_mutual else ())):
            path = getattr(self, name)
            if path is None or not Path(path).is_file():
                # tritonserver itself only says "failed to start GRPC service" for a missing file.
                raise TritonStartError(f"gRPC TLS: {name} {path} is not a readable file")
        args = [
            f"--grpc-use-ssl{'-mutual' if self.grpc_ssl_mutual else ''}=true",
            f"--grpc-server-cert={Path(self.grpc_server_cert).resolve()}",  # type: ignore[arg-type]
            f"--grpc-server-key={Path(self.grpc_server_key).resolve()}",  # type: ignore[arg-type]
        ]
        if self.grpc_root_cert is not None:
            args.append(f"--grpc-root-cert={Path(self.grpc_root_cert).resolve()}")
        return args

    def start(self, timeout_s: float = 180.0) -> TritonServer:
        if self.process is not None and self.process.poll() is None:
            return self  # already running: a second start would orphan the first server
        repo = Path(self.model_repository)
        if not repo.is_dir():
            raise TritonStartError(f"model repository {repo} does not exist: build it with `ctlesion build-repo`")
        ensure_python_stub()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        if self.log_path is None:
            self.log_path = Path(tempfile.mkdtemp(prefix="tritonserver-")) / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        env.update(self.env)
        command = self.command()  # raises TritonStartError on a bad TLS setup, before anything is opened
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # A new session so that stop() can signal the server and its stub processes together.
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.info("tritonserver pid %d, grpc %s, log %s", self.process.pid, self.grpc_url, self.log_path)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def failure_summary(self) -> str:
        """The server's own error lines (a model that failed to load, a port in use), one line each.

        Triton writes errors as ``E<date> ...`` lines and ends a failed start with ``error: ...``; the
        summary puts them first so that the cause is not lost among hundreds of start-up lines.
        """
        if self.log_path is None or not self.log_path.exists():
            return ""
        errors = [
            " ".join(line.split())[:300]
            for line in self.log_path.read_text(errors="replace").splitlines()
            if ((line[:1] == "E" and line[1:5].isdigit()) or line.startswith("error:") or "failed to load" in line)
            and not any(noise in line for noise in _HARMLESS_ON_CPU)
        ]
        return (": " + " | ".join(dict.fromkeys(errors[:6]))) if errors else ""

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready"
                    f"{self.failure_summary()}; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        # Still running but not ready (a model stuck loading): say what it reported so far, not just "timeout".
        raise TritonStartError(
            f"tritonserver not ready after {timeout_s:.0f} s{self.failure_summary()}; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 20.0) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def rss_bytes(self) -> int:
        """Resident memory of the server and its Python stub processes (Linux /proc)."""
        if self.process is None:
            return 0
        total = 0
        for pid in process_tree(self.process.pid):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/statm").read_text().split()
                total += int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
        return total

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (Linux /proc): tritonserver and its Python-backend stubs."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            ppid = int(text.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def sigterm_as_interrupt() -> None:
    """Make SIGTERM (docker stop, kill, systemd, a CI timeout) raise KeyboardInterrupt in the main thread.

    Commands that start tritonserver or locust children stop them in ``finally`` / ``with`` blocks;
    Python's default SIGTERM exit skips those and orphans the children.
    """

    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ctlesion serve",
        description="Start the real tritonserver on a model repository and keep it up until Ctrl-C.",
    )
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "work" / "model_repository" / "cpu")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log", type=Path, default=None, help="server log file (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument("--grpc-server-cert", type=Path, default=None, help="PEM certificate: serve gRPC over TLS")
    parser.add_argument("--grpc-server-key", type=Path, default=None, help="PEM private key of --grpc-server-cert")
    parser.add_argument("--grpc-root-cert", type=Path, default=None, help="PEM CA that client certificates must chain to")
    parser.add_argument("--grpc-ssl-mutual", action="store_true", help="require client certificates (mutual TLS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = TritonServer(
        args.model_repository,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        log_path=args.log,
        grpc_server_cert=args.grpc_server_cert,
        grpc_server_key=args.grpc_server_key,
        grpc_root_cert=args.grpc_root_cert,
        grpc_ssl_mutual=args.grpc_ssl_mutual,
    )

    # Installed before start and one try around everything: a signal at any point stops the server.
    sigterm_as_interrupt()
    try:
        try:
            server.start(args.timeout)
        except TritonStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"tritonserver ready: grpc {server.grpc_url}, http {server.http_url}, metrics {server.metrics_url}")
        print(f"log: {server.log_path}  (Ctrl-C to stop)", flush=True)
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
        print(f"tritonserver exited with code {server.process.returncode if server.process else '?'}")
        return 1
    except KeyboardInterrupt:
        print("stopping tritonserver", flush=True)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
