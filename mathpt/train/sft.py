"""Supervised fine-tuning on teacher traces, with periodic validation through the inference worker.

The loop is short on purpose: microbatches come from the tokenized shards, ``sft_update`` does the
math (mathpt.functional), and validation runs in the worker process on the latest weights while
the trainer keeps stepping; eval results are drained without blocking and logged at the step
their weights came from.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
from tqdm import tqdm

from mathpt.optim import make_optimizer
from mathpt.prompts import stop_strings
from mathpt.rewards import get_reward_fn
from mathpt.runtime import InferenceClient
from mathpt.shards import iter_sft_shards
from mathpt.tracking import RunLogger
from mathpt.train.common import (
    EvalTracker,
    clear_state,
    client_kwargs,
    load_policy,
    load_prompts,
    load_state,
    lr_schedule,
    save_final_checkpoint,
    save_state,
    val_params,
    wandb_kwargs,
)
from mathpt.train.steps import sft_update

log = logging.getLogger("mathpt.train.sft")


def train_sft(cfg: dict, *, init_dir: str, shards_dir: str, val_prompts_path: str, out_dir: str,
              run_dir: str, state_dir: str, wandb_cfg: dict | None = None, group: str = "mathpt",
              log_config: dict | None = None) -> dict:
    """Train ``cfg['sft']`` from ``init_dir`` on the shards; write an HF checkpoint to ``out_dir``."""
    sft, seed = cfg["sft"], cfg["seed"]
    model, tokenizer, worker_device = load_policy(cfg, init_dir)

    microbatches = list(iter_sft_shards(shards_dir))
    per_step = sft.get("microbatches_per_step", 1)
    steps_per_epoch = math.ceil(len(microbatches) / per_step)
    total_steps = steps_per_epoch * sft["epochs"]
    optimizer = make_optimizer(model, sft)  # fp32 master weights when the model is bf16
    scheduler = lr_schedule(optimizer, sft.get("warmup_steps", 0), total_steps)
    resumed = load_state(state_dir, model, optimizer, scheduler)
    start = resumed["step"] if resumed else 0

    val = load_prompts(val_prompts_path)
    style = cfg["prompt_style"]
    reward_fn = get_reward_fn(style)
    params = val_params(sft.get("val_max_new_tokens", 256), stop_strings(style))
    eval_every = sft.get("eval_every", 100)

    def order(epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        return torch.randperm(len(microbatches), generator=g).tolist()

    name = os.path.basename(os.path.normpath(out_dir))
    logger = RunLogger(run_dir, name=name, group=group, config=log_config or cfg, fresh=start == 0,
                       resume_step=start or None, **wandb_kwargs(wandb_cfg))
    with logger, InferenceClient(**client_kwargs(cfg, init_dir, worker_device)) as client:

        evals = EvalTracker(client, val, reward_fn, params, logger)
        if start == 0:
            evals.submit(model, step=0)
        bar = tqdm(range(start, total_steps), desc=f"sft {name}", initial=start, total=total_steps)
        for step in bar:
            evals.drain()
            epoch, i = divmod(step, steps_per_epoch)
            idx = order(epoch)[i * per_step:(i + 1) * per_step]
            t0 = time.perf_counter()
            metrics = sft_update(model, optimizer, [microbatches[j] for j in idx],
                                 max_grad_norm=sft.get("max_grad_norm"), autocast_dtype=None)
            scheduler.step()
            dt = time.perf_counter() - t0
            metrics.update(lr=scheduler.get_last_lr()[0], epoch=epoch, step_time_s=dt,
                           tokens_per_s=metrics.get("tokens", 0) / max(dt, 1e-9))
            logger.log(metrics, step=step + 1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            done = step + 1
            if done % eval_every == 0 or done == total_steps:
                evals.submit(model, step=done)
            if done % sft.get("checkpoint_every", 100) == 0 and done < total_steps:
                save_state(state_dir, model, optimizer, scheduler, done)
        evals.finish()
    save_final_checkpoint(model, tokenizer, out_dir, cfg, [init_dir, shards_dir])
    clear_state(state_dir)
    return {"steps": total_steps}
