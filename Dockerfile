# GPU image: CUDA base, the package with its GPU extra (vLLM), runs the full experiment.
#   docker build -t mathpt .
#   docker run --gpus all --ipc=host -e DEEPSEEK_API_KEY \
#       -v "$PWD/results:/app/results" -v "$HOME/.cache/huggingface:/root/.cache/huggingface" mathpt
# --ipc=host (or a large --shm-size, e.g. 16g): vLLM and NCCL move tensors through /dev/shm, and
#   Docker's default 64 MiB makes them fail or hang.
# -v .../results: the pipeline's outputs (tables, plots, checkpoints, logs); without a volume they
#   vanish with the container. The Hugging Face cache volume keeps model and dataset downloads.
# A local GSM8K copy instead of the hub: -v /path/to/gsm8k:/data/gsm8k -e MATHPT_GSM8K_DIR=/data/gsm8k
# Another config: append e.g. `snakemake all --cores all --configfile config/qwen2.5-math-1.5b-1gpu.yaml
#   --resources gpu=1` (one GPU).
# CUDA 13.0 base: vLLM 0.26.0 pins torch 2.11.0, whose PyPI wheels are built for CUDA 13.0 (and bring
# their own CUDA libraries, cuDNN included). The host needs an NVIDIA driver >= 580 (CUDA 13.0's
# minimum); the lent H100/H200 machines run 580.159. Python 3.12 (Ubuntu 24.04), as on those machines.
FROM nvidia/cuda:13.0.1-devel-ubuntu24.04

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
VOLUME ["/app/results"]

CMD ["snakemake", "all", "--cores", "all", "--configfile", "config/qwen2.5-math-1.5b.yaml", "--resources", "gpu=2"]
