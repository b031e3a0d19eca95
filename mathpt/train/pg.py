"""Policy-gradient training (REINFORCE without baseline, with group-mean baseline, GRPO-clip).

Each step: the inference worker samples ``group_size`` responses for each of
``rollout_batch_size / group_size`` train prompts; rewards become group-normalized advantages;
``pg_update`` takes one or more optimizer steps on the batch (GRPO-clip's old log-probs are
captured from the generating weights before any update on it); the new weights go to the worker.
With ``staleness: 1`` batch k+1 is generated with weights k while the trainer learns on batch k.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from mathpt.engines.base import Generation, SamplingConfig
from mathpt.functional import compute_group_normalized_rewards
from mathpt.io import MathptError
from mathpt.optim import make_optimizer
from mathpt.prompts import stop_strings
from mathpt.rewards import get_reward_fn
from mathpt.runtime import InferenceClient
from mathpt.tracking import RunLogger
from mathpt.train.common import (
    EvalTracker,
    clear_state,
    client_kwargs,
    load_policy,
    load_prompts,
    load_state,
    save_final_checkpoint,
    save_state,
    score,
    val_params,
    wandb_kwargs,
)
from mathpt.train.steps import pg_update

log = logging.getLogger("mathpt.train.pg")


def rollout_batch(generations: list[Generation], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / labels / response_mask (B, T) from the engine's own token ids (no re-tokenizing,
    so the trainer scores exactly the tokens that were sampled)."""
    seqs, starts = [], []
    for g in generations:
        if not g.prompt_token_ids:
            raise MathptError("the inference engine returned no prompt token ids; cannot build a PG batch")
        seqs.append(list(g.prompt_token_ids) + list(g.token_ids))
        starts.append(len(g.prompt_token_ids))
    width = max(len(s) for s in seqs) - 1
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, starts, strict=True)):
        t = torch.tensor(s, dtype=torch.long)
        input_ids[i, : len(s) - 1] = t[:-1]
        labels[i, : len(s) - 1] = t[1:]
        mask[i, p - 1 : len(s) - 1] = True
    return {"input_ids": input_ids, "labels": labels, "response_mask": mask}


