# syntax=docker/dockerfile:1.7
# Client / tools image: the `ctlesion` CLI (detect, process-study, loadtest, bench, phantom) and the
# gRPC client library; no server, no torch.
#
#   docker build -f docker/client.Dockerfile -t ctlesion-client:0.1.0 .
#   docker run --rm -v $PWD/series:/data:ro ctlesion-client:0.1.0 detect /data --url triton:8001
#
# Build args:
#   PYTHON_IMAGE  base image of both stages.
#   EXTRAS        pyproject extras to install (default `load`: locust for `ctlesion loadtest`).
#   UID           numeric id of the non-root user.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=load
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
WORKDIR /src
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
# "." is this project: its versions are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]"

FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} VIRTUAL_ENV=/opt/venv HOME=/tmp PYTHONDONTWRITEBYTECODE=1
RUN useradd --uid "${UID}" --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin ctlesion
WORKDIR /tmp
USER ${UID}:${UID}
# Not a server: the health check only proves the CLI imports.
HEALTHCHECK --interval=60s --timeout=10s --retries=1 CMD ["ctlesion", "--help"]
ENTRYPOINT ["ctlesion"]
CMD ["--help"]
