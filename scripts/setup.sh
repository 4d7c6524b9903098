#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine; idempotent (finished steps are skipped).
#   system packages -> .venv with the pinned dependencies -> .venv-tools (checkov) -> tritonserver stub
#   -> model repository
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}

step() { printf '\n== %s\n' "$*"; }

# 1. System packages: the Python-backend stub links libpython3.11; Orthanc is the real PACS of the
#    PACS tests; dcmtk validates DICOM. Installed only when missing.
need_apt=()
[ -e /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 ] || need_apt+=(libpython3.11)
[ -x /usr/sbin/Orthanc ] || need_apt+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v dcmdump >/dev/null || need_apt+=(dcmtk)
command -v dciodvfy >/dev/null || need_apt+=(dicom3tools)
command -v kubectl >/dev/null || need_apt+=(kubectl)
if [ ${#need_apt[@]} -gt 0 ]; then
  step "apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # kubectl is not in every Debian release: install it only where it exists.
  for pkg in "${need_apt[@]}"; do
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null \
      || echo "warning: apt package $pkg could not be installed; tests that need it will skip and say so"
  done
  # The Debian orthanc package starts a system service on the default ports; tests run their own.
  (command -v service >/dev/null && $SUDO service orthanc stop >/dev/null 2>&1) || true
fi

# 2. Virtual environment with the versions pinned in pyproject.toml.
if [ ! -x .venv/bin/python ]; then
  step "virtual environment .venv ($PY)"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  step "pip install -e .[train,serve,load,dev] (pinned in pyproject.toml)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[train,serve,load,dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# 2b. Separate virtual environment .venv-tools for the security scanner (checkov), whose pins clash with
#     pyproject.toml's; versions in requirements-tools.txt (tests/test_deployment_security_scan.py).
if [ ! -x .venv-tools/bin/python ]; then
  step "virtual environment .venv-tools ($PY)"
  "$PY" -m venv .venv-tools
fi
tools_stamp=.venv-tools/.installed-$(sha256sum requirements-tools.txt | cut -c1-16)
if [ ! -f "$tools_stamp" ]; then
  step "pip install -r requirements-tools.txt into .venv-tools"
  .venv-tools/bin/python -m pip install -q --upgrade pip
  .venv-tools/bin/python -m pip install -q -r requirements-tools.txt
  rm -f .venv-tools/.installed-*
  touch "$tools_stamp"
fi

# 3. tritonserver's Python-backend stub for this interpreter.
.venv/bin/python -c "from ctlesion_client.server import ensure_python_stub; ensure_python_stub()"

# 4. The CPU model repository, built from the committed checkpoint (skipped when up to date).
if [ "${SKIP_MODEL_REPO:-0}" != "1" ]; then
  step "model repository (cpu) from the committed checkpoint"
  .venv/bin/ctlesion build-repo --target cpu --out work/model_repository/cpu --if-stale
fi
echo "setup done: $ROOT/.venv"
