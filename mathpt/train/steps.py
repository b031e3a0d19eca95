"""One optimizer update of SFT or policy gradient: the inner loops the trainers call.

``sft_update`` takes microbatches of one batch and makes one optimizer step. ``pg_update`` takes one
rollout batch and makes ``epochs`` x (batch / minibatch) optimizer steps on it; the old log-probs
are those of the behaviour policy, the weights that generated the rollouts (given by the caller,
who keeps those weights when rollouts run ahead, see ``train/pg.py``; computed here once before the
first step when the batch is on-policy), so GRPO-clip's ratio is pi_theta / pi_behaviour.
Forward/backward run in the model's own dtype unless ``autocast_dtype`` is given (the trainers pass
None: a bf16 model computes in bf16, its fp32 master weights live in the optimizer); log-probs and
entropy go through the chunked head (``mathpt.logprob_kernel``, no full fp32 logits). Microbatches
are cut by rows or by a token budget (``mathpt.train.batching``), optionally packed
(``mathpt.train.packing``); the gradient of an optimizer step does not depend on the cut. The drift
metrics (ratio, KL k3 = the logged ``approx_kl``, clip fraction) come from
``functional.policy_drift_sums`` only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from mathpt.functional import (
    compute_tis_weights,
    get_response_log_probs,
    grpo_microbatch_train_step,
    policy_drift_sums,
    sft_loss,
)
from mathpt.train.batching import (
    first_epoch_cuts,
    first_epoch_microbatches,
    microbatch_cuts,
    response_lengths,
    update_plan,
)
from mathpt.train.packing import packed_response_log_probs
from mathpt.train.settings import UpdateSettings

BATCH_KEYS = ("input_ids", "labels", "response_mask")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def trim_padding(batch: dict[str, torch.Tensor], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Drop trailing columns after the last response token of any row (right padding only).

    With causal attention a column never influences earlier ones, so cutting trailing padding
    changes no log-prob of a response token; it only saves compute on a short microbatch.
    """
    mask = batch["response_mask"]
    cols = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = int((mask.bool() * cols).amax().item()) if mask.numel() else 0
    last = max(last, 1)
    if last == mask.shape[1]:
        return batch
    return {k: (v[:, :last] if k in keys and v.dim() == 2 else v) for k, v in batch.items()}


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def _clip(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
    """Grad norm before clipping; clips to ``max_grad_norm`` (None or <= 0: no clipping).

    Optimizers that can fold the clip factor into their update (MasterWeightAdamW) do it there.
    """
    limit = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf
    if hasattr(optimizer, "clip_grad_norm_"):
        return float(optimizer.clip_grad_norm_(limit))
    params = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, limit)) if params else 0.0


def grad_clipped(grad_norm: float, max_grad_norm: float | None) -> bool:
    """Whether ``_clip`` rescaled the gradient: its pre-clip norm exceeded a positive ``max_grad_norm``."""
    return bool(max_grad_norm and max_grad_norm > 0 and grad_norm > max_grad_norm)


def _forward(
    model,
    mb: dict[str, torch.Tensor],
    chunk_size: int | None,
    packed: bool = False,
    entropy: bool = True,
) -> dict[str, torch.Tensor]:
    """Log-probs (and entropy) (rows, T) of a microbatch; ``packed``: through one padding-free row
    (``mathpt.train.packing``, right-padded rows only), same values."""
    if packed and mb.get("attention_mask") is None:
        return packed_response_log_probs(
            model,
            mb["input_ids"],
            mb["labels"],
            mb["response_mask"],
            return_token_entropy=entropy,
            chunk_size=chunk_size,
        )
    return get_response_log_probs(
        model,
        mb["input_ids"],
        mb["labels"],
        return_token_entropy=entropy,
        attention_mask=mb.get("attention_mask"),
        chunk_size=chunk_size,
    )


