# syntax=docker/dockerfile:1.7
# sith GPU worker: one process per device, consuming the Redis Stream `sith:jobs` (group
# `sith-workers`). Build from the repository root:
#   docker build -f deploy/worker.Dockerfile -t sith-worker:0.1.0 .
# torch 2.14.1 from PyPI is the CUDA 13.0 build and ships the CUDA user-space libraries as wheels;
# the CUDA base image supplies the matching runtime layout and the NVIDIA container toolkit mounts
# the driver (needs driver >= 580). Pin by digest at release:
#   docker buildx imagetools inspect nvidia/cuda:13.0.0-base-ubuntu24.04
#   ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04@sha256:<digest>
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu 24.04's python3 is 3.12 (the project needs >= 3.11). Versions come from the pinned base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/deploy/constraints.txt
WORKDIR /src
RUN python3 -m venv /opt/sith
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

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="sith-worker" \
      org.opencontainers.image.description="SITH GPU worker: runs decompositions, COMP and edits for jobs queued on Redis" \
      org.opencontainers.image.licenses="Apache-2.0"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sith \
    && useradd --system --uid 10001 --gid sith --home-dir /var/lib/sith --create-home --shell /usr/sbin/nologin sith
COPY --from=build /opt/sith /opt/sith
COPY deploy/healthcheck.py /usr/local/lib/sith/healthcheck.py
ENV PATH=/opt/sith/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/sith \
    HF_HOME=/var/lib/sith/hf \
    SITH_DATA_DIR=/var/lib/sith \
    SITH_DEVICE=cuda:0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /var/lib/sith
VOLUME ["/var/lib/sith"]
# A worker serves no gRPC; it is healthy while it can reach the Redis it takes jobs from.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/sith/bin/python", "/usr/local/lib/sith/healthcheck.py", "redis"]
ENTRYPOINT ["sith", "worker"]
