# TurboQuant CUDA worker: torch 2.13.0 built for CUDA 12.8, bitsandbytes' CUDA kernels, the format runtimes
# (llama.cpp stays a CPU build: GGUF validation is placed on the cpu pool).
# Build from the project root: docker build -f infra/worker-cuda.Dockerfile .
# Run with a GPU: compose reserves one (deploy.resources.reservations.devices), or `docker run --gpus 1`.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential cmake git \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/turboquant
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY flows ./flows
COPY tasks ./tasks
# The CUDA build of the pinned torch first; the constraint torch==2.13.0 then accepts it (2.13.0+cu128).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 \
 && CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir -c constraints.txt -e '.[test]'
COPY deployments ./deployments
COPY params.yaml dvc.yaml ./
COPY .dvc ./.dvc

ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TURBOQUANT_HOME=/opt/turboquant \
    OMP_WAIT_POLICY=PASSIVE
CMD ["prefect", "worker", "start", "--pool", "cuda", "--type", "process"]
