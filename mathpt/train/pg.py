"""Policy-gradient training (REINFORCE without baseline, with group-mean baseline, GRPO-clip).

Each step: the inference worker samples ``group_size`` responses for each of
``rollout_batch_size / group_size`` train prompts; rewards become group-normalized advantages;
``pg_update`` takes one or more optimizer steps on the batch; the new weights go to the worker.
With ``staleness: 1`` batch k+1 is generated with weights k while the trainer learns on batch k.

The behaviour policy pi_old (GRPO-clip's ratio denominator, and the reference of the off-policy
metrics every variant logs) is the trainer's own forward pass under **the weights that generated
the batch** (``JobResult.weight_version``). With ``staleness: 1`` the trainer already holds newer
weights when the batch arrives, so it keeps one copy of the previous version (``Behaviour``) and
scores the batch with it before updating; the first minibatch's ratio is then pi_theta/pi_old of
the version lag, not 1. Why not the sampler's own log-probs, which the engines return for free:
they come from different kernels (vLLM's bf16 attention and sampler, or transformers' ``generate``
with a KV cache) and differ from the trainer's numbers on identical weights (measured in
``bench/bench_logprob_gap.py``; issue-14 note). A ratio against them would mix that numerical noise
into every clip decision and would not be 1 even for an on-policy batch. Keeping the weights costs
one model copy (3 GB for a 1.5B bf16 model) and one no-grad forward per batch, which GRPO-clip
paid before anyway. The numerical mismatch itself is what the optional truncated
importance-sampling correction (``off_policy_correction: tis``) addresses, for every variant:
each token's loss is weighted by min(pi_old / pi_sampler, ``tis_cap``), detached.

Sampling noise: every (run seed, step, draw, prompt, sample) has its own seed (``sample_seeds``), so
the samples of a group are independent and a rerun draws the same ones. A resume draws them too: with
``staleness: 1`` the resumable state keeps the behaviour copy, and the first batch after a resume is
generated with it (v(start - 1)), as in the uninterrupted run.

The algorithm's registry entry (``mathpt.algorithms``) picks the advantage estimator and the loss.
With dynamic sampling (DAPO) groups whose rewards are all equal are dropped and more prompts are
drawn for the same step (draw 1, 2, ... each with its own prompts and seeds) until the batch is full
or ``max_draws`` draws were made (``fill_groups``); extra draws run on the newest weights, so with
staleness 1 one batch can mix two weight versions, and its old log-probs are taken per draw.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mathpt.engines.base import Generation, SamplingConfig
from mathpt.functional import compute_group_normalized_rewards, overlong_penalty
from mathpt.io import MathptError
from mathpt.prompts import stop_strings
from mathpt.rewards import get_reward_fn
from mathpt.runtime import RolloutPipeline
from mathpt.runtime.memory import peaks_so_far, resolve_memory
from mathpt.train.batching import response_lengths
from mathpt.train.compile import compile_if_cuda
from mathpt.train.run import start_run
from mathpt.train.settings import PGSettings, UpdateSettings
from mathpt.train.steps import behaviour_log_probs, compute_old_log_probs, pg_update
from mathpt.train.validation import load_prompts, score, val_params


def sample_seeds(run_seed: int, step: int, n_prompts: int, group_size: int, draw: int = 0) -> tuple[int, ...]:
    """One 63-bit sampling seed per (prompt, sample) of step ``step``'s rollout batch, prompt-major.

    Hashed from (run seed, step, prompt index, sample index[, draw]) by numpy's SeedSequence, so no
    two samples share a noise stream (within a group, across prompts, across the extra draws of
    dynamic sampling, or shifted by one across steps, which vLLM's seed + child index gave) and a
    rerun or resume draws exactly the same samples. Draw 0 keeps the 4-number key.
    """
    extra = [draw] if draw else []
    return tuple(
        int(
            np.random.SeedSequence([run_seed, step, i, j, *extra]).generate_state(1, np.uint64)[0]
            >> np.uint64(1)
        )
        for i in range(n_prompts)
        for j in range(group_size)
    )


def fill_groups(
    draw,
    reward_fn,
    n_prompts: int,
    group_size: int,
    max_draws: int,
) -> tuple[list[dict], list[Generation], list[int], dict[str, float]]:
    """DAPO's dynamic sampling: keep the groups whose rewards differ, drawing until ``n_prompts`` are kept.

    ``draw(d) -> (rows, generations, weight_version)`` makes draw ``d`` (0 = the step's own rollouts).
    Groups whose rewards are all equal (zero advantage under every group baseline) are dropped. After
    ``max_draws`` draws a batch still short is filled with dropped groups (zero advantage, no
    gradient from them; logged as ``dynamic/groups_padded``) so every step trains on a full batch.
    Returns the batch's (rows, generations, weight version per generation, metrics).
    """
    kept: list[tuple] = []
    dropped: list[tuple] = []
    draws = 0
    while draws < max_draws and len(kept) < n_prompts:
        rows, gens, version = draw(draws)
        draws += 1
        for i, row in enumerate(rows):
            group = gens[i * group_size : (i + 1) * group_size]
            rewards = {float(reward_fn(g.text, row["answer"])["reward"]) for g in group}
            (kept if len(rewards) > 1 else dropped).append((row, group, version))
    n_kept = min(len(kept), n_prompts)
    chosen = kept[:n_prompts] + dropped[: n_prompts - n_kept]
    metrics = {
        "dynamic/draws": float(draws),
        "dynamic/groups_drawn": float(len(kept) + len(dropped)),
        "dynamic/groups_dropped": float(len(dropped)),
        "dynamic/groups_kept": float(n_kept),
        "dynamic/groups_padded": float(n_prompts - n_kept),
    }
    rows = [c[0] for c in chosen]
    gens = [g for c in chosen for g in c[1]]
    versions = [c[2] for c in chosen for _ in c[1]]
    return rows, gens, versions, metrics


def rollout_batch(generations: list[Generation], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / labels / response_mask (B, T) from the engine's own token ids (no re-tokenizing,
    so the trainer scores exactly the tokens that were sampled), and ``sampler_log_probs`` (B, T)
    aligned with labels when the engine returned its log-probs."""
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
    with_lp = all(g.logprobs is not None and len(g.logprobs) == len(g.token_ids) for g in generations)
    sampler = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, (s, p) in enumerate(zip(seqs, starts, strict=True)):
        t = torch.tensor(s, dtype=torch.long)
        input_ids[i, : len(s) - 1] = t[:-1]
        labels[i, : len(s) - 1] = t[1:]
        mask[i, p - 1 : len(s) - 1] = True
        if with_lp and generations[i].logprobs:
            sampler[i, p - 1 : len(s) - 1] = torch.tensor(generations[i].logprobs, dtype=torch.float32)
    out = {"input_ids": input_ids, "labels": labels, "response_mask": mask}
    if with_lp:
        out["sampler_log_probs"] = sampler
    return out


class Behaviour:
    """The weights that generated a rollout batch, for its old log-probs.

    With staleness 0 they are the trainer's current weights. With staleness 1 a batch may come from
    the version before, so a copy of the model is kept one version behind: ``advance`` (called
    before each update) copies the current weights into it.
    """

    def __init__(
        self, model: torch.nn.Module, version: int, keep_copy: bool, init_dir: str, dtype: torch.dtype
    ):
        from mathpt.models import load_model

        self.model, self.version = model, version
        self.copy = None
        if keep_copy:  # a fresh instance: the trainer's layers may be compiled in place
            self.copy = load_model(init_dir, dtype=dtype, device=next(model.parameters()).device)
            self.copy.load_state_dict(model.state_dict())
            self.copy.eval().requires_grad_(False)
            compile_if_cuda(self.copy)  # the same compiled layers as the trainer's (issue 27.1)
        self.copy_version = version

    def log_probs(
        self, batch: dict[str, torch.Tensor], weight_version: int, update: UpdateSettings, seed: int
    ) -> torch.Tensor | None:
        """Trainer log-probs (B, T) of the batch's labels under the weights of ``weight_version``,
        cut into the same microbatches as ``pg_update(batch, update, seed=seed)`` will cut them; None
        when those are the current weights: ``pg_update`` then takes the first optimizer step's own
        forward as pi_old (its ratio exactly 1) and scores the other rows with the same cuts."""
        if weight_version == self.version:
            return None
        if self.copy is None or weight_version != self.copy_version:
            kept = [self.version] + ([self.copy_version] if self.copy is not None else [])
            raise MathptError(f"rollouts came from weights v{weight_version}; the trainer keeps only {kept}")
        return behaviour_log_probs(self.copy, batch, update, seed)

    def log_probs_per_row(
        self, batch: dict[str, torch.Tensor], versions: list[int], update: UpdateSettings
    ) -> torch.Tensor:
        """A batch that mixes weight versions (dynamic sampling drew later groups on newer weights):
        each row under the weights that drew it, cut per version (so, unlike ``log_probs``, not with
        the update's own cuts)."""
        ver = torch.tensor(versions)
        old = torch.zeros(batch["labels"].shape)
        for v in sorted(set(versions)):
            if v == self.version:
                net = self.model
            elif self.copy is not None and v == self.copy_version:
                net = self.copy
            else:
                kept = [self.version] + ([self.copy_version] if self.copy is not None else [])
                raise MathptError(f"rollouts came from weights v{v}; the trainer keeps only {kept}")
            rows = torch.nonzero(ver == v).flatten()
            sub = {k: t[rows] for k, t in batch.items() if isinstance(t, torch.Tensor) and len(t) == len(ver)}
            old[rows] = compute_old_log_probs(
                net,
                sub,
                update.microbatch_size or len(rows),
                microbatch_tokens=update.microbatch_tokens,
                packing=update.packing,
            )
        return old

    def restore(self, state: dict, version: int) -> None:
        """Resume: the copy gets the saved weights of ``version`` (the ones that generate the next batch)."""
        with torch.no_grad():
            self.copy.load_state_dict(state)
        self.copy_version = version

    def advance(self, version: int) -> None:
        """The trainer's weights are about to move on from ``self.version`` to ``version``."""
        if self.copy is not None:
            with torch.no_grad():
                self.copy.load_state_dict(self.model.state_dict())
            self.copy_version = self.version
        self.version = version


def update_seed(run_seed: int, step: int) -> int:
    """The seed of step ``step``'s minibatch shuffle (``pg_update``'s ``seed``)."""
    return run_seed * 1_000_003 + step


# per-minibatch metrics logged as mb{i}/<key> (i = 0 is the first optimizer step on the batch)
MINIBATCH_KEYS = (
    "clip_fraction",
    "logp_gap_mean",
    "logp_gap_max",
    "kl_k3",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "grad_norm",
    "grad_clipped",
    "lr",
)


def train_pg(
    cfg: dict,
    *,
    init_dir: str,
    train_prompts_path: str,
    val_prompts_path: str,
    out_dir: str,
    run_dir: str,
    state_dir: str,
    wandb_cfg: dict | None = None,
    group: str = "mathpt",
    log_config: dict | None = None,
    threads: int | None = None,
) -> dict:
    """Train one PG variant (``cfg['pg']['loss_type']``) from ``init_dir``; write an HF checkpoint."""
    memory = resolve_memory(cfg, init_dir)  # fills `auto` memory settings; refuses what cannot fit
    s = PGSettings.from_config(cfg)  # the one reading of the slice's settings
    run = start_run(
        cfg,
        s,
        memory,
        total_steps=s.n_steps,
        optimizer_steps=s.optimizer_steps,
        init_dir=init_dir,
        inputs=[init_dir, train_prompts_path],
        out_dir=out_dir,
        run_dir=run_dir,
        state_dir=state_dir,
        wandb_cfg=wandb_cfg,
        group=group,
        log_config=log_config,
        threads=threads,
    )
    model, start = run.model, run.start
    prompts = load_prompts(train_prompts_path)
    reward_fn = get_reward_fn(s.prompt_style)
    stop = stop_strings(s.prompt_style)
    group_size, n_prompts = s.group_size, s.n_prompts

    def batch_rows(step: int, draw: int = 0) -> list[dict]:
        # the same prompts for a step (and draw) across reruns/resumes
        rng = np.random.default_rng([s.seed, step, draw] if draw else [s.seed, step])
        return [
            prompts[i] for i in rng.choice(len(prompts), size=n_prompts, replace=len(prompts) < n_prompts)
        ]

    def sampling(step: int, draw: int = 0) -> SamplingConfig:
        # The sampler's per-token log-probs cost vLLM 2-3x its throughput on one H200 (BENCHMARKS.md):
        # ask for them when TIS needs them, else only on the eval_every-th batches, to log the
        # sampler-vs-trainer gap (sampler_logp_gap_*) through the run at a small cost.
        return SamplingConfig(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            n=group_size,
            stop=tuple(stop),
            seeds=sample_seeds(s.seed, step, n_prompts, group_size, draw),
            logprobs=s.update.off_policy_correction == "tis" or step % s.eval_every == 0,
        )

    # Allocated before the worker starts (RunContext.serve): the behaviour copy of staleness 1.
    behaviour = Behaviour(model, start, s.staleness >= 1, init_dir, next(model.parameters()).dtype)
    if run.resumed and run.resumed.get("behaviour") is not None and behaviour.copy is not None:
        behaviour.restore(run.resumed["behaviour"], start - 1)
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    with run.serve(val_prompts_path, reward_fn, val_params(s.val_max_new_tokens, stop)) as evals:
        client = run.client
        rollouts = RolloutPipeline(
            client,
            sampling,
            lambda step: ([r["prompt"] for r in batch_rows(step)], {"step": step}),
            max_staleness=s.staleness,
            n_steps=s.n_steps,
        )
        if start > 0:  # resumed: the worker loaded the init checkpoint (version 0)
            if behaviour.copy is not None and behaviour.copy_version == start - 1:
                # as in the uninterrupted run, batch `start` comes from v(start - 1), queued before v(start);
                # v0 is the init checkpoint the worker already holds
                if start - 1 > 0:
                    client.push_weights(behaviour.copy, version=start - 1)
                rollouts.submit(start)
            client.push_weights(model, version=start)
        else:
            evals.request(0)
        bar = run.steps("pg")
        for step in bar:
            t_step = time.perf_counter()
            result = rollouts.get(step)  # with staleness 1 this also queues step + 1 on the current weights
            idle_s = rollouts.last_wait_s
            evals.drain()

            rows = batch_rows(step)
            gens = result.generations
            versions = [result.weight_version] * len(gens)
            draw_metrics: dict[str, float] = {}
            if s.algorithm.dynamic_sampling:

                def draw(d: int, step=step, rows=rows, result=result):
                    if d == 0:
                        return rows, result.generations, result.weight_version
                    more = batch_rows(step, d)
                    res = rollouts.extra(
                        step, [r["prompt"] for r in more], sampling(step, d), {"step": step, "draw": d}
                    )
                    return more, res.generations, res.weight_version

                rows, gens, versions, draw_metrics = fill_groups(
                    draw, reward_fn, n_prompts, group_size, s.max_draws
                )
                idle_s = rollouts.last_wait_s
            answers = [r["answer"] for r in rows for _ in range(group_size)]
            offsets = None
            if s.overlong_shaping:  # DAPO's soft overlong punishment
                buffer = max(1, round(s.overlong_buffer_fraction * s.max_new_tokens))
                lengths = torch.tensor([len(g.token_ids) for g in gens])
                offsets = overlong_penalty(lengths, s.max_new_tokens, buffer)
                draw_metrics["overlong_penalty_mean"] = float(offsets.mean())
            advantages, raw_rewards, reward_meta = compute_group_normalized_rewards(
                reward_fn,
                [g.text for g in gens],
                answers,
                group_size,
                s.advantage_eps,
                s.normalize_by_std,
                estimator=s.algorithm.advantage,
                reward_offsets=offsets,
            )
            batch = rollout_batch(gens, run.tokenizer.pad_token_id)
            raw_rewards = torch.as_tensor(raw_rewards, dtype=torch.float32).flatten()
            batch["raw_rewards"] = raw_rewards
            batch["advantages"] = torch.as_tensor(advantages, dtype=torch.float32).flatten()
            t_train = time.perf_counter()
            seed = update_seed(s.seed, step)
            if len(set(versions)) == 1:
                old = behaviour.log_probs(batch, versions[0], s.update, seed)
            else:  # dynamic sampling drew on newer weights: each row under the weights that made it
                old = behaviour.log_probs_per_row(batch, versions, s.update)
            if old is not None:
                batch["old_log_probs"] = old
            batch["weight_version"] = torch.tensor(versions)
            done = step + 1
            behaviour.advance(done)
            out = pg_update(model, run.optimizer, batch, s.update, seed=seed, scheduler=run.scheduler)
            metrics = {k: v for k, v in out.items() if isinstance(v, (int, float))}
            metrics.update(draw_metrics)
            for i, mb in enumerate(out["per_step"]):
                metrics.update({f"mb{i}/{k}": mb[k] for k in MINIBATCH_KEYS})
            train_s = time.perf_counter() - t_train
            handoff_s = client.push_weights(model, version=done)
            step_s = time.perf_counter() - t_step
            rollout_stats = score(gens, answers, reward_fn)
            metrics.update(
                {
                    "reward_mean": rollout_stats["reward"],
                    "reward_std": float(raw_rewards.std(unbiased=False)),
                    "format_reward": rollout_stats["format_reward"],
                    "answer_reward": rollout_stats["answer_reward"],
                    "response_length_mean": rollout_stats["response_length_mean"],
                    "response_length_max": rollout_stats["response_length_max"],
                    "truncated_fraction": rollout_stats["truncated_fraction"],
                    "lr": out["per_step"][0]["lr"],
                    "generation_s": result.elapsed_s,
                    "handoff_s": handoff_s,
                    "trainer_idle_s": idle_s,
                    "trainer_idle_fraction": idle_s / step_s,
                    "train_time_s": train_s,
                    "step_time_s": step_s,
                    "rollout_weight_version": min(versions),
                    "tokens_per_s": int(batch["response_mask"].sum()) / max(train_s, 1e-9),
                    # prompt + response tokens computed per second (the benchmark's "real tokens")
                    "real_tokens_per_s": int(response_lengths(batch["response_mask"]).sum())
                    / max(train_s, 1e-9),
                }
            )
            metrics.update(
                {f"reward_meta/{k}": v for k, v in reward_meta.items() if isinstance(v, (int, float))}
            )
            if run.memory is not None:
                metrics.update(peaks_so_far(client))
            run.logger.log(metrics, step=done)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
            if done % s.eval_every == 0 or done == s.n_steps:
                evals.request(done)
            if done % s.checkpoint_every == 0 and done < s.n_steps:
                # staleness 1: the copy holds v(step), the weights that generate batch `done`
                kept = behaviour.copy.state_dict() if behaviour.copy is not None else None
                run.save_state(done, behaviour=kept)
        run.finish()
    return {"steps": s.n_steps}
