# Press on a CUDA runtime.
#   docker build -t press .
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models press --model /models/diffusiongemma-26B-A4B-it
#   docker build --build-arg PRESS_EXTRAS=[ray] -t press:ray .     (with Ray Serve)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PRESS_HOST=0.0.0.0 PRESS_PORT=8000 PRESS_CACHE_DIR=/cache HF_HOME=/cache/hf
# Distribution packages follow the base image's release; pinning them would break on every security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CUDA 12 build of torch from PyPI, pinned; then the project with its pinned dependencies.
RUN pip install torch==2.11.0
COPY pyproject.toml README.md constraints.txt ./
COPY engine ./engine
COPY server ./server
COPY configs ./configs
COPY models/tiny-sudoku ./models/tiny-sudoku
# PRESS_EXTRAS=[ray] adds Ray Serve, for `press serve --ray` and the KubeRay manifest in docker/kuberay/.
ARG PRESS_EXTRAS=""
RUN pip install -c constraints.txt ".${PRESS_EXTRAS}"
ENV PRESS_SHIPPED_MODELS=/app/models

RUN useradd --create-home --uid 10001 press && mkdir -p /models /cache && chown 10001 /models /cache
USER 10001
VOLUME ["/models", "/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["press", "serve"]
CMD ["--config", "/app/configs/tiny-sudoku.yaml"]
