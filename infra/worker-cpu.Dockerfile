# TurboQuant CPU worker: the engine, every format's runtime (llama.cpp is built from source by llama-cpp-python)
# and Prefect. Build from the project root: docker build -f infra/worker-cpu.Dockerfile .
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/turboquant
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY flows ./flows
COPY tasks ./tasks
# torch==2.13.0 from the CPU index: the default index would pull the CUDA build's several GB of wheels.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir -c constraints.txt -e '.[test]'
COPY deployments ./deployments
COPY params.yaml dvc.yaml ./
COPY .dvc ./.dvc

ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TURBOQUANT_HOME=/opt/turboquant \
    OMP_WAIT_POLICY=PASSIVE
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
