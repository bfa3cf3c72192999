# syntax=docker/dockerfile:1
# The FER service's images, one file, three targets (deploy/README.md):
#
#   docker build -t fer-service:cpu .                      # CPU service (the default, last stage)
#   docker build --target gpu -t fer-service:gpu .        # ONNX Runtime with the CUDA provider
#   docker build --target train -t fer-service:train .    # PyTorch trainer: python -m train ...
#
# The service images hold the runtime wheels only (no compiler, no torch) in /opt/venv, the
# committed model_store/ at /app/model_store (mount a volume there to replace it), and run
# one uvicorn process as user 10001. One process uses every core, since OpenCV and ONNX
# Runtime release the GIL: scale with replicas, not workers (`--workers N` also needs
# PROMETHEUS_MULTIPROC_DIR, an empty writable folder: see deploy/README.md). uvicorn parses
# HTTP with h11 so that a request's line and headers are capped at 32 KiB (400 beyond), as
# production servers cap them; httptools, its default parser, reads headers of any size.
#
# Where no image registry or PyTorch index is reachable, deploy/local-images.sh builds the
# cpu and train targets with podman on a local Debian base (deploy/README.md, "Local images").

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu from PyPI is built against CUDA 13 and cuDNN 9 since 1.24: keep the
# pair below in step (the CUDA major of the base must be the one ONNX Runtime wants).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG ONNXRUNTIME_GPU_VERSION=1.31.1

# ---- Python base shared by the CPU service and the trainer -------------------------------
FROM ${PYTHON_IMAGE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin app
WORKDIR /app

# ---- CPU service: dependencies first (cached), then the package ---------------------------
# PIP_CERT, in the stages that run pip: a CA bundle for pip where a TLS-inspecting proxy
# stands between the build and PyPI, mounted into the build (deploy/local-images.sh mounts
# the host's); not given, pip uses its own.
FROM python AS cpu-venv
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py /tmp/requirements.py
RUN python -m venv /opt/venv \
    && python /tmp/requirements.py cpu > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
# A face detector beyond OpenCV's cascade (say RetinaFace) adds its wheel to pyproject.toml's
# dependencies (the layer above installs it) and its .onnx file as package data of service/
# (copied below), or to model_store/; a file anywhere else needs its own COPY here and in the
# gpu-venv stage, and a line in .dockerignore's allow-list.
COPY README.md ./
COPY service ./service
RUN pip install --no-deps . && rm -rf /src/build

# ---- GPU service: CUDA + cuDNN runtime, onnxruntime-gpu -----------------------------------
FROM ${CUDA_IMAGE} AS gpu-venv
ARG ONNXRUNTIME_GPU_VERSION
ARG PIP_CERT
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py /tmp/requirements.py
RUN python3 -m venv /opt/venv \
    && python3 /tmp/requirements.py gpu > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt \
        "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"
COPY README.md ./
COPY service ./service
RUN /opt/venv/bin/pip install --no-deps . && rm -rf /src/build

FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin app
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    CUDA_CACHE_PATH=/tmp/cuda-cache \
    FER_MODEL_STORE=/app/model_store \
    FER_DEVICE=cuda
WORKDIR /app
COPY --from=gpu-venv /opt/venv /opt/venv
COPY model_store /app/model_store
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000", "--http", "h11", "--h11-max-incomplete-event-size", "32768"]

# ---- Trainer: PyTorch (CPU build by default) + the train package --------------------------
FROM python AS train
ARG PIP_CERT
# Which torch: PyPI's torch for Linux is the CUDA build (several GB with its nvidia-* wheels),
# so pip also looks in TORCH_INDEX_URL, PyTorch's index of CPU builds, whose `+cpu` wheel of
# the pinned version outranks PyPI's (a CUDA trainer: .../whl/cu130). Where that index cannot
# be reached, set it empty and give WHEELS, a folder of wheels mounted into the build that
# holds the CPU torch (deploy/local-images.sh: podman build -v DIR:/wheels:ro).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELS=
ENV MPLCONFIGDIR=/tmp/matplotlib TORCH_HOME=/tmp/torch
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements.py /tmp/requirements.py
RUN python -m venv /opt/venv \
    && python /tmp/requirements.py cpu train > /tmp/requirements.txt \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        ${WHEELS:+--find-links "$WHEELS"} -r /tmp/requirements.txt
COPY README.md ./
COPY service ./service
COPY train ./train
RUN pip install --no-deps . && rm -rf /src/build
WORKDIR /app
# Where fit, export and the dataset cache write (compose mounts host folders over them).
RUN mkdir -p /app/runs /app/model_store /app/.cache \
    && chown app:app /app/runs /app/model_store /app/.cache
USER 10001:10001
ENTRYPOINT ["python", "-m", "train"]
CMD ["--help"]

# ---- CPU service (the default target) -----------------------------------------------------
FROM python AS cpu
ENV FER_MODEL_STORE=/app/model_store
COPY --from=cpu-venv /opt/venv /opt/venv
COPY model_store /app/model_store
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000", "--http", "h11", "--h11-max-incomplete-event-size", "32768"]
