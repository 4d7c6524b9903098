"""Triton's own view from its Prometheus endpoint (``/metrics``, port 8002 by default).

Counters used (Triton metrics docs, "Inference Request Metrics"), all cumulative per model:
``nv_inference_request_success``, ``nv_inference_request_failure``, ``nv_inference_count``
(inferences = batch rows), ``nv_inference_exec_count`` (executions), ``nv_inference_queue_duration_us``,
``nv_inference_compute_input_duration_us``, ``nv_inference_compute_infer_duration_us``,
``nv_inference_compute_output_duration_us``, ``nv_inference_request_duration_us``.
Average batch size reached by the dynamic batcher = delta inference count / delta execution count.
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


@dataclass
class ModelView:
    """One model's activity between two snapshots."""

    model: str
    requests: float
    failures: float
    inferences: float
    executions: float
    avg_batch: float  # inferences / executions: what the dynamic batcher reached
    queue_ms_per_request: float
    compute_ms_per_request: float  # input + infer + output
    infer_ms_per_exec: float
    request_ms_per_request: float


@dataclass
class ServerView:
    reachable: bool
    models: list[ModelView] = field(default_factory=list)


def _delta(before: Snapshot, after: Snapshot, name: str, model: str) -> float:
    return after.get(name, {}).get(model, 0.0) - before.get(name, {}).get(model, 0.0)


def _per(us: float, count: float) -> float:
    return round(us / count / 1000.0, 2) if count else 0.0


def diff(before: Snapshot, after: Snapshot) -> ServerView:
    if not after:
        return ServerView(reachable=False)
    models = sorted(after.get("nv_inference_request_success", {}))
    views = []
    for model in models:
        d = {name: _delta(before, after, name, model) for name in COUNTERS}
        req = d["nv_inference_request_success"]
        execs = d["nv_inference_exec_count"]
        compute = (
            d["nv_inference_compute_input_duration_us"]
            + d["nv_inference_compute_infer_duration_us"]
            + d["nv_inference_compute_output_duration_us"]
        )
        views.append(
            ModelView(
                model=model,
                requests=req,
                failures=d["nv_inference_request_failure"],
                inferences=d["nv_inference_count"],
                executions=execs,
                avg_batch=round(d["nv_inference_count"] / execs, 2) if execs else 0.0,
                queue_ms_per_request=_per(d["nv_inference_queue_duration_us"], req),
                compute_ms_per_request=_per(compute, req),
                infer_ms_per_exec=_per(d["nv_inference_compute_infer_duration_us"], execs),
                request_ms_per_request=_per(d["nv_inference_request_duration_us"], req),
            )
        )
    return ServerView(reachable=True, models=views)


def format_view(view: ServerView) -> str:
    if not view.reachable:
        return "server metrics: not reachable (give --metrics-url, or let the command start its own server)"
    head = f"{'model':<18} {'requests':>8} {'fail':>5} {'avg batch':>9} {'queue ms/req':>12} {'compute ms/req':>14} {'infer ms/exec':>13}"
    rows = [head]
    for v in view.models:
        rows.append(
            f"{v.model:<18} {v.requests:>8.0f} {v.failures:>5.0f} {v.avg_batch:>9.2f} {v.queue_ms_per_request:>12.2f} "
            f"{v.compute_ms_per_request:>14.2f} {v.infer_ms_per_exec:>13.2f}"
        )
    return "\n".join(rows)
