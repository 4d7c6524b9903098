# syntax=docker/dockerfile:1.7
# GPU serving image: NGC tritonserver (onnxruntime_onnx + tensorrt_plan backends) + our Python-backend
# models + a model repository built from the committed checkpoint.
#
#   docker build -f docker/gpu.Dockerfile -t ctlesion-triton-gpu:0.1.0 .
#
# Build args (all have pinned defaults; see docs/deployment.md):
#   TRITON_IMAGE     NGC image. Its Triton release must equal the nvidia-pytriton wheel's (2.51.0 ->
#                    24.10): the Python-backend stub for Python 3.11 is taken from that wheel.
#   BUILDER_IMAGE    Python image of the stage that exports ONNX from the checkpoint (CPU torch).
#   TORCH_VERSION / TORCH_INDEX_URL   CPU torch for the export stage (pyproject's `train` pin).
#   PYTRITON_VERSION nvidia-pytriton (pyproject's `serve` pin); only its 3.11 stub is used.
#   ONNX_VERSION     onnx (pyproject's `train` pin); build-repo reads ONNX shapes at start-up.
#   TENSORRT_VERSION TensorRT Python wheel used by `ctlesion build-engine` at start-up; must match the
#                    TensorRT inside TRITON_IMAGE (24.10 -> 10.5.x). Empty: no engine builds (gpu-onnx).
#   CUDA_PYTHON_VERSION  cuda-python (device buffers for the engine check; the image has no torch).
#   INT8             1: also write the INT8 QDQ ONNX (TensorRT flavour), calibrated on phantom DICOM.
#   UID              numeric id of the non-root user.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
ARG BUILDER_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
# Stage 1: checkpoint -> ONNX (fp32, optionally INT8 QDQ) -> gpu-onnx model repository.
FROM ${BUILDER_IMAGE} AS repo-builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG INT8=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# CPU torch first, from the CPU index: unpinned, PyPI would pull a multi-GB CUDA build.
RUN python -m pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ./
COPY damoyolo damoyolo
COPY preprocess_backend preprocess_backend
COPY phantoms phantoms
COPY export export
COPY client client
COPY bench bench
COPY node node
COPY fpr fpr
COPY testgen testgen
COPY model_repository model_repository
COPY models models
RUN python -m pip install -e ".[train]"
RUN set -eux; \
    ctlesion export --checkpoint models/ctlesion_damoyolo.pt --out /out/onnx/detector.onnx; \
    if [ "${INT8}" = "1" ]; then \
      ctlesion phantom --out /tmp/calib --cases 4 --seed 1234; \
      ctlesion export --checkpoint models/ctlesion_damoyolo.pt --out /out/onnx/detector.onnx --from-onnx \
        --int8 --target tensorrt --int8-out /out/onnx/detector_int8_trt.onnx --calibration-dir /tmp/calib; \
    fi; \
    python -c "from ctlesion_export.fpr_repo import export_fpr_checkpoint as e, DEFAULT_FPR_CHECKPOINT as c; e(c, '/out/onnx/ctlesion_fpr.onnx')"; \
    ctlesion build-repo --target gpu-onnx --onnx /out/onnx/detector.onnx --fpr-onnx /out/onnx/ctlesion_fpr.onnx --out /out/repo/gpu-onnx

# ---------------------------------------------------------------------------------------------------
# Stage 2: the server.
FROM ${TRITON_IMAGE} AS runtime
ARG PYTRITON_VERSION=0.7.0
ARG ONNX_VERSION=1.23.2
ARG TENSORRT_VERSION=10.5.0
ARG CUDA_PYTHON_VERSION=12.6.2.post1
ARG UID=10001
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive

# Python 3.11 (Ubuntu 22.04 universe): our pins (scipy 1.17, numpy 1.26.4) need >= 3.11, the image's
# own python3 is 3.10. The Python-backend stub embeds the interpreter found first on PATH, so the venv
# below is what the preprocess / postprocess models import from.
# (apt versions are not pinned: jammy-updates rotates them; the NGC tag fixes the distribution.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} VIRTUAL_ENV=/opt/venv

WORKDIR /opt/ctlesion/src
COPY pyproject.toml README.md ./
COPY damoyolo damoyolo
COPY preprocess_backend preprocess_backend
COPY phantoms phantoms
COPY export export
COPY client client
COPY bench bench
COPY node node
COPY fpr fpr
COPY testgen testgen
COPY model_repository model_repository
# Runtime deps pinned in pyproject.toml (numpy 1.26.4: numpy 2 makes the Python backend return empty
# tensors), the pytriton wheel for its 3.11 stub, onnx for build-repo, TensorRT + cuda-python for
# build-engine. Editable so `ctlesion build-repo` finds model_repository/ next to the code.
# (The pytriton server binary and its other stubs are unused here and removed: ~50 MB.)
# hadolint ignore=DL3013
RUN set -eux; \
    pip install -e ".[serve]" "onnx==${ONNX_VERSION}"; \
    if [ -n "${TENSORRT_VERSION}" ]; then \
      pip install "tensorrt-cu12==${TENSORRT_VERSION}" "cuda-python==${CUDA_PYTHON_VERSION}"; \
    fi; \
    pyt="$(python -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / "tritonserver")')"; \
    install -m 0755 "${pyt:?}/python_backend_stubs/3.11/triton_python_backend_stub" \
      /opt/tritonserver/backends/python/triton_python_backend_stub; \
    rm -rf "${pyt:?}/bin" "${pyt:?}/python_backend_stubs"; \
    python -c "import numpy, pydicom, scipy, preprocess_backend; assert numpy.__version__.startswith('1.26')"

COPY --from=repo-builder /out/onnx /opt/ctlesion/onnx
COPY --from=repo-builder /out/repo/gpu-onnx /opt/ctlesion/repo/gpu-onnx
COPY --chmod=0755 docker/entrypoint-gpu.sh /usr/local/bin/ctlesion-entrypoint
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/ctlesion-healthcheck

RUN useradd --uid "${UID}" --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin triton-app \
 && mkdir -p /cache/engines /models \
 && chown "${UID}:${UID}" /cache/engines /models
# Everything written at run time goes to /tmp, /models (the repository assembled at start-up),
# /cache/engines (TensorRT plans, keyed by compute capability + TensorRT version) and /dev/shm.
ENV HOME=/tmp \
    CTLESION_TARGET=auto \
    CTLESION_ONNX_DIR=/opt/ctlesion/onnx \
    CTLESION_BASE_REPO=/opt/ctlesion/repo/gpu-onnx \
    CTLESION_MODEL_REPO=/models \
    CTLESION_ENGINE_CACHE=/cache/engines
USER ${UID}:${UID}
EXPOSE 8000 8001 8002
VOLUME ["/cache/engines"]
# Startup can include a TensorRT engine build (minutes): a long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3.11", "/usr/local/bin/ctlesion-healthcheck", "http://127.0.0.1:8000/v2/health/ready"]
ENTRYPOINT ["/usr/local/bin/ctlesion-entrypoint"]
