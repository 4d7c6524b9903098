"""Shared pieces of the load test and the benchmark: phantom slabs, model repository, machine, stats."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import statistics
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "ctlesion_damoyolo.pt"
ENSEMBLE = "lesion_detection"
PHANTOM_SEED = 31_337  # a held-out seed, never used for training


@dataclass
class Machine:
    cpu_model: str
    cores: int
    python: str
    date_utc: str
    gpu: str = "none"
    loadavg_1m: float = 0.0  # at the start: a busy machine (a training run beside) shows here

    @classmethod
    def here(cls) -> Machine:
        model = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return cls(
            cpu_model=model,
            cores=os.cpu_count() or 1,
            python=platform.python_version(),
            date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            loadavg_1m=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else 0.0,
        )


def configure_logging() -> None:
    """INFO from this project's packages; WARNING from the rest (onnxruntime's quantizer logs every bias)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("ctlesion_bench", "ctlesion_client", "ctlesion_export", "ctlesion_phantoms"):
        logging.getLogger(name).setLevel(logging.INFO)


def percentiles(values_ms: list[float]) -> dict[str, float]:
    """p50 / p95 / p99 / mean of latencies in ms (nearest-rank on the sorted sample)."""
    if not values_ms:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "mean": float("nan")}
    arr = np.asarray(values_ms, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(arr, 50)), 2),
        "p95": round(float(np.percentile(arr, 95)), 2),
        "p99": round(float(np.percentile(arr, 99)), 2),
        "mean": round(float(arr.mean()), 2),
    }


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- data


def phantom_series_dir(out: Path, slices: int, seed: int = PHANTOM_SEED) -> Path:
    """A phantom CT series (real Part-10 files) of at most ``slices`` consecutive slices; cached under ``out``.

    The generator makes at least 8 slices; a shorter series is the first ``slices`` files of one.
    """
    import shutil

    from ctlesion_phantoms import PhantomConfig, generate_case

    thin = slices > 150  # a whole chest fits ~150 slices at the generator's spacings: thin slices for more
    case_dir = out / f"phantom_{seed}_{max(slices, 8)}{'_thin' if thin else ''}"
    series = case_dir / "series"
    if not (series.is_dir() and any(series.iterdir())):
        spacing = {"slice_spacing_mm": (0.6, 0.8), "slices_max": max(slices, 8) + 200} if thin else {"slices_max": max(slices, 8)}
        config = PhantomConfig(max_vessel_segments=300, p_no_nodules=0.0, **spacing)  # type: ignore[arg-type]
        generate_case(seed, case_dir.parent, config, case_id=case_dir.name)
        log.info("phantom series %s", series)
    files = _dicom_files(series)
    if len(files) <= slices:
        return series
    short = case_dir / f"series_{slices}"
    if not short.is_dir():
        short.mkdir(parents=True)
        for f in files[:slices]:
            shutil.copy2(f, short / f.name)
    return short


def _dicom_files(series_dir: Path) -> list[Path]:
    return sorted(p for p in Path(series_dir).rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ""))


def read_series(series_dir: Path) -> list[bytes]:
    """Part-10 bytes of a series ordered by file name (the generator names them in slice order)."""
    files = _dicom_files(series_dir)
    if not files:
        raise FileNotFoundError(f"no DICOM files under {series_dir}")
    return [p.read_bytes() for p in files]


def client_slabs(series_dir: Path, repository: Path, slab_size: int | None = None) -> list[list[bytes]]:
    """The requests the client library sends for this series to this repository's model: ordered by
    position, slabs planned with the repository's k and detector batch (``RequestShape``), halo
    included (``prepare_series``, the code ``detect_series`` runs). The short last slab is dropped
    when full ones exist, so every request of a sweep has one shape."""
    from ctlesion_client import ClientOptions
    from ctlesion_client.core import prepare_series
    from ctlesion_client.slabs import RequestShape

    shape = RequestShape.from_repository(repository)
    options = ClientOptions(k=shape.k, context_mm=shape.context_mm,
                            slab_size=slab_size or RequestShape(shape.k, shape.max_batch_size).slab_size())
    prepared = prepare_series(series_dir, options)
    slabs = [prepared.slab_bytes(plan) for plan in prepared.plans]
    full = max(len(s) for s in slabs)
    return [s for s in slabs if len(s) == full] or slabs


# ----------------------------------------------------------------------------- model repository


@dataclass
class Artifacts:
    onnx: Path
    repository: Path
    checkpoint: Path


def build_cpu_repository(
    checkpoint: Path, work: Path, max_batch_size: int = 64, onnx: Path | None = None
) -> Artifacts:
    """Checkpoint -> ONNX -> CPU model repository (exactly as `make demo` builds it)."""
    from ctlesion_export.build_repo import RepoConfig, build_repository
    from ctlesion_export.cli import export_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    if onnx is None:
        onnx = export_checkpoint(checkpoint, work / "detector.onnx")
    repo = build_repository(
        onnx, work / "repository" / "cpu", RepoConfig(target="cpu", max_batch_size=max_batch_size)
    )
    return Artifacts(onnx=onnx, repository=repo, checkpoint=checkpoint)


def repository_detector_onnx(repository: Path) -> Path:
    """The ONNX file a built CPU repository's detector serves (``onnx_file`` parameter, default model.onnx)."""
    import re

    config = Path(repository) / "detector" / "config.pbtxt"
    if not config.exists():
        raise FileNotFoundError(
            f"{config} not found: is {repository} a model repository built by `ctlesion build-repo`?"
        )
    m = re.search(r'key:\s*"onnx_file"\s*value\s*\{\s*string_value:\s*"([^"]+)"', config.read_text())
    onnx = config.parent / "1" / (m.group(1) if m else "model.onnx")
    if not onnx.exists():
        raise FileNotFoundError(f"{onnx} not found (give --onnx)")
    return onnx


def update_section(path: Path, heading: str, lines: list[str]) -> None:
    """Replace the ``## heading`` section of a markdown file (up to the next ``## ``), or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(heading)
    block = "\n".join(lines).rstrip("\n") + "\n"
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + block + ("\n" + text[end + 1 :] if end >= 0 else "")
    path.write_text(text)