def train_pg(cfg: dict, *, init_dir: str, train_prompts_path: str, val_prompts_path: str, out_dir: str,
             run_dir: str, state_dir: str, wandb_cfg: dict | None = None, group: str = "mathpt",
              log_config: dict | None = None) -> dict:
    """Train one PG variant (``cfg['pg']['loss_type']``) from ``init_dir``; write an HF checkpoint."""
    pg, seed, style = cfg["pg"], cfg["seed"], cfg["prompt_style"]
    model, tokenizer, worker_device = load_policy(cfg, init_dir)
    optimizer = make_optimizer(model, pg)  # fp32 master weights when the model is bf16
    resumed = load_state(state_dir, model, optimizer, None)
    start = resumed["step"] if resumed else 0

    prompts = load_prompts(train_prompts_path)
    group_size = pg["group_size"]
    n_prompts = pg["rollout_batch_size"] // group_size
    reward_fn = get_reward_fn(style)
    stop = stop_strings(style)
    staleness = pg.get("staleness", 0)

    def batch_rows(step: int) -> list[dict]:
        rng = np.random.default_rng([seed, step])  # the same prompts for a step across reruns/resumes
        return [prompts[i] for i in rng.choice(len(prompts), size=n_prompts, replace=len(prompts) < n_prompts)]

    def sampling(step: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=pg["max_new_tokens"], temperature=pg.get("temperature", 1.0),
                              n=group_size, stop=tuple(stop), seed=seed * 1_000_003 + step)

    name = os.path.basename(os.path.normpath(out_dir))
    logger = RunLogger(run_dir, name=name, group=group, config=log_config or cfg, fresh=start == 0,
                       resume_step=start or None, **wandb_kwargs(wandb_cfg))
    val = load_prompts(val_prompts_path)
    with logger, InferenceClient(**client_kwargs(cfg, init_dir, worker_device)) as client:
        evals = EvalTracker(client, val, reward_fn, val_params(pg.get("val_max_new_tokens", 256), stop), logger)
        rollouts: dict[int, tuple[int, list[dict]]] = {}

        def submit_rollout(step: int) -> None:
            rows = batch_rows(step)
            rollouts[step] = (client.submit("rollout", [r["prompt"] for r in rows], sampling(step), step=step), rows)

        if start > 0:  # resumed: the worker loaded the init checkpoint (version 0)
            client.push_weights(model, version=start)
        if start == 0:
            evals.pending.add(client.submit("eval", evals.prompts, evals.params, step=0))
        submit_rollout(start)
        bar = tqdm(range(start, pg["n_steps"]), desc=f"pg {name}", initial=start, total=pg["n_steps"])
        for step in bar:
            t_step = time.perf_counter()
            if staleness >= 1 and step + 1 < pg["n_steps"]:
                submit_rollout(step + 1)  # generated with the current weights while we learn on this batch
            job_id, rows = rollouts.pop(step)
            t_wait = time.perf_counter()
            result = evals.stash.pop(job_id, None) or client.wait(job_id)
            idle_s = time.perf_counter() - t_wait
            if result.error:
                raise MathptError(f"rollout generation for step {step} failed: {result.error}")
            if step - result.weight_version > staleness:
                raise MathptError(f"rollouts for step {step} came from weights v{result.weight_version}, "
                                  f"staler than the configured bound ({staleness})")
            evals.drain()

            gens = result.generations
            answers = [r["answer"] for r in rows for _ in range(group_size)]
            advantages, raw_rewards, reward_meta = compute_group_normalized_rewards(
                reward_fn, [g.text for g in gens], answers, group_size,
                pg.get("advantage_eps", 1e-6), pg.get("normalize_by_std", True))
            batch = rollout_batch(gens, tokenizer.pad_token_id)
            raw_rewards = torch.as_tensor(raw_rewards, dtype=torch.float32).flatten()
            batch["raw_rewards"] = raw_rewards
            batch["advantages"] = torch.as_tensor(advantages, dtype=torch.float32).flatten()
            t_train = time.perf_counter()
            metrics = pg_update(
                model, optimizer, batch, loss_type=pg["loss_type"], cliprange=pg.get("cliprange", 0.2),
                epochs=pg.get("epochs_per_batch", 1), minibatch_size=pg.get("minibatch_size", len(gens)),
                microbatch_size=pg.get("microbatch_size", len(gens)), max_grad_norm=pg.get("max_grad_norm"),
                loss_aggregation=pg.get("loss_aggregation", "seq_mean"), autocast_dtype=None,
                normalize_constant=pg["max_new_tokens"], seed=seed * 1_000_003 + step)
            metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            train_s = time.perf_counter() - t_train
            done = step + 1
            handoff_s = client.push_weights(model, version=done)
            if staleness == 0 and done < pg["n_steps"]:
                submit_rollout(done)
            step_s = time.perf_counter() - t_step
            rollout_stats = score(gens, answers, reward_fn)
            metrics.update({
                "reward_mean": rollout_stats["reward"], "reward_std": float(raw_rewards.std(unbiased=False)),
                "format_reward": rollout_stats["format_reward"], "answer_reward": rollout_stats["answer_reward"],
                "response_length_mean": rollout_stats["response_length_mean"],
                "response_length_max": rollout_stats["response_length_max"],
                "truncated_fraction": rollout_stats["truncated_fraction"],
                "lr": optimizer.param_groups[0]["lr"], "generation_s": result.elapsed_s,
                "handoff_s": handoff_s, "trainer_idle_s": idle_s, "trainer_idle_fraction": idle_s / step_s,
                "train_time_s": train_s, "step_time_s": step_s, "rollout_weight_version": result.weight_version,
                "tokens_per_s": int(batch["response_mask"].sum()) / max(train_s, 1e-9),
            })
            metrics.update({f"reward_meta/{k}": v for k, v in reward_meta.items() if isinstance(v, (int, float))})
            logger.log(metrics, step=done)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
            if done % pg.get("eval_every", 20) == 0 or done == pg["n_steps"]:
                evals.pending.add(client.submit("eval", evals.prompts, evals.params, step=done))
            if done % pg.get("checkpoint_every", 20) == 0 and done < pg["n_steps"]:
                save_state(state_dir, model, optimizer, None, done)
        evals.finish()
    save_final_checkpoint(model, tokenizer, out_dir, cfg, [init_dir, train_prompts_path])
    clear_state(state_dir)
    return {"steps": pg["n_steps"]}
