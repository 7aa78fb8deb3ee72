# syntax=docker/dockerfile:1
# Two images from one source tree:
#   docker build --target operator -t ddl-operator:0.1.0 .   the operator (no torch, ~150 MB)
#   docker build --target worker   -t ddl-worker:0.1.0 .     training image with the native
#                                                            CUDA/NCCL allreduce extension
# Base images are pinned by version; bump them deliberately (torch must match the worker's).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG TORCH_DEVEL_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel
ARG TORCH_RUNTIME_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime

# ---- operator ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY operator/ operator/
COPY worker/ worker/
COPY localcluster/ localcluster/
# DDL_NATIVE=0: the operator needs no native extension, so its build needs no torch.
RUN python -m venv /opt/venv \
    && DDL_NATIVE=0 /opt/venv/bin/pip install ".[operator]"

FROM ${PYTHON_IMAGE} AS operator
COPY --from=operator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 ddl \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin ddl
USER 10001:10001
# /metrics and kopf's /healthz (the chart's metrics.port and health.port).
EXPOSE 9090 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["ddl-operator"]
CMD ["--all-namespaces", "--metrics-port", "9090", "--liveness-port", "8080"]

# ---- worker --------------------------------------------------------------------------------
# Compiles the extension where nvcc and NCCL's headers are (the devel image) and ships only
# the wheel to the runtime image, which has the same torch and CUDA libraries in the same place.
FROM ${TORCH_DEVEL_IMAGE} AS worker-build
# Turing to Blackwell; override with --build-arg TORCH_CUDA_ARCH_LIST=9.0 for one target.
ARG TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    DDL_NATIVE_CUDA=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAX_JOBS=8
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY native/ native/
COPY operator/ operator/
COPY worker/ worker/
COPY localcluster/ localcluster/
# --no-build-isolation: the extension builds against the image's torch, not a fresh download.
RUN pip install ninja \
    && pip wheel --no-build-isolation --no-deps --wheel-dir /wheels .

FROM ${TORCH_RUNTIME_IMAGE} AS worker
COPY --from=worker-build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/ddl_operator-*.whl)[worker]" \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 ddl \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/ddl ddl
WORKDIR /workspace
# The examples' manifests run `examples/train_resnet.py` from here.
COPY --chown=10001:10001 examples/ examples/
ENV PYTHONUNBUFFERED=1
USER 10001:10001
# The agent serves /metrics on 9400 (the worker container's `metrics` port).
EXPOSE 9400
# No HEALTHCHECK: Kubernetes ignores it, and the agent's health is the pod's phase and report.
CMD ["python", "-m", "ddl_worker"]
