# The inference gateway: gunicorn serving the real handlers (mocks with INFERENCE_ENABLE_MOCKS=1), with the model weights, on port 8900.
# See docs/deployment.md.
#   docker build -t hippocampus-inference .                                        # CPU torch
#   docker build --build-arg TORCH_VARIANT=cu128 -t hippocampus-inference:cuda .   # CUDA torch
# TORCH_VARIANT names a wheel index under https://download.pytorch.org/whl/ (cpu, cu126, cu128, ...)
# that publishes the torch version pinned in requirements.txt.
FROM python:3.11-slim-bookworm

ARG TORCH_VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONPATH=/app \
    INFERENCE_HOST=0.0.0.0 \
    INFERENCE_PORT=8900 \
    INFERENCE_OUTPUT_ROOT=/var/lib/inference/jobs \
    INFERENCE_MODEL_CACHE=/var/lib/inference/model-cache \
    INFERENCE_PACS_ROOT=/var/lib/inference/pacs

# The server runs as an unprivileged user; it may write only its job outputs (and the DICOM node's spool,
# and the exported ONNX graphs of its models).
RUN groupadd --system --gid 10001 inference \
    && useradd --system --uid 10001 --gid inference --create-home --home-dir /home/inference \
       --shell /usr/sbin/nologin inference \
    && mkdir -p /var/lib/inference/jobs /var/lib/inference/pacs /var/lib/inference/model-cache \
    && chown -R inference:inference /var/lib/inference

WORKDIR /app

# Dependencies before code: this layer (torch included) is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install --no-cache-dir \
        --extra-index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        -r requirements.txt

# Code, configuration, model weights (models/hippocampus_unet.pt) and the DICOM node's default routing
# rules (deploy/routing-rules.yaml, INFERENCE_PACS_RULES' default); .dockerignore keeps tests, outputs
# and caches out. Owned by root, so the server cannot change its own code. The code runs from /app
# (PYTHONPATH above, in place of `pip install -e .`): `celery -A worker` keeps no folder on sys.path.
COPY . .

USER 10001:10001
EXPOSE 8900

# Healthy only once /healthcheck answers READY (the handlers are warmed up); no curl needed.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "healthcheck.py"]

# The same command as `make serve`: every setting comes from INFERENCE_* variables (inference/config.py).
CMD ["gunicorn", "-c", "gunicorn.conf.py"]
