# An image in which `python -m launcher` works (CPU or GPU hosts; torch is the CUDA build).
#   make docker && docker run --rm launcher:latest scale=smoke
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1
# g++: DeepSpeed JIT-builds its ops (on CPU, a shared-memory communication op) at the first run
RUN apt-get update && apt-get install -y --no-install-recommends make g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY launcher ./launcher
COPY recipes ./recipes
COPY conf ./conf
# torch + torchvision first, as a pair, then the rest under the same pins (see constraints.txt), with
# the engines (DeepSpeed): `make setup`'s lines without the dev and bench extras (tests/unit/test_docker.py)
RUN pip install --no-cache-dir -c constraints.txt torch torchvision \
 && pip install --no-cache-dir -c constraints.txt -e '.[deepspeed]'
WORKDIR /work
ENTRYPOINT ["python", "-m", "launcher"]
CMD ["--help"]
