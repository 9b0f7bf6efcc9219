# A GPU worker: `dicom-node worker --queues gpu`, one per GPU. CUDA base image, Python 3.11, torch 2.13.0
# CUDA build: the Linux x86_64 wheel of torch 2.13.0 on PyPI is built for CUDA 13.0 and installs the CUDA
# 13.0 user-space libraries (cuBLAS, cuFFT, ... as cuda-toolkit 13.0.3 wheels) and cuDNN 9.20 itself,
# so the base is NVIDIA's small "base" flavour (the "runtime" one would hold a second copy of the
# libraries). The host needs an NVIDIA driver for CUDA 13.0 (580 or later) and the NVIDIA Container
# Toolkit. Runs as the unprivileged user dicom-node (uid 10001).
#
#   docker build -f deploy/worker.Dockerfile -t dicom-node-worker:0.1.0 .      (from the repository root)
#
# Settings come from DICOM_NODE_* environment variables: the node's database_url and queue.broker_url,
# and worker.node_access=http with worker.node_url and a worker token (no shared file system needed).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
# uv installs a standalone CPython 3.11 (Ubuntu 24.04 has only 3.12) and the packages.
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1
RUN uv python install 3.11 \
 && uv venv --python 3.11 /opt/dicom-node/venv \
 && uv pip install --python /opt/dicom-node/venv/bin/python torch==2.13.0
COPY pyproject.toml README.md LICENSE /src/
COPY dicom_node /src/dicom_node
COPY workers /src/workers
# [worker]: MONAI and the models; ONNX models run on the CPU (onnxruntime, not onnxruntime-gpu).
RUN uv pip install --python /opt/dicom-node/venv/bin/python "/src[worker]"

FROM ${CUDA_IMAGE}
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/dicom-node --shell /usr/sbin/nologin dicom-node \
 && install -d -o dicom-node -g dicom-node -m 0750 /var/lib/dicom-node /etc/dicom-node
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/dicom-node/venv /opt/dicom-node/venv
ENV PATH=/opt/dicom-node/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    DICOM_NODE_DATA_DIR=/var/lib/dicom-node \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /var/lib/dicom-node
# A worker's data directory holds only its cache of series fetched from the node (worker.cache_max_mb).
VOLUME ["/var/lib/dicom-node"]
STOPSIGNAL SIGTERM
# Alive: this container's worker answers a Celery ping over the broker. Loading the models comes before
# consuming, hence the long start period.
HEALTHCHECK --interval=60s --timeout=20s --start-period=300s --retries=3 CMD ["dicom-node", "worker", "--check"]
CMD ["dicom-node", "worker", "--queues", "gpu"]
