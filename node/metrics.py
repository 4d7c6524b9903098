"""Prometheus text-format metrics and the health endpoints, on a small stdlib HTTP server.

    /metrics  counters, gauges and latency histograms (text format 0.0.4)
    /healthz  liveness: the process and its worker threads are alive
    /readyz   readiness: the DICOM listener is up and the spool is writable
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
PREFIX = "ctlesion_node_"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._help: dict[str, tuple[str, str]] = {}
        self._hist: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, help_text: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._help.setdefault(name, ("counter", help_text))
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def observe(self, name: str, help_text: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._help.setdefault(name, ("histogram", help_text))
            h = self._hist.setdefault(key, [0.0] * (len(BUCKETS_S) + 2))  # buckets..., +Inf count, sum
            h[bisect.bisect_left(BUCKETS_S, value)] += 1
            h[-1] += value

    def gauge(self, name: str, help_text: str, fn: Callable[[], float]) -> None:
        with self._lock:
            self._help[name] = ("gauge", help_text)
            self._gauges[name] = fn

    def value(self, name: str, **labels: str) -> float:
        return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, text) in sorted(self._help.items()):
                full = PREFIX + name
                lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
                if kind == "counter":
                    for (n, labels), v in sorted(self._counters.items()):
                        if n == name:
                            lines.append(f"{full}{_labels(labels)} {v:g}")
                elif kind == "gauge":
                    lines.append(f"{full} {float(self._gauges[name]()):g}")
                else:
                    for (n, labels), h in sorted(self._hist.items()):
                        if n != name:
                            continue
                        cum = 0.0
                        for le, count in zip((*BUCKETS_S, "+Inf"), h[:-1], strict=True):
                            cum += count
                            lines.append(f"{full}_bucket{_labels((*labels, ('le', str(le))))} {cum:g}")
                        lines.append(f"{full}_sum{_labels(labels)} {h[-1]:.6f}")
                        lines.append(f"{full}_count{_labels(labels)} {cum:g}")
        return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v)}"'.replace("\n", " ") for k, v in labels)
    return "{" + inner + "}"


class HealthServer:
    """``live`` / ``ready`` are callables so the answer is computed per probe."""

    def __init__(self, host: str, port: int, metrics: Metrics, live: Callable[[], bool],
                 ready: Callable[[], bool]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                if self.path.startswith("/metrics"):
                    self._send(200, outer.metrics.render(), "text/plain; version=0.0.4")
                elif self.path.startswith("/healthz"):
                    ok = outer.live()
                    self._send(200 if ok else 503, "ok\n" if ok else "dead worker\n")
                elif self.path.startswith("/readyz"):
                    ok = outer.ready()
                    self._send(200 if ok else 503, "ready\n" if ok else "not ready\n")
                else:
                    self._send(404, "not found\n")

            def _send(self, code: int, body: str, ctype: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:  # probes every few seconds: keep the log quiet
                return

        self.metrics, self.live, self.ready = metrics, live, ready
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="node-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
