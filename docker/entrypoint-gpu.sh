#!/usr/bin/env bash
# Start Triton on a GPU node.
#   CTLESION_TARGET=auto     (default) use a cached TensorRT plan for this GPU + TensorRT version, or build
#                            one (`ctlesion build-engine`), then serve the gpu-trt repository; when the
#                            build fails, log why and serve gpu-onnx instead.
#   CTLESION_TARGET=gpu-trt  the same, but a failed build is fatal.
#   CTLESION_TARGET=gpu-onnx serve the onnxruntime repository built into the image.
# Extra arguments are passed to tritonserver (e.g. --log-verbose=1).
set -euo pipefail

log() { printf '%s ctlesion-entrypoint: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }

TARGET=${CTLESION_TARGET:-auto}
ONNX_DIR=${CTLESION_ONNX_DIR:-/opt/ctlesion/onnx}
BASE_REPO=${CTLESION_BASE_REPO:-/opt/ctlesion/repo/gpu-onnx}
REPO=${CTLESION_MODEL_REPO:-/models}
CACHE=${CTLESION_ENGINE_CACHE:-/cache/engines}
PRECISION=${CTLESION_ENGINE_PRECISION:-fp16}          # fp16 | int8 (needs the INT8 QDQ ONNX in the image)
MAX_BATCH=${CTLESION_MAX_BATCH:-32}
QUEUE_DELAY_US=${CTLESION_QUEUE_DELAY_US:-2000}
DETECTOR_INSTANCES=${CTLESION_DETECTOR_INSTANCES:-1}
PREPROCESS_INSTANCES=${CTLESION_PREPROCESS_INSTANCES:-2}
POSTPROCESS_INSTANCES=${CTLESION_POSTPROCESS_INSTANCES:-1}
SHM_BYTES=${CTLESION_PYTHON_SHM_BYTES:-67108864}
EXIT_TIMEOUT=${CTLESION_EXIT_TIMEOUT_SECS:-30}

repo_args=(--max-batch-size "$MAX_BATCH" --queue-delay-us "$QUEUE_DELAY_US"
           --detector-instances "$DETECTOR_INSTANCES" --preprocess-instances "$PREPROCESS_INSTANCES"
           --postprocess-instances "$POSTPROCESS_INSTANCES")
# the FPR ONNX exported at image build (this image has no torch to export the checkpoint itself)
[ -f "$ONNX_DIR/ctlesion_fpr.onnx" ] && repo_args+=(--fpr-onnx "$ONNX_DIR/ctlesion_fpr.onnx")

serve_onnx() {
  log "serving target gpu-onnx (onnxruntime backend) from $REPO"
  ctlesion build-repo --target gpu-onnx --onnx "$ONNX_DIR/detector.onnx" --out "$REPO" "${repo_args[@]}" >&2 \
    || { log "build-repo failed; using the repository baked into the image"; REPO=$BASE_REPO; }
}

engine_name() {
  local cc trt
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0 2>/dev/null | head -n1 | tr -d ' .')
  trt=$(python -c 'import tensorrt as t; print(".".join(t.__version__.split(".")[:2]))' 2>/dev/null) || return 1
  [ -n "$cc" ] || return 1
  echo "detector_sm${cc}_trt${trt}.plan"
}

# The engine takes uint8 images, as the detector config declares: it is built from the uint8-input ONNX
# (cast to float inside the graph), cached beside the plan as <plan stem>.onnx; build-repo checks that
# ONNX, and the plan's manifest (<plan>.json), against the config before Triton sees the repository.
serve_trt() {
  local name onnx tmp source
  name=$(engine_name) || { log "no GPU visible (nvidia-smi) or no TensorRT Python package: cannot build an engine"; return 1; }
  source="$CACHE/${name%.plan}.onnx"
  if [ -s "$CACHE/$name" ] && [ -s "$source" ]; then
    log "cached engine $CACHE/$name (source $source)"
  else
    onnx="$ONNX_DIR/detector.onnx"
    [ "$PRECISION" = int8 ] && onnx="$ONNX_DIR/detector_int8_trt.onnx"
    [ -f "$onnx" ] || { log "$onnx not in the image (build it with --build-arg INT8=1)"; return 1; }
    log "no engine for this GPU / TensorRT in $CACHE: building $name ($PRECISION) from $onnx; this takes minutes"
    # Build into a private folder, then rename: pods sharing a cache volume never see half a plan.
    tmp=$(mktemp -d "$CACHE/.build-XXXXXX")
    if ! ctlesion build-engine --onnx "$onnx" --cast-uint8-input --precision "$PRECISION" --out "$tmp" \
         --max-batch "$MAX_BATCH" --timing-cache "$CACHE/timing-$name.cache" >&2; then
      rm -rf "$tmp"; log "engine build failed"; return 1
    fi
    # source and manifest first, the plan last: a reader that sees the plan sees its source too
    mv -f "$tmp/${name%.plan}.onnx" "$source"; mv -f "$tmp/$name.json" "$CACHE/$name.json"
    mv -f "$tmp/$name" "$CACHE/$name"; rm -rf "$tmp"
  fi
  ctlesion build-repo --target gpu-trt --onnx "$source" --engine "$CACHE/$name" \
    --out "$REPO" "${repo_args[@]}" >&2 || { log "build-repo gpu-trt failed (I/O check above)"; return 1; }
  log "serving target gpu-trt ($name) from $REPO"
}

case "$TARGET" in
  gpu-onnx) serve_onnx ;;
  gpu-trt) serve_trt || { log "FATAL: CTLESION_TARGET=gpu-trt and no engine could be used"; exit 1; } ;;
  auto) serve_trt || { log "FALLBACK: TensorRT engine unavailable, serving gpu-onnx instead"; serve_onnx; } ;;
  *) log "unknown CTLESION_TARGET=$TARGET (auto | gpu-trt | gpu-onnx)"; exit 2 ;;
esac

# exec: tritonserver is PID 1's child-free replacement, so SIGTERM from the kubelet reaches it and it
# drains in-flight requests (up to --exit-timeout-secs) before exiting.
exec tritonserver \
  --model-repository="$REPO" \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
  --allow-metrics=true --allow-gpu-metrics=true \
  --strict-readiness=true --exit-on-error=true \
  --exit-timeout-secs="$EXIT_TIMEOUT" \
  --backend-config=python,shm-default-byte-size="$SHM_BYTES" \
  --backend-config=python,shm-growth-byte-size="$SHM_BYTES" \
  "$@"
