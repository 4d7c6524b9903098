"""Shared fixtures: a CPU model repository and the real tritonserver on free loopback ports."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
CHECKPOINT = Path(os.environ.get("CTLESION_CHECKPOINT", REPO_ROOT / "models" / "ctlesion_damoyolo.pt"))

# tests/ helpers (dicom_factory, orthanc_server) import as plain modules.
sys.path.insert(0, str(TESTS))

# Under `make test` / CI a skip for a missing real part fails the run (tests/real_parts.py).
from real_parts import missing_real_part, pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402, F401


@pytest.fixture(scope="session")
def detector_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed checkpoint exported to ONNX, exactly as `make demo` serves it."""
    if not CHECKPOINT.exists():
        missing_real_part(f"no trained checkpoint at {CHECKPOINT} (train one with `ctlesion train`)")
    from ctlesion_export.cli import export_checkpoint

    return export_checkpoint(CHECKPOINT, tmp_path_factory.mktemp("onnx") / "detector.onnx")


@pytest.fixture(scope="session")
def fpr_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed FPR checkpoint exported to ONNX, exactly as build-repo serves it."""
    from ctlesion_export.fpr_repo import DEFAULT_FPR_CHECKPOINT, export_fpr_checkpoint

    if not DEFAULT_FPR_CHECKPOINT.exists():
        missing_real_part(f"no FPR checkpoint at {DEFAULT_FPR_CHECKPOINT} (train one with python -m ctlesion_fpr.train --release)")
    return export_fpr_checkpoint(DEFAULT_FPR_CHECKPOINT, tmp_path_factory.mktemp("fpr") / "fpr.onnx")


@pytest.fixture(scope="session")
def cpu_repository(detector_onnx: Path, fpr_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctlesion_export.build_repo import RepoConfig, build_repository

    out = tmp_path_factory.mktemp("repo") / "cpu"
    # Small batches and a short queue delay keep test latency low on 2 cores.
    # The default deployment: the detection ensemble and the 3D false-positive reduction (lesion_fpr).
    return build_repository(detector_onnx, out, RepoConfig(target="cpu", max_batch_size=32, preprocess_instances=2), fpr_onnx=fpr_onnx)


@pytest.fixture(scope="session")
def triton(cpu_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real tritonserver for the session; stopped (with its stub processes) even on failure."""
    from ctlesion_client.server import TritonServer

    server = TritonServer(cpu_repository, log_path=tmp_path_factory.mktemp("triton") / "tritonserver.log")
    server.start(timeout_s=240)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def phantom_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One held-out phantom case (seed never used in training), written as DICOM + truth.json."""
    from ctlesion_phantoms.config import PhantomConfig
    from ctlesion_phantoms.generate import generate_case

    out = tmp_path_factory.mktemp("phantom")
    config = PhantomConfig(slices_max=120, nodules_min=3, nodules_max=4, p_no_nodules=0.0, diameter_mm=(6.0, 20.0))
    truth = generate_case(20_001, out, config)
    return out / truth.case_id
