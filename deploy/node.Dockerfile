# The node: `dicom-node serve` (DICOM listener, web app and API, completion, routing, deliveries; the models
# too when it runs them itself). Python 3.11, torch 2.13.0 CPU build (a node runs models on its CPU, if at
# all: GPU inference belongs to worker.Dockerfile). Runs as the unprivileged user dicom-node (uid 10001).
#
#   docker build -f deploy/node.Dockerfile -t dicom-node:0.1.0 .      (from the repository root)
#
# Settings come from DICOM_NODE_* environment variables (docs/configuration.md) or a file mounted at
# /etc/dicom-node/node.yaml; the data directory is the volume /var/lib/dicom-node.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The PyTorch index of CPU-only wheels: torch 2.13.0+cpu, without the CUDA libraries of the default wheel.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/dicom-node/venv \
 && /opt/dicom-node/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY pyproject.toml README.md LICENSE /src/
COPY dicom_node /src/dicom_node
COPY workers /src/workers
# [worker]: the models (MONAI, ONNX Runtime on the CPU), so that the node can run them embedded and
# `dicom-node rules test --image` can check images; torch==2.13.0 is already satisfied by the CPU build.
RUN /opt/dicom-node/venv/bin/pip install "/src[worker]"

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/dicom-node --shell /usr/sbin/nologin dicom-node \
 && install -d -o dicom-node -g dicom-node -m 0750 /var/lib/dicom-node /etc/dicom-node
COPY --from=build /opt/dicom-node/venv /opt/dicom-node/venv
ENV PATH=/opt/dicom-node/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    DICOM_NODE_DATA_DIR=/var/lib/dicom-node \
    DICOM_NODE_DICOM__BIND_ADDRESS=0.0.0.0 \
    DICOM_NODE_WEB__HOST=0.0.0.0
USER 10001:10001
WORKDIR /var/lib/dicom-node
VOLUME ["/var/lib/dicom-node"]
# DICOM (dicom.port; 104 would need a privilege the image does not have) and the web app (web.port).
EXPOSE 11112 8080
# SIGTERM: the node stops in queue.stop_grace_seconds (15 s) plus a few seconds; give it 45 s
# (`docker stop -t 45`, compose's stop_grace_period), more than Docker's default of 10 s.
STOPSIGNAL SIGTERM
# Ready: /readyz of the running node answers 200 (database at the schema head, DICOM listener up), asked
# on the port and with the health token of the same settings.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD ["dicom-node", "serve", "--check"]
CMD ["dicom-node", "serve"]
