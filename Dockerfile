# syntax=docker/dockerfile:1
# Serving images for `moderator run`: ONNX Runtime, no torch, no compilers, non-root.
#
#   docker build --target cpu -t moderator:cpu .                 # slim CPU image (the default target is gpu)
#   docker build --target gpu -t moderator:gpu .                 # CUDA 13 + cuDNN 9 runtime, onnxruntime-gpu
#   docker build --target cpu --build-arg MODEL_DIR=models/vit-b-32 -t moderator:cpu-vit-b-32 .   # model baked in
#   docker build --target model --build-arg MODEL_DIR=models/vit-b-32 -t moderator-model:vit-b-32 .
#       # a model-only image: the Helm chart's init container copies it into an emptyDir
#
# Without MODEL_DIR the image has no model: mount an exported model directory at
# /srv/moderator/model. MODEL_DIR must lie inside the build context (see .dockerignore: models/).
# The install itself is deploy/docker/install.sh, which tests/test_deploy_image.py runs too.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG BUSYBOX_IMAGE=busybox:1.37.0
ARG MODEL_DIR=deploy/docker/no-model

# ---- model files: the placeholder, or an exported model directory ---------------------------
FROM ${BUSYBOX_IMAGE} AS model
ARG MODEL_DIR
COPY ${MODEL_DIR}/ /model/
USER 10001:10001
# As the chart's init container: copy the model into the shared (emptyDir) volume.
CMD ["sh", "-c", "cp -R /model/. \"${MODEL_TARGET:-/srv/moderator/model}/\""]

# ---- CPU: build the virtualenv ------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY moderator ./moderator
COPY deploy/docker/install.sh /usr/local/bin/moderator-install
RUN moderator-install cpu /opt/moderator /src

# ---- CPU: the serving image ----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 moderator \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin moderator
COPY --from=cpu-build /opt/moderator /opt/moderator
COPY --from=model --chown=10001:10001 /model/ /srv/moderator/model/
COPY moderator/data/policies/default.yaml /etc/moderator/policy.yaml
ENV PATH=/opt/moderator/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODERATOR_MODEL_DIR=/srv/moderator/model \
    MODERATOR_POLICY=/etc/moderator/policy.yaml \
    MODERATOR_HTTP_PORT=8080
USER 10001:10001
WORKDIR /srv/moderator
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MODERATOR_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["moderator"]
CMD ["run"]

# ---- GPU: build the virtualenv on the CUDA runtime base ------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The distribution's Python: versions follow the pinned CUDA base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY moderator ./moderator
COPY deploy/docker/install.sh /usr/local/bin/moderator-install
RUN moderator-install gpu /opt/moderator /src

# ---- GPU: the serving image (the default target) --------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 moderator \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin moderator
COPY --from=gpu-build /opt/moderator /opt/moderator
COPY --from=model --chown=10001:10001 /model/ /srv/moderator/model/
COPY moderator/data/policies/default.yaml /etc/moderator/policy.yaml
ENV PATH=/opt/moderator/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODERATOR_MODEL_DIR=/srv/moderator/model \
    MODERATOR_POLICY=/etc/moderator/policy.yaml \
    MODERATOR_HTTP_PORT=8080 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /srv/moderator
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MODERATOR_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["moderator"]
CMD ["run"]
