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
# PROMETHEUS_MULTIPROC_DIR, an empty writable folder: see deploy/README.md).

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
FROM python AS cpu-venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py /tmp/requirements.py
RUN python -m venv /opt/venv \
    && python /tmp/requirements.py cpu > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY service ./service
RUN pip install --no-deps . && rm -rf /src/build

# ---- GPU service: CUDA + cuDNN runtime, onnxruntime-gpu -----------------------------------
FROM ${CUDA_IMAGE} AS gpu-venv
ARG ONNXRUNTIME_GPU_VERSION
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py /tmp/requirements.py
RUN python3 -m venv /opt/venv \
    && python3 /tmp/requirements.py gpu > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt \
        "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"
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
CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000"]

# ---- Trainer: PyTorch (CPU build by default) + the train package --------------------------
FROM python AS train
# The CPU wheels of torch; a CUDA trainer: --build-arg TORCH_INDEX_URL=.../whl/cu130
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV MPLCONFIGDIR=/tmp/matplotlib TORCH_HOME=/tmp/torch
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py /tmp/requirements.py
RUN python -m venv /opt/venv \
    && python /tmp/requirements.py cpu train > /tmp/requirements.txt \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt
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
CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000"]
