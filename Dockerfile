# GPU image: CUDA base, the package with its GPU extra (vLLM), runs the full experiment.
#   docker build -t mathpt .
#   docker run --gpus all -e DEEPSEEK_API_KEY -v $PWD/results:/app/results mathpt
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev git graphviz build-essential && \
    rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY mathpt ./mathpt
RUN pip install -U pip && pip install -e ".[gpu]"
COPY . .

CMD ["snakemake", "--cores", "all", "--configfile", "config/qwen2.5-math-1.5b.yaml", "--resources", "gpu=2", "all"]