def sft_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    microbatches: Sequence[dict[str, torch.Tensor]],
    max_grad_norm: float | None = 1.0,
    autocast_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    trim: bool = True,
    packing: bool = False,
) -> dict[str, float]:
    """One optimizer step of SFT over ``microbatches`` (dicts of input_ids, labels, response_mask).

    The loss is the mean NLL per response token of the whole step: each microbatch's masked NLL
    sum is divided by the response tokens of all microbatches, so the gradient does not depend on
    how the step is cut (rows, token budget, packing) and a long response weighs by its tokens.
    ``packing`` runs each microbatch as one padding-free row (same gradient, no padding computed).
    Returns loss (= nll, per response token), grad_norm (before clipping), grad_clipped (1.0 when
    the clip rescaled the step), entropy (per response token), tokens (response tokens).
    """
    device = _device(model)
    step_tokens = sum(int(mb["response_mask"].sum()) for mb in microbatches)
    norm = float(max(step_tokens, 1))
    optimizer.zero_grad(set_to_none=True)
    ent_sum = torch.zeros((), dtype=torch.float64, device=device)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    for mb in microbatches:
        mb = _to(mb, device)
        if trim:
            mb = trim_padding(mb, BATCH_KEYS + ("attention_mask",))
        mask = mb["response_mask"].bool()
        with _autocast(device, autocast_dtype):
            out = _forward(model, mb, chunk_size, packed=packing)
            nll = sft_loss(out["log_probs"], mask, norm)
        nll.backward()
        nll_sum += nll.detach() * norm
        ent_sum += torch.where(mask, out["token_entropy"].detach(), 0.0).sum()
    grad_norm = _clip(model, optimizer, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    nll_mean = float(nll_sum) / norm
    return {
        "loss": nll_mean,
        "nll": nll_mean,
        "grad_norm": grad_norm,
        "grad_clipped": float(grad_clipped(grad_norm, max_grad_norm)),
        "entropy": float(ent_sum) / norm,
        "tokens": float(step_tokens),
    }


@torch.no_grad()
def compute_old_log_probs(
    model: torch.nn.Module,
    rollout_batch: dict[str, torch.Tensor],
    microbatch_size: int,
    autocast_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    microbatch_tokens: int | None = None,
    packing: bool = False,
    groups: Sequence[torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs (B, T) of the rollout labels under ``model`` as it is now (no grad), on CPU, 0 past the end.

    Call this before any update on the batch: these are the behaviour policy's log-probs. ``groups``
    are the microbatches (row indices) to run, normally the update's own cuts (``minibatch_plan``):
    in fp32 the values do not depend on the cut, but in bf16 a different pack gives different
    logits (up to 0.012 in log-prob on an H100), so the ratio's denominator takes the numerator's
    cuts. Without ``groups`` the whole batch is cut by ``microbatch_tokens``/``microbatch_size``.
    ``out``: fill these rows of an existing (B, T) tensor (others are left as they are).
    """
    device = _device(model)
    labels = rollout_batch["labels"]
    keys = BATCH_KEYS + (("attention_mask",) if "attention_mask" in rollout_batch else ())
    if groups is None:
        lengths = response_lengths(rollout_batch["response_mask"])
        groups = microbatch_cuts(lengths, microbatch_size, microbatch_tokens, packed=packing)
    if out is None:  # fp32 normally; fp64 for fp64 models
        out = torch.zeros(labels.shape, dtype=_log_prob_dtype(model))
    for rows in groups:
        mb = trim_padding(_to({k: rollout_batch[k][rows] for k in keys}, device), keys)
        with _autocast(device, autocast_dtype):
            lp = _forward(model, mb, chunk_size, packed=packing, entropy=False)["log_probs"]
        out[rows, : lp.shape[1]] = lp.to("cpu", out.dtype)
    return out


def _log_prob_dtype(model: torch.nn.Module) -> torch.dtype:
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def _isin(rows: torch.Tensor, among: torch.Tensor) -> bool:
    return bool(torch.isin(rows, among).all())


def _fill_old_from_forward(
    batch: dict[str, torch.Tensor],
    mb: dict[str, torch.Tensor],
    rows: torch.Tensor,
    log_probs: torch.Tensor,
    tis_cap: float,
) -> None:
    """On-policy first step: pi_old of ``rows`` is this forward's own output, detached (ratio = 1)."""
    lp = log_probs.detach()
    mb["old_log_probs"] = lp
    old = batch["old_log_probs"]
    old[rows, : lp.shape[1]] = lp.to("cpu", old.dtype)
    if "tis_weights" in batch:
        w = compute_tis_weights(lp, mb["sampler_log_probs"], tis_cap)
        mb["tis_weights"] = w
        batch["tis_weights"][rows, : w.shape[1]] = w.to("cpu", batch["tis_weights"].dtype)


def _drift_metrics(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Per-token means of ``policy_drift_sums`` added up over microbatches."""
    tk = max(sums["tokens"], 1.0)
    empty = sums["tokens"] == 0
    return {
        f"{prefix}logp_gap_mean": sums["abs_gap"] / tk,
        f"{prefix}logp_gap_max": sums["abs_gap_max"],
        f"{prefix}kl_k3": sums["k3"] / tk,
        f"{prefix}clip_fraction": sums["clipped"] / tk,
        f"{prefix}ratio_mean": 1.0 if empty else sums["ratio"] / tk,
        f"{prefix}ratio_min": 1.0 if empty else sums["ratio_min"],
        f"{prefix}ratio_max": 1.0 if empty else sums["ratio_max"],
    }


def _add_sums(acc: dict[str, float], new: dict[str, torch.Tensor]) -> None:
    for k, v in new.items():
        v = float(v)
        if k.endswith("_max"):
            acc[k] = max(acc.get(k, -math.inf), v)
        elif k.endswith("_min"):
            acc[k] = min(acc.get(k, math.inf), v)
        else:
            acc[k] = acc.get(k, 0.0) + v


# metrics of one optimizer step that are reduced over steps by min / max instead of the mean
_MIN_KEYS, _MAX_KEYS = ("ratio_min",), ("ratio_max", "logp_gap_max")


def behaviour_log_probs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], settings: UpdateSettings, seed: int
) -> torch.Tensor:
    """Old log-probs (B, T) of a batch under ``model`` (the weights that generated it), cut into the
    microbatches ``pg_update(batch, settings, seed=seed)`` will run (its first epoch): in bf16 another
    cut gives other logits, so the ratio's denominator takes the numerator's cuts."""
    cuts = first_epoch_cuts(batch["response_mask"], settings, seed)
    return compute_old_log_probs(
        model, batch, settings.microbatch_size or len(cuts[0]), packing=settings.packing, groups=cuts
    )


def pg_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rollout_batch: dict[str, torch.Tensor],
    settings: UpdateSettings,
    *,
    seed: int,
    scheduler=None,
    autocast_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
) -> dict:
    """Policy-gradient updates on one rollout batch; returns metrics (means over optimizer steps).

    ``rollout_batch``: tensors input_ids, labels, response_mask (B, T), raw_rewards, advantages (B,),
    optionally attention_mask, ``old_log_probs`` (B, T): the trainer's log-probs of the labels under
    the behaviour policy (the weights that generated the batch; computed here with ``model`` as it
    is now when absent, i.e. on-policy), and ``sampler_log_probs`` (B, T): the inference engine's own
    log-probs of the sampled tokens. ``settings`` (``UpdateSettings``, parsed once from the config)
    names the algorithm, whose registry entry picks the per-token loss (``functional.POLICY_LOSSES``),
    and its clip range [1 - ``clip_low``, 1 + ``clip_high``]. GRPO-clip's ratio is pi_theta / pi_old.
    With ``off_policy_correction="tis"`` every variant's per-token loss is weighted by
    min(pi_old / pi_sampler, ``tis_cap``) (``compute_tis_weights``). ``seed`` shuffles the minibatches.

    Makes ``epochs * ceil(B / minibatch_size)`` optimizer steps (``scheduler.step()`` after each),
    each accumulating gradients over microbatches of ``microbatch_size``, or cut by a padded-token
    budget with ``microbatch_tokens`` (``batching.token_budget_microbatches``; ``microbatch_size`` then caps
    the rows; with ``packing`` the budget counts real tokens and each microbatch runs as one
    padding-free row, ``mathpt.train.packing``: same gradient). Within a minibatch rows are grouped by
    length so microbatches carry little padding (``update_plan``). The aggregation never depends on
    the microbatching: seq_mean and sum_norm weight each microbatch by its share of rows; token_mean
    divides by the response tokens of the whole minibatch (``normalize_constant`` is sum_norm's).

    Metrics (every variant): loss, grad_norm, entropy, lr (of the step), tokens, and how far
    pi_theta is from pi_old over the minibatch: logp_gap_mean/max, kl_k3, clip_fraction (tokens
    GRPO-clip's clip cuts; 0 for the variants without a clip, ``cliprange`` None), ratio_mean/min/max;
    for losses that clip, loss_clip_fraction (response tokens the algorithm's own clip touched, e.g.
    GSPO's clipped sequences); with sampler log-probs, sampler_logp_gap_mean/
    max and sampler_kl_k3 (pi_old vs pi_sampler); with TIS, tis_weight_mean and tis_capped_fraction.
    ``per_step`` holds one dict per optimizer step (the first minibatch first), ``optimizer_steps``,
    ``old_log_probs`` the (B, T) pi_old the ratios used. Without given old log-probs (on-policy) the
    first optimizer step's own forward, detached, is pi_old for its rows (ratio exactly 1 in any
    dtype); the other rows are scored before the first step with the cuts of their own updates.
    """
    s = settings
    loss_type, loss_aggregation = s.loss_type, s.loss_aggregation
    max_grad_norm, tis_cap, normalize_constant = s.max_grad_norm, s.tis_cap, s.normalize_constant
    tis = s.off_policy_correction == "tis"
    # the drift metrics' clip_fraction counts the tokens the clip cuts: none without a clip
    clip_eps = math.inf if s.cliprange is None else s.cliprange
    device = _device(model)
    n = rollout_batch["input_ids"].shape[0]
    minibatch_size = s.minibatch_size or n
    microbatch_size = s.microbatch_size or minibatch_size
    if s.microbatch_tokens is None and minibatch_size % microbatch_size:
        raise ValueError(
            f"minibatch_size {minibatch_size} is not a multiple of microbatch_size {microbatch_size}"
        )
    batch = dict(rollout_batch)
    if tis and batch.get("sampler_log_probs") is None:
        raise ValueError(
            "off_policy_correction 'tis' needs the sampler's log-probs (rollout_batch['sampler_log_probs'])"
        )
    plan = update_plan(batch["response_mask"], s, seed)
    # On-policy (no old log-probs given): the first optimizer step's own forward, detached, is
    # pi_old for its rows, so its ratio is exactly 1 whatever the dtype and kernels; the other rows
    # are scored now with the same cuts as their updates will use.
    on_policy = batch.get("old_log_probs") is None
    if on_policy:
        first = torch.cat(plan[0])
        rest = [g for g in first_epoch_microbatches(plan, n, minibatch_size) if not _isin(g, first)]
        batch["old_log_probs"] = compute_old_log_probs(
            model, batch, microbatch_size, autocast_dtype, chunk_size, packing=s.packing, groups=rest
        )
    if tis:  # the first step's rows are refilled with its own forward
        batch["tis_weights"] = compute_tis_weights(
            batch["old_log_probs"], batch["sampler_log_probs"], tis_cap
        )
    optional = ("attention_mask", "old_log_probs", "tis_weights")
    seq_keys = BATCH_KEYS + tuple(k for k in optional if k in batch)
    if on_policy and tis:
        seq_keys += ("sampler_log_probs",)

    per_step: list[dict[str, float]] = []
    for step_i, groups in enumerate(plan):
        idx = torch.cat(groups)
        mb_tokens = max(float(batch["response_mask"][idx].sum()), 1.0)
        optimizer.zero_grad(set_to_none=True)
        acc = {"loss": 0.0, "tokens": 0.0, "ent": 0.0}
        drift: dict[str, float] = {}
        for rows in groups:
            mb = {k: batch[k][rows] for k in seq_keys}
            mb = trim_padding(_to(mb, device), seq_keys)
            rew = batch["raw_rewards"][rows].to(device).float().unsqueeze(-1)
            adv = batch["advantages"][rows].to(device).float().unsqueeze(-1)
            # Each microbatch's loss is its share of the minibatch loss, so the accumulated gradient
            # is the minibatch's whatever the cut: rows / ga for the per-sequence means, and the
            # minibatch's response-token count for token_mean (aggregate_loss divides by norm, then ga).
            ga = len(idx) / len(rows)
            norm = mb_tokens / ga if loss_aggregation == "token_mean" else normalize_constant
            with _autocast(device, autocast_dtype):
                out = _forward(model, mb, chunk_size, packed=s.packing)
                if on_policy and step_i == 0:
                    _fill_old_from_forward(batch, mb, rows, out["log_probs"], tis_cap)
                loss, meta = grpo_microbatch_train_step(
                    out["log_probs"],
                    mb["response_mask"],
                    ga,
                    loss_type,
                    raw_rewards=rew,
                    advantages=adv,
                    old_log_probs=mb["old_log_probs"],
                    cliprange=s.clip_low,
                    cliprange_high=s.clip_high,
                    loss_aggregation=loss_aggregation,
                    normalize_constant=norm,
                    token_weights=mb.get("tis_weights"),
                )
            mask = mb["response_mask"].bool()
            acc["loss"] += float(loss)
            acc["tokens"] += float(meta["response_tokens"])
            if "clip_fraction" in meta:  # the algorithm's own clip (token-, sequence- or weight-level)
                acc["loss_clipped"] = acc.get("loss_clipped", 0.0) + float(
                    meta["clip_fraction"] * meta["response_tokens"]
                )
            acc["ent"] += float(torch.where(mask, out["token_entropy"].detach(), 0.0).sum())
            _add_sums(drift, policy_drift_sums(out["log_probs"], mb["old_log_probs"], mask, adv, clip_eps))
        lr = float(optimizer.param_groups[0]["lr"])
        grad_norm = _clip(model, optimizer, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        tk = max(acc["tokens"], 1.0)
        step = {
            "loss": acc["loss"],
            "grad_norm": grad_norm,
            "entropy": acc["ent"] / tk,
            "tokens": acc["tokens"],
            "lr": lr,
            "grad_clipped": float(grad_clipped(grad_norm, max_grad_norm)),  # mean: clipped fraction
            **_drift_metrics(drift),
        }
        step["approx_kl"] = step["kl_k3"]  # the name older logs used
        if "loss_clipped" in acc:
            step["loss_clip_fraction"] = acc["loss_clipped"] / tk
        per_step.append(step)

    batch_metrics: dict[str, float] = {}
    mask_all = batch["response_mask"].bool()
    if batch.get("sampler_log_probs") is not None:
        s = {
            k: float(v)
            for k, v in policy_drift_sums(
                batch["sampler_log_probs"],
                batch["old_log_probs"],
                mask_all,
                batch["advantages"][:, None],
                clip_eps,
            ).items()
        }
        d = _drift_metrics(s)
        batch_metrics = {f"sampler_{k}": d[k] for k in ("logp_gap_mean", "logp_gap_max", "kl_k3")}
    if tis:
        w = batch["tis_weights"][mask_all].double()
        batch_metrics["tis_weight_mean"] = float(w.mean()) if w.numel() else 1.0
        batch_metrics["tis_capped_fraction"] = float((w >= tis_cap).double().mean()) if w.numel() else 0.0
    metrics: dict = {}
    for k in per_step[0]:
        vals = [s[k] for s in per_step]
        metrics[k] = min(vals) if k in _MIN_KEYS else max(vals) if k in _MAX_KEYS else sum(vals) / len(vals)
    metrics["tokens"] = sum(s["tokens"] for s in per_step)
    metrics.update(batch_metrics)
    metrics["optimizer_steps"] = len(per_step)
    metrics["per_step"] = per_step
    metrics["old_log_probs"] = batch["old_log_probs"]  # pi_old as used (B, T), for logs and tests
    return metrics
