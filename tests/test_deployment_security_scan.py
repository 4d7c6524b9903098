"""Security scan of the Kubernetes manifests and the Dockerfiles with checkov (offline, no cluster).

Every overlay is rendered with `kubectl kustomize` (as in test_deployment_manifests.py) and scanned with
`checkov --framework kubernetes`; docker/*.Dockerfile with `checkov --framework dockerfile`. checkov OSS
has no severities, so every failed check fails the test unless it is in ALLOWED below, each entry with
its reason; an allowed check that no longer fails fails the test too, so the list cannot go stale.

checkov pins dependencies that clash with pyproject.toml's, so scripts/setup.sh installs it into its
own virtual environment, .venv-tools/ (version in requirements-tools.txt).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKER = ROOT / "docker"
OVERLAYS = ("cpu", "gpu")


class Allowed(NamedTuple):
    reason: str
    # When set, every flagged code block must match it: the entry covers only the known false positive.
    code_pattern: str | None = None


ALLOWED: dict[str, dict[str, Allowed]] = {
    "kubernetes": {
        "CKV_K8S_43": Allowed(
            "image by digest: the overlays pin a release tag (kustomize `images:`); the digest exists only "
            "after the push, so a release sets `digest:` there (test_images_are_pinned forbids untagged/latest)"
        ),
    },
    "dockerfile": {
        # checkov stops at the first failing FROM, so test_dockerfile_structure is the check of every stage.
        "CKV_DOCKER_7": Allowed(
            "false positive: checkov does not expand `FROM ${ARG}`; the ARG defaults are pinned tags "
            "(asserted by test_dockerfile_structure)",
            code_pattern=r"FROM\s+\$\{\w+\}",
        ),
    },
}


def _tool(name: str) -> str | None:
    for candidate in (ROOT / ".venv-tools" / "bin" / name, Path(sys.executable).parent / name):
        if candidate.exists():
            return str(candidate)
    return shutil.which(name)


def _checkov(framework: str, targets: list[str], cwd: Path) -> dict:
    checkov = _tool("checkov")
    if checkov is None:
        pytest.skip(
            "checkov not installed (scripts/setup.sh installs it into .venv-tools from requirements-tools.txt)"
        )
    # Offline: no guideline download from the Prisma Cloud API, no PyPI version check.
    env = {
        **os.environ,
        "BC_SKIP_MAPPING": "TRUE",
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
        "LOG_LEVEL": "WARNING",
    }
    cmd = [checkov, "--framework", framework, *targets, "--output", "json", "--skip-download", "--soft-fail"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, f"checkov failed ({result.returncode}):\n{result.stderr[-4000:]}"
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    report = next((r for r in reports if r.get("check_type") == framework), None)
    assert report is not None and "results" in report, f"checkov scanned nothing: {result.stdout[:2000]}"
    assert report["summary"]["parsing_errors"] == 0, report["summary"]
    return report


def _assert_only_allowed_failures(framework: str, report: dict) -> None:
    allowed = ALLOWED[framework]
    failed = report["results"]["failed_checks"]
    unexpected = []
    for check in failed:
        entry = allowed.get(check["check_id"])
        code = "".join(line for _, line in check.get("code_block") or [])
        if entry is None or (entry.code_pattern and not re.search(entry.code_pattern, code)):
            unexpected.append(
                f"{check['check_id']} {check['check_name']!r}: {check['resource']} "
                f"({check['file_path']}:{check['file_line_range']}) {check.get('guideline') or ''}"
            )
    assert not unexpected, (
        f"checkov {framework}: {len(unexpected)} failed check(s) not in ALLOWED (fix them, or allow-list "
        "with a reason):\n" + "\n".join(unexpected)
    )
    stale = sorted(set(allowed) - {c["check_id"] for c in failed})
    assert not stale, f"checkov {framework}: {stale} allowed but no longer failing: remove from ALLOWED"
    assert report["summary"]["passed"] > 0


def test_kubernetes_manifests_pass_checkov(tmp_path: Path) -> None:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (scripts/setup.sh apt-installs it where Debian has it)")
    for overlay in OVERLAYS:
        result = subprocess.run(
            [kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
        (tmp_path / f"{overlay}.yaml").write_text(result.stdout)
    report = _checkov("kubernetes", ["--directory", str(tmp_path)], cwd=tmp_path)
    scanned = {
        Path(c["file_path"]).stem
        for c in report["results"]["passed_checks"]
        if c["resource"].startswith("Deployment.")
    }
    assert scanned == set(OVERLAYS), f"checkov did not scan every overlay's Deployment: {scanned}"
    _assert_only_allowed_failures("kubernetes", report)


def test_dockerfiles_pass_checkov(tmp_path: Path) -> None:
    dockerfiles = sorted(DOCKER.glob("*.Dockerfile"))
    assert dockerfiles, "no docker/*.Dockerfile"
    targets = [arg for path in dockerfiles for arg in ("--file", str(path))]
    report = _checkov("dockerfile", targets, cwd=tmp_path)
    scanned = {Path(c["file_path"]).name for c in report["results"]["passed_checks"]}
    assert scanned == {p.name for p in dockerfiles}, f"checkov did not scan every Dockerfile: {scanned}"
    _assert_only_allowed_failures("dockerfile", report)
