"""Set-up shared by the SFT and policy-gradient loops: the policy on its device, the inference
worker's arguments, W&B arguments, seeding, the learning-rate schedule. Resumable state and the
final checkpoint live in ``mathpt.train.state``, validation in ``mathpt.train.validation``."""

from __future__ import annotations

import logging
import math
import os
import random

import numpy as np
import torch

log = logging.getLogger("mathpt.train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_policy(cfg: dict, init_dir: str) -> tuple[torch.nn.Module, object, str]:
    """Seeded model + tokenizer from ``init_dir`` on the trainer's device, in train mode.

    Returns (model, tokenizer, worker_device): the layout decides where the trainer and the
    inference worker run. On CUDA each decoder layer is compiled (~30% faster, less activation
    memory: BENCHMARKS.md).
    """
    from mathpt.gpus import devices_for
    from mathpt.models import load_model, load_tokenizer
    from mathpt.runtime.worker import WORKER_THREADS_ENV, share_cpu_threads
    from mathpt.train.compile import compile_if_cuda

    set_seed(cfg["seed"])
    trainer_device, worker_device = devices_for(cfg["runtime"]["layout"])
    if worker_device == "cpu" and not os.environ.get(WORKER_THREADS_ENV):
        # The worker shares this machine's cores: split them once (scripts/train.py does it with the
        # rule's threads); two processes with all cores each ran a PG step 10-30x slower.
        share_cpu_threads(torch.get_num_threads())
    model = load_model(init_dir, dtype=DTYPES[cfg["dtype"]], device=trainer_device)
    model.train()
    compile_if_cuda(model)
    return model, load_tokenizer(init_dir), worker_device


def wandb_kwargs(wandb_cfg: dict | None) -> dict:
    """RunLogger's W&B arguments from the config's ``wandb`` block (disabled when absent)."""
    w = wandb_cfg or {"mode": "disabled", "project": "mathpt"}
    return {"wandb_mode": w["mode"], "project": w["project"]}


def client_kwargs(cfg: dict, model_path: str, worker_device: str) -> dict:
    """InferenceClient arguments for the trainer's worker, from the ``runtime`` block."""
    from mathpt.config import engine_kwargs
    from mathpt.runtime.memory import sleep_enabled

    rt = cfg["runtime"]
    sleep = sleep_enabled(cfg)
    kwargs = engine_kwargs(rt, rt["engine"])
    if sleep and rt["engine"] == "vllm":
        kwargs["enable_sleep_mode"] = True  # vLLM's own allocator, so sleep() can release the memory
    return {
        "engine": rt["engine"],
        "model_path": model_path,
        "device": worker_device,
        "handoff": rt["handoff"],
        "engine_kwargs": kwargs,
        "sleep_when_idle": sleep,
        "heartbeat_timeout_s": rt["heartbeat_timeout_s"],
        "job_timeout_s": rt["job_timeout_s"],
        "handoff_timeout_s": rt["handoff_timeout_s"],
    }


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_schedule(
    optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1, decay: str = "cosine"
):
    """Linear warm-up (step 0 runs at lr / warmup_steps), then cosine decay to ``min_ratio`` of the
    peak learning rate, or ``decay="constant"``: the peak from the end of the warm-up on."""
    if decay not in ("cosine", "constant"):
        raise ValueError(f"lr decay {decay!r}: expected 'cosine' or 'constant'")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if decay == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
