"""Triton's own view from its Prometheus endpoint (``/metrics``, port 8002 by default).

Counters used (Triton metrics docs, "Inference Request Metrics"), all cumulative per model:
``nv_inference_request_success``, ``nv_inference_request_failure``, ``nv_inference_count``
(inferences = batch rows), ``nv_inference_exec_count`` (executions), ``nv_inference_queue_duration_us``,
``nv_inference_compute_input_duration_us``, ``nv_inference_compute_infer_duration_us``,
``nv_inference_compute_output_duration_us``, ``nv_inference_request_duration_us``.
Average batch size reached by the dynamic batcher = delta inference count / delta execution count.

Triton adds the queue and compute durations once per *request* (``UpdateSuccess`` in core's
infer_stats.cc): when the dynamic batcher merges requests into one execution, every request of that
execution is charged the execution's whole compute time. So the per-request figures below are the
latency each request saw in that step, not a share of it, and requests / executions says how many
requests an execution merged on average.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_request_duration_us",
)
_LINE = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\}\s+(?P<value>[-+0-9.eE]+|NaN)")
_LABEL = re.compile(r'(\w+)="([^"]*)"')

# metric -> model -> value
Snapshot = dict[str, dict[str, float]]


def parse_metrics(text: str) -> Snapshot:
    out: Snapshot = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or m.group("name") not in COUNTERS:
            continue
        labels = dict(_LABEL.findall(m.group("labels")))
        model = labels.get("model", "?")
        bucket = out.setdefault(m.group("name"), {})
        bucket[model] = bucket.get(model, 0.0) + float(m.group("value"))  # summed over versions
    return out


def scrape(metrics_url: str, timeout_s: float = 5.0) -> Snapshot:
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:
            return parse_metrics(resp.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError):
        return {}


def _done(snap: Snapshot) -> float:
    return sum(
        sum(snap.get(n, {}).values())
        for n in ("nv_inference_request_success", "nv_inference_request_failure")
    )


def scrape_settled(metrics_url: str, timeout_s: float = 30.0, interval_s: float = 0.5) -> Snapshot:
    """Scrape once the server has finished what was in flight (request counters unchanged over an interval).

    A load generator stopped mid-request leaves requests running on the server; counting them after
    they finish keeps requests, inferences and executions consistent across the steps.
    """
    import time

    deadline = time.monotonic() + timeout_s
    snap = scrape(metrics_url)
    while snap and time.monotonic() < deadline:
        time.sleep(interval_s)
        nxt = scrape(metrics_url)
        if _done(nxt) == _done(snap):
            return nxt
        snap = nxt
    return snap


@dataclass
class ModelView:
    """One model's activity between two snapshots (times in ms per successful request)."""

    model: str
    requests: float
    failures: float
    inferences: float  # batch rows (slices for the detector)
    executions: float
    avg_batch: float  # inferences / executions: the batch size the dynamic batcher reached
    requests_per_exec: float  # requests merged into one execution
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    request_ms: float  # whole time in the server for this model (queue + compute + overheads)

    @property
    def compute_ms(self) -> float:
        return round(self.compute_input_ms + self.compute_infer_ms + self.compute_output_ms, 2)


@dataclass
class ServerView:
    reachable: bool
    models: list[ModelView] = field(default_factory=list)

    def model(self, name: str) -> ModelView | None:
        return next((m for m in self.models if m.model == name), None)


def _delta(before: Snapshot, after: Snapshot, name: str, model: str) -> float:
    return after.get(name, {}).get(model, 0.0) - before.get(name, {}).get(model, 0.0)


def _per(us: float, count: float) -> float:
    return round(us / count / 1000.0, 2) if count else 0.0


def diff(before: Snapshot, after: Snapshot) -> ServerView:
    """What happened between two scrapes; ``after`` empty means the endpoint was not reachable."""
    if not after:
        return ServerView(reachable=False)
    views = []
    for model in sorted(after.get("nv_inference_request_success", {})):
        d = {name: _delta(before, after, name, model) for name in COUNTERS}
        req, execs, infs = (
            d["nv_inference_request_success"],
            d["nv_inference_exec_count"],
            d["nv_inference_count"],
        )
        views.append(
            ModelView(
                model=model,
                requests=req,
                failures=d["nv_inference_request_failure"],
                inferences=infs,
                executions=execs,
                avg_batch=round(infs / execs, 2) if execs else 0.0,
                requests_per_exec=round(req / execs, 2) if execs else 0.0,
                queue_ms=_per(d["nv_inference_queue_duration_us"], req),
                compute_input_ms=_per(d["nv_inference_compute_input_duration_us"], req),
                compute_infer_ms=_per(d["nv_inference_compute_infer_duration_us"], req),
                compute_output_ms=_per(d["nv_inference_compute_output_duration_us"], req),
                request_ms=_per(d["nv_inference_request_duration_us"], req),
            )
        )
    return ServerView(reachable=True, models=views)


VIEW_HEADER = (
    "model",
    "requests",
    "failures",
    "inferences",
    "executions",
    "avg batch",
    "req/exec",
    "queue ms",
    "input ms",
    "infer ms",
    "output ms",
    "request ms",
)


def view_rows(view: ServerView) -> list[tuple[str, ...]]:
    return [
        (
            v.model,
            f"{v.requests:.0f}",
            f"{v.failures:.0f}",
            f"{v.inferences:.0f}",
            f"{v.executions:.0f}",
            f"{v.avg_batch:.2f}",
            f"{v.requests_per_exec:.2f}",
            f"{v.queue_ms:.2f}",
            f"{v.compute_input_ms:.2f}",
            f"{v.compute_infer_ms:.2f}",
            f"{v.compute_output_ms:.2f}",
            f"{v.request_ms:.2f}",
        )
        for v in view.models
    ]


def view_markdown(view: ServerView) -> list[str]:
    """Markdown table lines of the server's view (ms per request; see the module docstring)."""
    if not view.reachable:
        return ["Server metrics: not reachable."]
    return [
        "| " + " | ".join(VIEW_HEADER) + " |",
        "|---|" + "---:|" * (len(VIEW_HEADER) - 1),
        *["| " + " | ".join(r) + " |" for r in view_rows(view)],
    ]


def format_view(view: ServerView) -> str:
    if not view.reachable:
        return "server metrics: not reachable (give --metrics-url, or let the command start its own server)"
    widths = [18] + [max(len(h), 8) for h in VIEW_HEADER[1:]]
    fmt = lambda cells: " ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    lines = ["server view (Triton metrics; times in ms per request, avg batch = inferences / executions):"]
    lines += [fmt(VIEW_HEADER), *[fmt(r) for r in view_rows(view)]]
    return "\n".join(lines)
