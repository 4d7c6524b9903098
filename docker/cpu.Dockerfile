# syntax=docker/dockerfile:1.7
# CPU serving image (the embedded default): the tritonserver binary from the nvidia-pytriton wheel,
# detector = Python-backend model running onnxruntime in-process; no GPU, no NGC image.
#
#   docker build -f docker/cpu.Dockerfile -t ctlesion-triton-cpu:0.1.0 .
#
# Build args:
#   PYTHON_IMAGE     base image of both stages (Python 3.11: the pytriton stub and our pins).
#   TORCH_VERSION / TORCH_INDEX_URL   CPU torch for the export stage (pyproject's `train` pin).
#   UID              numeric id of the non-root user.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# Stage 1: checkpoint -> ONNX -> cpu model repository (torch stays in this stage).
FROM ${PYTHON_IMAGE} AS repo-builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
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
RUN python -m pip install -e ".[train]" \
 && ctlesion build-repo --target cpu --out /out/repo/cpu

# Stage 2: runtime (no torch, no compilers).
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
# The Python-backend stub embeds the interpreter found first on PATH: the venv's.
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
# numpy 1.26.4 and the other pins come from pyproject.toml; the stub copy writes into site-packages,
# so it happens here, not at run time (the root filesystem is read-only in Kubernetes).
# "." is this project: its versions are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[serve]" \
 && python -c "from ctlesion_client.server import ensure_python_stub; print(ensure_python_stub())" \
 && python -c "import numpy; assert numpy.__version__.startswith('1.26'), numpy.__version__"
COPY --from=repo-builder /out/repo/cpu /opt/ctlesion/repo/cpu
COPY --chmod=0755 docker/entrypoint-cpu.sh /usr/local/bin/ctlesion-entrypoint
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/ctlesion-healthcheck
RUN useradd --uid "${UID}" --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin triton-app
ENV HOME=/tmp CTLESION_MODEL_REPO=/opt/ctlesion/repo/cpu
USER ${UID}:${UID}
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/usr/local/bin/ctlesion-healthcheck", "http://127.0.0.1:8000/v2/health/ready"]
ENTRYPOINT ["/usr/local/bin/ctlesion-entrypoint"]
