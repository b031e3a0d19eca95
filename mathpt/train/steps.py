"""One optimizer update of SFT or policy gradient: the inner loops the trainers call.

``sft_update`` takes microbatches of one batch and makes one optimizer step. ``pg_update`` takes one
rollout batch and makes ``epochs`` x (batch / minibatch) optimizer steps on it; for GRPO-clip the
old log-probs are those of the policy that generated the rollouts (given by the caller, e.g. from
vLLM, or computed here once before the first step), so the ratio leaves 1 after the first step and
clipping really acts. Forward/backward run under autocast (bf16 by default), log-probs and entropy
through the chunked head in ``mathpt.functional`` (no full fp32 logits).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from mathpt.functional import (
    LOSS_AGGREGATIONS,
    LOSS_TYPES,
    get_response_log_probs,
    grpo_microbatch_train_step,
    sft_microbatch_train_step,
)

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
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _clip(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
    """Grad norm before clipping; clips to ``max_grad_norm`` (None or <= 0: no clipping).

    Optimizers that can fold the clip factor into their update (MasterWeightAdamW) do it there.
    """
    limit = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf
    if hasattr(optimizer, "clip_grad_norm_"):
        return float(optimizer.clip_grad_norm_(limit))
    params = [p for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, limit)) if params else 0.0


def _forward(model, mb: dict[str, torch.Tensor], chunk_size: int | None) -> dict[str, torch.Tensor]:
    return get_response_log_probs(
        model,
        mb["input_ids"],
        mb["labels"],
        return_token_entropy=True,
        attention_mask=mb.get("attention_mask"),
        chunk_size=chunk_size,
    )


def sft_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    microbatches: Sequence[dict[str, torch.Tensor]],
    grad_accum: int | None = None,
    max_grad_norm: float | None = 1.0,
    normalize_constant: float = 1.0,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    chunk_size: int | None = None,
    trim: bool = True,
) -> dict[str, float]:
    """One optimizer step of SFT over ``microbatches`` (dicts of input_ids, labels, response_mask).

    With ``grad_accum`` given, each microbatch loss is divided by it (CS336). By default each
    microbatch is weighted by its share of rows, so the step follows the batch-mean loss exactly even
    when microbatches differ in size (e.g. built by ``token_budget_microbatches``).
    Returns loss (batch mean of the per-sequence loss), grad_norm (before clipping), entropy and
    nll (per response token), tokens (response tokens).
    """
    device = _device(model)
    total_rows = sum(int(mb["input_ids"].shape[0]) for mb in microbatches)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    tokens = torch.zeros((), device=device)
    ent_sum = torch.zeros((), device=device)
    nll_sum = torch.zeros((), device=device)
    for mb in microbatches:
        mb = _to(mb, device)
        if trim:
            mb = trim_padding(mb, BATCH_KEYS + ("attention_mask",))
        with _autocast(device, autocast_dtype):
            out = _forward(model, mb, chunk_size)
            ga = grad_accum or total_rows / mb["input_ids"].shape[0]
            loss, _ = sft_microbatch_train_step(out["log_probs"], mb["response_mask"], ga, normalize_constant)
        mask = mb["response_mask"].bool()
        loss_sum += float(loss)
        tokens += mask.sum()
        ent_sum += torch.where(mask, out["token_entropy"].detach(), 0.0).sum()
        nll_sum += torch.where(mask, -out["log_probs"].detach(), 0.0).sum()
    grad_norm = _clip(model, optimizer, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n = max(float(tokens), 1.0)
    return {
        "loss": loss_sum,
        "grad_norm": grad_norm,
        "entropy": float(ent_sum) / n,
        "nll": float(nll_sum) / n,
        "tokens": float(tokens),
    }


@torch.no_grad()
def compute_old_log_probs(
    model: torch.nn.Module,
    rollout_batch: dict[str, torch.Tensor],
    microbatch_size: int,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-probs (B, T) of the rollout labels under ``model`` as it is now (no grad), on CPU, 0 past the end.

    Call this before any update on the batch: these are the behaviour policy's log-probs.
    """
    device = _device(model)
    ids, labels = rollout_batch["input_ids"], rollout_batch["labels"]
    out = None
    for s in range(0, ids.shape[0], microbatch_size):
        mb = {k: rollout_batch[k][s : s + microbatch_size] for k in BATCH_KEYS}
        if "attention_mask" in rollout_batch:
            mb["attention_mask"] = rollout_batch["attention_mask"][s : s + microbatch_size]
        mb = trim_padding(_to(mb, device), BATCH_KEYS + ("attention_mask",))
        with _autocast(device, autocast_dtype):
            lp = get_response_log_probs(
                model, mb["input_ids"], mb["labels"], attention_mask=mb.get("attention_mask"), chunk_size=chunk_size
            )["log_probs"]
        if out is None:  # fp32 normally; fp64 for fp64 models
            out = torch.zeros(labels.shape, dtype=lp.dtype)
        out[s : s + microbatch_size, : lp.shape[1]] = lp.cpu()
    return out


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the number of leading columns that matter: up to the last response token."""
    m = response_mask.bool()
    last = m.shape[1] - m.flip(1).long().argmax(1)
    return torch.where(m.any(1), last, 0)


def token_budget_microbatches(
    lengths: torch.Tensor, max_tokens: int, max_rows: int | None = None
) -> list[torch.Tensor]:
    """Split rows into microbatches of at most ``max_tokens`` padded tokens (rows x longest row).

    Rows are taken longest first, so each microbatch holds rows of similar length: after trimming,
    little padding is left, and short rollouts share a microbatch instead of each costing a slot
    of the longest one. A single row longer than the budget gets a microbatch of its own.
    Returns index tensors into ``lengths``.
    """
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    out: list[list[int]] = []
    for i in order:
        cur = out[-1] if out else None
        longest = int(lengths[cur[0]]) if cur else 0  # rows arrive longest first
        if cur is not None and (len(cur) + 1) * max(longest, 1) <= max_tokens and (max_rows is None or len(cur) < max_rows):
            cur.append(i)
        else:
            out.append([i])
    return [torch.tensor(rows, dtype=torch.long) for rows in out]


def _minibatches(n: int, size: int, epochs: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for s in range(0, n, size):
            yield order[s : s + size]


def pg_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rollout_batch: dict[str, torch.Tensor],
    loss_type: str,
    cliprange: float = 0.2,
    epochs: int = 1,
    minibatch_size: int | None = None,
    microbatch_size: int | None = None,
    max_grad_norm: float | None = 1.0,
    loss_aggregation: str = "seq_mean",
    normalize_constant: float | None = None,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    chunk_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    sort_by_length: bool = True,
    microbatch_tokens: int | None = None,
) -> dict:
    """Policy-gradient updates on one rollout batch; returns metrics (means over optimizer steps).

    ``rollout_batch``: tensors input_ids, labels, response_mask (B, T), raw_rewards, advantages (B,),
    optionally old_log_probs (B, T) aligned with labels (e.g. vLLM's sampled log-probs) and
    attention_mask. Makes ``epochs * ceil(B / minibatch_size)`` optimizer steps, each accumulating
    gradients over microbatches of ``microbatch_size``. For ``grpo_clip`` without given old
    log-probs they are computed here before the first step. Within a minibatch rows are grouped by
    length (``sort_by_length``) so microbatches carry little padding; the gradient is unchanged.
    With ``microbatch_tokens``, microbatches are cut by a padded-token budget instead of a row
    count (``token_budget_microbatches``; ``microbatch_size`` then caps the rows), which keeps
    every microbatch big enough to use the GPU well on rollouts of mixed lengths.
    Metrics: loss, grad_norm, entropy, clip_fraction, ratio_mean/min/max, approx_kl, tokens,
    optimizer_steps, and ``per_step`` (one dict per optimizer step).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if loss_aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_aggregation {loss_aggregation!r}; expected one of {LOSS_AGGREGATIONS}")
    device = _device(model)
    n = rollout_batch["input_ids"].shape[0]
    minibatch_size = minibatch_size or n
    microbatch_size = microbatch_size or minibatch_size
    if microbatch_tokens is None and minibatch_size % microbatch_size:
        raise ValueError(f"minibatch_size {minibatch_size} is not a multiple of microbatch_size {microbatch_size}")
    batch = dict(rollout_batch)
    if loss_type == "grpo_clip" and batch.get("old_log_probs") is None:
        batch["old_log_probs"] = compute_old_log_probs(model, batch, microbatch_size, autocast_dtype, chunk_size)
    if loss_aggregation == "sum_norm" and normalize_constant is None:
        # fixed before padding is trimmed per microbatch; trainers should pass max_new_tokens
        normalize_constant = float(batch["response_mask"].shape[1])
    seq_keys = BATCH_KEYS + tuple(k for k in ("attention_mask", "old_log_probs") if k in batch)
    lengths = response_lengths(batch["response_mask"])
    gen = torch.Generator().manual_seed(seed) if shuffle else None

    per_step: list[dict[str, float]] = []
    for idx in _minibatches(n, minibatch_size, epochs, gen):
        if sort_by_length:
            idx = idx[torch.argsort(lengths[idx], descending=True, stable=True)]
        mb_tokens = max(float(batch["response_mask"][idx].sum()), 1.0)
        optimizer.zero_grad(set_to_none=True)
        acc = {"loss": 0.0, "tokens": 0.0, "ent": 0.0, "clipped": 0.0, "ratio_sum": 0.0, "kl_sum": 0.0}
        rmin, rmax = math.inf, -math.inf
        if microbatch_tokens is not None:
            groups = [idx[g] for g in token_budget_microbatches(lengths[idx], microbatch_tokens, microbatch_size)]
        else:
            groups = [idx[s : s + microbatch_size] for s in range(0, len(idx), microbatch_size)]
        for rows in groups:
            mb = {k: batch[k][rows] for k in seq_keys}
            mb = trim_padding(_to(mb, device), seq_keys)
            rew = batch["raw_rewards"][rows].to(device).float().unsqueeze(-1)
            adv = batch["advantages"][rows].to(device).float().unsqueeze(-1)
            # Weight each microbatch by its share of rows, so the sum over microbatches is exactly the
            # minibatch loss; token_mean divides by the minibatch's token count.
            ga = len(idx) / len(rows)
            norm = normalize_constant
            if loss_aggregation == "token_mean" and normalize_constant is None:
                norm = mb_tokens / ga
            with _autocast(device, autocast_dtype):
                out = _forward(model, mb, chunk_size)
                loss, meta = grpo_microbatch_train_step(
                    out["log_probs"],
                    mb["response_mask"],
                    ga,
                    loss_type,
                    raw_rewards=rew,
                    advantages=adv,
                    old_log_probs=mb.get("old_log_probs"),
                    cliprange=cliprange,
                    loss_aggregation=loss_aggregation,
                    normalize_constant=norm,
                )
            mask = mb["response_mask"].bool()
            t = float(meta["response_tokens"])
            acc["loss"] += float(loss)
            acc["tokens"] += t
            acc["ent"] += float(torch.where(mask, out["token_entropy"].detach(), 0.0).sum())
            if "ratio" in meta and t > 0:
                acc["clipped"] += float(meta["clip_fraction"]) * t
                acc["ratio_sum"] += float(meta["ratio_mean"]) * t
                acc["kl_sum"] += float(meta["approx_kl"]) * t
                rmin = min(rmin, float(meta["ratio_min"]))
                rmax = max(rmax, float(meta["ratio_max"]))
        grad_norm = _clip(model, optimizer, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tk = max(acc["tokens"], 1.0)
        step = {"loss": acc["loss"], "grad_norm": grad_norm, "entropy": acc["ent"] / tk, "tokens": acc["tokens"]}
        if loss_type == "grpo_clip":
            step.update(
                clip_fraction=acc["clipped"] / tk,
                ratio_mean=acc["ratio_sum"] / tk if acc["tokens"] else 1.0,
                ratio_min=rmin if rmin < math.inf else 1.0,
                ratio_max=rmax if rmax > -math.inf else 1.0,
                approx_kl=acc["kl_sum"] / tk,
            )
        per_step.append(step)

    metrics: dict = {k: sum(s[k] for s in per_step) / len(per_step) for k in per_step[0] if k not in ("ratio_min", "ratio_max")}
    metrics["tokens"] = sum(s["tokens"] for s in per_step)
    if loss_type == "grpo_clip":
        metrics["ratio_min"] = min(s["ratio_min"] for s in per_step)
        metrics["ratio_max"] = max(s["ratio_max"] for s in per_step)
    metrics["optimizer_steps"] = len(per_step)
    metrics["per_step"] = per_step
    return metrics


# --------------------------------------------------------------------------------------------------
# Speed knobs for big models on GPU (no-ops or plain eager elsewhere)
# --------------------------------------------------------------------------------------------------


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    body = getattr(model, "model", model)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers to compile or checkpoint")
    return list(layers)


def compile_layers(model: torch.nn.Module, dynamic: bool = True) -> None:
    """torch.compile each decoder layer in place ("regional" compilation).

    All layers share one compiled graph, so compiling takes about as long as for one layer, and
    inductor fuses norms/rotary/SwiGLU and recomputes cheap elementwise ops in backward instead of
    saving them (less activation memory). ``dynamic`` avoids a recompile per sequence length.
    """
    for layer in _decoder_layers(model):
        layer.compile(dynamic=dynamic)


def checkpoint_layers(model: torch.nn.Module, n_layers: int) -> int:
    """Activation checkpointing on the first ``n_layers`` decoder layers (HF GradientCheckpointingLayer).

    Each checkpointed layer keeps only its input and recomputes its forward in backward: ~1/3 more
    compute for that layer, all its activations saved. Use the smallest count that fits memory.
    Returns how many layers were switched on.
    """
    import functools

    from torch.utils.checkpoint import checkpoint

    fn = functools.partial(checkpoint, use_reentrant=False)
    count = 0
    for i, layer in enumerate(_decoder_layers(model)):
        if not hasattr(layer, "gradient_checkpointing"):
            raise ValueError(f"{type(layer).__name__} does not support HF gradient checkpointing")
        on = i < n_layers
        layer.gradient_checkpointing = on
        layer._gradient_checkpointing_func = fn
        count += on
    return count
