"""Pieces shared by the SFT and policy-gradient loops: seeding, resumable state, validation jobs,
and the final checkpoint."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mathpt.engines.base import Generation, SamplingConfig
from mathpt.io import atomic_dir, atomic_write_json, read_jsonl
from mathpt.models import save_model
from mathpt.provenance import write_provenance

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
    from mathpt.train.compile import compile_layers

    set_seed(cfg["seed"])
    trainer_device, worker_device = devices_for(cfg["runtime"]["layout"])
    model = load_model(init_dir, dtype=DTYPES[cfg["dtype"]], device=trainer_device)
    model.train()
    if model.device.type == "cuda":
        compile_layers(model)
    return model, load_tokenizer(init_dir), worker_device


def wandb_kwargs(wandb_cfg: dict | None) -> dict:
    """RunLogger's W&B arguments from the config's ``wandb`` block (disabled when absent)."""
    w = wandb_cfg or {"mode": "disabled", "project": "mathpt"}
    return {"wandb_mode": w["mode"], "project": w["project"]}


def client_kwargs(cfg: dict, model_path: str, worker_device: str) -> dict:
    """InferenceClient arguments for the trainer's worker, from the ``runtime`` block."""
    from mathpt.config import engine_kwargs

    rt = cfg["runtime"]
    return {
        "engine": rt["engine"],
        "model_path": model_path,
        "device": worker_device,
        "handoff": rt["handoff"],
        "engine_kwargs": engine_kwargs(rt, rt["engine"]),
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


# ---- resumable state (kept outside Snakemake's declared outputs) ----


def save_state(
    state_dir: str | os.PathLike, model, optimizer, scheduler, step: int, extra: dict | None = None
) -> None:
    """Save everything needed to resume after ``step`` optimizer steps, atomically."""
    with atomic_dir(state_dir) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "torch_rng": torch.get_rng_state(),
            },
            tmp / "state.pt",
        )
        atomic_write_json(tmp / "state.json", {"step": step, **(extra or {})})
    log.info("saved resumable state at step %d to %s", step, state_dir)


def load_state(state_dir: str | os.PathLike, model, optimizer, scheduler) -> dict | None:
    """Restore a previous run's state if ``state_dir`` holds one; returns its json (with ``step``)."""
    state_dir = Path(state_dir)
    if not (state_dir / "state.json").exists():
        return None
    meta = json.loads((state_dir / "state.json").read_text())
    blob = torch.load(state_dir / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    log.info("resuming from %s at step %d", state_dir, meta["step"])
    return meta


def clear_state(state_dir: str | os.PathLike) -> None:
    shutil.rmtree(state_dir, ignore_errors=True)


# ---- validation on the val split through the inference worker ----


def load_prompts(path: str | os.PathLike) -> list[dict]:
    return read_jsonl(path, required_keys=("id", "prompt", "answer"))


def val_params(max_new_tokens: int, stop: list[str]) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, n=1, stop=tuple(stop))


def score(generations: list[Generation], answers: list[str], reward_fn) -> dict:
    """Mean reward components and response-length statistics of a list of generations."""
    rewards = [reward_fn(g.text, a) for g, a in zip(generations, answers, strict=True)]
    lengths = [len(g.token_ids) for g in generations]
    return {
        "reward": float(np.mean([r["reward"] for r in rewards])),
        "format_reward": float(np.mean([r["format_reward"] for r in rewards])),
        "answer_reward": float(np.mean([r["answer_reward"] for r in rewards])),
        "response_length_mean": float(np.mean(lengths)),
        "response_length_max": int(max(lengths)),
        "truncated_fraction": float(np.mean([g.truncated for g in generations])),
    }


def eval_metrics(result, answers: list[str], reward_fn) -> dict:
    """Validation metrics of a finished eval job, keyed for logging at the step it was taken at."""
    m = score(result.generations, answers, reward_fn)
    return {
        "accuracy": m["answer_reward"],
        "format_rate": m["format_reward"],
        "reward": m["reward"],
        "response_length_mean": m["response_length_mean"],
        "truncated_fraction": m["truncated_fraction"],
        "weight_version": result.weight_version,
        "generation_s": result.elapsed_s,
    }


class EvalTracker:
    """Validation jobs in flight: submitted with the weights of a step, drained without blocking,
    logged at the step their weights came from; a failed job is reported, never dropped.

    The worker runs an eval on the weights it was asked for when they are still current; when newer
    weights arrived first, the eval runs on those and is logged at their step (weight versions are
    training steps), and a second eval of weights already evaluated is not logged twice.
    """

    def __init__(self, client, val_rows: list[dict], reward_fn, params: SamplingConfig, logger):
        self.client, self.reward_fn, self.params, self.logger = client, reward_fn, params, logger
        self.prompts = [r["prompt"] for r in val_rows]
        self.answers = [r["answer"] for r in val_rows]
        self.pending: set = set()
        self.stash: dict = {}  # non-eval results that arrived while polling (rollouts)
        self.failures = 0
        self.logged_versions: set[int] = set()

    def submit(self, model, step: int) -> float:
        """Hand the current weights to the worker as version ``step`` and queue a val eval on them."""
        # the worker starts from the init checkpoint, which is version 0
        handoff_s = self.client.push_weights(model, version=step) if step > 0 else 0.0
        self.request(step)
        return handoff_s

    def request(self, step: int) -> None:
        """Queue a val eval of the weights last handed to the worker (those of ``step``)."""
        self.pending.add(self.client.submit("eval", self.prompts, self.params, step=step))

    def handle(self, results) -> None:
        for r in results:
            if r.kind != "eval":
                self.stash[r.job_id] = r
                continue
            self.pending.discard(r.job_id)
            if r.error:
                self.failures += 1
                log.error("validation job for step %d failed: %s", r.step, r.error)
                self.logger.log_eval({"failed": 1.0}, step=r.step)
                continue
            if r.weight_version in self.logged_versions:
                log.info(
                    "validation asked at step %d ran on weights v%d, already evaluated",
                    r.step,
                    r.weight_version,
                )
                continue
            self.logged_versions.add(r.weight_version)
            m = eval_metrics(r, self.answers, self.reward_fn)
            log.info(
                "validation of the weights of step %d (asked at step %d): accuracy %.4f",
                r.weight_version,
                r.step,
                m["accuracy"],
            )
            self.logger.log_eval(m, step=r.weight_version)

    def drain(self) -> None:
        self.handle(self.client.poll(kind="eval"))  # rollouts stay with whoever waits for them

    def finish(self) -> None:
        for job_id in sorted(self.pending):
            self.handle([self.client.wait(job_id)])


def save_final_checkpoint(model, tokenizer, out_dir: str | os.PathLike, cfg: dict, inputs: list) -> None:
    """Write the HF-format checkpoint (config, safetensors, tokenizer) + provenance atomically."""
    with atomic_dir(out_dir) as tmp:
        save_model(model, tokenizer, tmp)
        write_provenance(tmp / "provenance.json", cfg, inputs)
