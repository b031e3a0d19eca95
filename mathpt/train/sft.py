"""Supervised fine-tuning on teacher traces, with periodic validation through the inference worker.

The loop is short on purpose: each epoch visits the tokenized examples in an order drawn from
(run seed, epoch), so training seeds differ in data order as well as in initialization noise;
an optimizer step takes the next ``microbatch_size x microbatches_per_step`` examples and cuts them
into microbatches by a token budget (packed into padding-free rows by default, see
``mathpt.train.packing``); ``sft_update`` does the math (the loss is the mean NLL per response
token of the step, so the cut does not change the gradient). Validation runs in the worker process
on the latest weights while the trainer keeps stepping; eval results are drained without blocking
and logged at the step their weights came from.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from mathpt.prompts import stop_strings
from mathpt.rewards import get_reward_fn
from mathpt.runtime.memory import resolve_memory
from mathpt.shards import load_sft_examples, read_index
from mathpt.train.batching import microbatch_cuts, response_lengths
from mathpt.train.run import start_run
from mathpt.train.settings import SFTSettings
from mathpt.train.steps import sft_update
from mathpt.train.validation import val_params


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` of run ``seed`` visits the ``n`` examples: a permutation
    drawn from the seed sequence (seed, epoch), the same on every rerun and resume."""
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))


def step_microbatches(
    examples: dict[str, torch.Tensor],
    rows: torch.Tensor,
    microbatch_size: int,
    microbatch_tokens: int | None,
    packing: bool,
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The microbatches of one optimizer step over ``rows`` of ``examples``, and its real tokens.

    ``microbatch_tokens`` None: ``microbatch_size`` rows at a time in the given order. Otherwise
    rows are grouped longest first under a budget of ``microbatch_tokens`` tokens: real tokens when
    ``packing`` (each microbatch then runs as one padding-free row), rows x longest row when not.
    """
    lengths = response_lengths(examples["response_mask"][rows])
    # a token budget caps no rows (tokenize.microbatch_size is the step's unit, not a microbatch's)
    max_rows = microbatch_size if microbatch_tokens is None else None
    groups = microbatch_cuts(lengths, max_rows, microbatch_tokens, packed=packing)
    return [{k: v[rows[g]] for k, v in examples.items()} for g in groups], int(lengths.sum())


def train_sft(
    cfg: dict,
    *,
    init_dir: str,
    shards_dir: str,
    val_prompts_path: str,
    out_dir: str,
    run_dir: str,
    state_dir: str,
    wandb_cfg: dict | None = None,
    group: str = "mathpt",
    log_config: dict | None = None,
    threads: int | None = None,
) -> dict:
    """Train ``cfg['sft']`` from ``init_dir`` on the shards; write an HF checkpoint to ``out_dir``."""
    index = read_index(shards_dir, verify=False)
    # fills `auto` memory settings; refuses what cannot fit (the longest example runs alone)
    memory = resolve_memory(cfg, init_dir, index["max_seq_len"])
    s = SFTSettings.from_config(cfg)  # the one reading of the slice's settings
    examples = load_sft_examples(shards_dir)
    n_examples = examples["input_ids"].shape[0]
    micro = index["microbatch_size"]  # tokenize.microbatch_size
    rows_per_step = micro * s.microbatches_per_step
    steps_per_epoch = math.ceil(n_examples / rows_per_step)
    total_steps = steps_per_epoch * s.epochs
    run = start_run(
        cfg,
        s,
        memory,
        total_steps=total_steps,
        optimizer_steps=total_steps,
        init_dir=init_dir,
        inputs=[init_dir, shards_dir],
        out_dir=out_dir,
        run_dir=run_dir,
        state_dir=state_dir,
        wandb_cfg=wandb_cfg,
        group=group,
        log_config=log_config,
        threads=threads,
    )
    model, start = run.model, run.start
    clipped_steps = run.resumed.get("clipped_steps", 0) if run.resumed else 0
    reward_fn = get_reward_fn(s.prompt_style)
    stop = stop_strings(s.prompt_style)
    with run.serve(val_prompts_path, reward_fn, val_params(s.val_max_new_tokens, stop)) as evals:
        if start == 0:
            evals.submit(model, step=0)
        bar = run.steps("sft")
        for step in bar:
            evals.drain()
            epoch, i = divmod(step, steps_per_epoch)
            rows = epoch_order(n_examples, s.seed, epoch)[i * rows_per_step : (i + 1) * rows_per_step]
            mbs, real_tokens = step_microbatches(examples, rows, micro, s.microbatch_tokens, s.packing)
            t0 = time.perf_counter()
            metrics = sft_update(
                model,
                run.optimizer,
                mbs,
                max_grad_norm=s.max_grad_norm,
                autocast_dtype=None,
                packing=s.packing,
            )
            run.scheduler.step()
            dt = time.perf_counter() - t0
            clipped_steps += int(metrics["grad_clipped"])
            metrics.update(
                lr=run.scheduler.get_last_lr()[0],
                epoch=epoch,
                step_time_s=dt,
                tokens_per_s=metrics["tokens"] / max(dt, 1e-9),
                microbatches=len(mbs),
                real_tokens=real_tokens,
                real_tokens_per_s=real_tokens / max(dt, 1e-9),
                grad_clipped_fraction=clipped_steps / (step + 1),
            )
            run.logger.log(metrics, step=step + 1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            done = step + 1
            if done % s.eval_every == 0 or done == total_steps:
                evals.submit(model, step=done)
            if done % s.checkpoint_every == 0 and done < total_steps:
                run.save_state(done, {"clipped_steps": clipped_steps})
        run.finish(clipped_steps=clipped_steps)
    return {"steps": total_steps}
