#!/usr/bin/env bash
# Start the pytriton tritonserver (CPU, Python-backend detector on onnxruntime) on all interfaces.
# `ctlesion serve` binds 127.0.0.1 only, which a container port or a Kubernetes Service cannot reach,
# so this runs the same binary with the same flags on 0.0.0.0.
set -euo pipefail
REPO=${CTLESION_MODEL_REPO:-/opt/ctlesion/repo/cpu}
SHM_BYTES=${CTLESION_PYTHON_SHM_BYTES:-67108864}
HOME_DIR=$(python -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / "tritonserver")')
exec "$HOME_DIR/bin/tritonserver" \
  --model-repository="$REPO" \
  --backend-directory="$HOME_DIR/backends" \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
  --allow-metrics=true \
  --strict-readiness=true --exit-on-error=true \
  --exit-timeout-secs="${CTLESION_EXIT_TIMEOUT_SECS:-30}" \
  --backend-config=python,shm-default-byte-size="$SHM_BYTES" \
  --backend-config=python,shm-growth-byte-size="$SHM_BYTES" \
  "$@"
