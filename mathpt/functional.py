"""Pure tensor functions for SFT and policy-gradient training (CS336 assignment 5 names and semantics).

No I/O here. Everything a trainer needs to turn (prompt, response, reward) into a loss lives in
this module; the update loops that call these functions are in ``mathpt.train.steps``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mathpt import algorithms
from mathpt.algorithms import PG_ALGOS
from mathpt.logprob_kernel import chunked_log_probs_from_hidden


def tokenize_prompt_and_output(
    prompt_strs: list[str], output_strs: list[str], tokenizer
) -> dict[str, torch.Tensor]:
    """Tokenize prompt and output separately, concatenate, right-pad, and shift by one.

    Returns ``input_ids`` = concat[:-1], ``labels`` = concat[1:] and ``response_mask`` (bool), each
    (B, L - 1) with L the longest concatenation; the mask is true on label positions that are
    output tokens (never on prompt or padding). Padding uses ``tokenizer.pad_token_id``
    (falling back to eos). Prompt and output are tokenized separately so the boundary between them
    is exact, as in CS336.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"{len(prompt_strs)} prompts but {len(output_strs)} outputs")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id")
    prompt_ids = tokenizer(list(prompt_strs), add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(list(output_strs), add_special_tokens=False)["input_ids"]
    seqs = [p + o for p, o in zip(prompt_ids, output_ids, strict=True)]
    max_len = max((len(s) for s in seqs), default=1)
    max_len = max(max_len, 2)
    full = torch.full((len(seqs), max_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), max_len), dtype=torch.bool)
    for i, (p, o) in enumerate(zip(prompt_ids, output_ids, strict=True)):
        full[i, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        mask[i, len(p) : len(p) + len(o)] = True
    return {"input_ids": full[:, :-1], "labels": full[:, 1:].clone(), "response_mask": mask[:, 1:].clone()}


# --------------------------------------------------------------------------------------------------
# Entropy and per-token log-probs
# --------------------------------------------------------------------------------------------------


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy over the last (vocab) dim, in fp32, stable for extreme logits.

    H = lse(z') - sum softmax(z') z' with z' = z - max z, so no term is large and nothing cancels
    catastrophically when logits are ~1e4.
    """
    z = _upcast(logits)
    z = z - z.amax(dim=-1, keepdim=True)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    return lse.squeeze(-1) - (p * z).sum(dim=-1)


def _body_and_head(model):
    """(transformer body, lm_head Linear) when the model has the usual HF causal-LM layout, else None."""
    body = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        return None
    cfg = getattr(model, "config", None)
    # Heads that transform logits after the projection need the model's own forward.
    if cfg is not None and (
        getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
    ):
        return None
    return body, head


def get_response_log_probs(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool = False,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    position_ids: torch.Tensor | None = None,
    attn_kwargs: dict | None = None,
) -> dict[str, torch.Tensor]:
    """``log_probs`` (B, T) of ``labels`` under ``model`` given ``input_ids`` [+ ``token_entropy``].

    Runs the transformer body once and projects its hidden states through ``lm_head`` in chunks of
    ``chunk_size`` tokens (default: ~2**27 logits per chunk), in fp32, so neither forward nor
    backward materializes (B, T, V) fp32 logits. Models without ``.model``/``.lm_head`` fall back to
    ``model(...).logits``. For right-padded batches no attention mask is needed (causal attention
    never lets a real token see the padding after it); pass one for left padding. ``position_ids``
    lets callers pack several sequences into one row (positions restart at 0 per sequence);
    ``attn_kwargs`` reach the attention function (the sequence boundaries of a packed row, see
    ``mathpt.train.packing``).
    """
    parts = _body_and_head(model)
    kwargs = dict(attn_kwargs or {})
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if parts is None:
        logits = model(input_ids=input_ids, **kwargs).logits
        logp = torch.log_softmax(_upcast(logits), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        out = {"log_probs": logp}
        if return_token_entropy:
            out["token_entropy"] = compute_entropy(logits)
        return out
    body, head = parts
    hidden = body(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
    return chunked_log_probs_from_hidden(
        hidden,
        head.weight,
        labels,
        head.bias,
        chunk_size=chunk_size,
        return_token_entropy=return_token_entropy,
    )


def naive_response_log_probs(
    model, input_ids: torch.Tensor, labels: torch.Tensor, return_token_entropy: bool = False, **kwargs
) -> dict[str, torch.Tensor]:
    """The textbook formula (full logits -> fp32 log_softmax -> gather): the reference for tests and benches."""
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
    logp = torch.log_softmax(_upcast(logits), dim=-1)
    out = {"log_probs": logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)}
    if return_token_entropy:
        out["token_entropy"] = compute_entropy(logits)
    return out


# --------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``tensor`` over positions where ``mask`` is true (along ``dim``, or over everything).

    Masked positions are ignored even if they hold inf/NaN. One deliberate difference from CS336's
    0/0 = NaN: a row with an empty mask gives 0, so one empty response cannot poison a whole batch.
    """
    mask = mask.bool()
    total = torch.where(mask, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
    if dim is None:
        return total.sum() / mask.sum().clamp(min=1)
    return total.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_normalize(
    tensor: torch.Tensor, mask: torch.Tensor, normalize_constant: float = 1.0, dim: int | None = None
) -> torch.Tensor:
    """Sum of ``tensor`` over positions where ``mask`` is true, divided by ``normalize_constant``."""
    total = torch.where(mask.bool(), tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
    return (total.sum() if dim is None else total.sum(dim)) / normalize_constant


# --------------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------------


def sft_loss(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    normalize_constant: float = 1.0,
    dim: int | None = None,
) -> torch.Tensor:
    """The SFT loss: the negative log-likelihood of the response tokens, summed (over everything,
    or along ``dim``) and divided by ``normalize_constant``. ``sft_update`` divides by the response
    tokens of the whole optimizer step (the mean NLL per token, whatever the microbatch cut)."""
    return masked_normalize(-policy_log_probs, response_mask, normalize_constant, dim=dim)


def sft_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: float,
    normalize_constant: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CS336's SFT microbatch step: ``sft_loss`` per sequence, batch mean, backpropagated.

    loss = mean over the batch of (masked NLL sum over the sequence / normalize_constant), divided
    by ``gradient_accumulation_steps`` so that summing microbatch gradients gives the batch gradient.
    """
    nll = sft_loss(policy_log_probs, response_mask, normalize_constant, dim=-1)
    loss = nll.mean() / gradient_accumulation_steps
    loss.backward()
    with torch.no_grad():
        tokens = response_mask.sum()
        meta = {
            "nll_per_token": masked_mean(-policy_log_probs.detach(), response_mask),
            "response_tokens": tokens,
        }
    return loss.detach(), meta


# --------------------------------------------------------------------------------------------------
# Policy gradient
# --------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    estimator: str = "group",
    advantage_eps: float = 1e-6,
    normalize_by_std: bool = True,
) -> torch.Tensor:
    """Advantages (B,) from rewards (B,) in consecutive groups of ``group_size`` (one prompt each).

    group: (r - group mean) / (group std + eps), unbiased std, or r - group mean when
    ``normalize_by_std`` is false (GRPO; CS336). group_mean: r - group mean, never divided by the
    std (Dr. GRPO). rloo: r_i - mean of the other G - 1 rewards of the group (the leave-one-out
    baseline; = G / (G - 1) x (r_i - group mean)). A group whose rewards are all equal gets zeros.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ADVANTAGE_ESTIMATORS}")
    grouped = rewards.view(-1, group_size)
    total = grouped.sum(dim=1, keepdim=True)
    if estimator == "rloo":
        if group_size < 2:
            raise ValueError("the leave-one-out baseline needs group_size >= 2")
        return (grouped - (total - grouped) / (group_size - 1)).reshape(-1)
    centered = grouped - total / group_size
    if estimator == "group" and normalize_by_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)
        return (centered / (std + advantage_eps)).reshape(-1)
    return centered.reshape(-1)


ADVANTAGE_ESTIMATORS = ("group", "group_mean", "rloo")


def compute_group_normalized_rewards(
    reward_fn,
    rollout_responses: list[str],
    repeated_ground_truths: list[str],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
    estimator: str = "group",
    reward_offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Score each response and turn rewards into group-relative advantages (``group_advantages``).

    Responses come in consecutive groups of ``group_size`` (the samples of one prompt); the default
    estimator gives (r - group mean) / (group std + eps) with the unbiased std, or r - group mean
    when ``normalize_by_std`` is false. ``reward_offsets`` (B,) are added to the scores before the
    advantages (DAPO's overlong shaping); the returned rewards include them.
    Returns (advantages (B,), raw_rewards (B,), metadata of floats for logging).
    """
    n = len(rollout_responses)
    if n != len(repeated_ground_truths):
        raise ValueError(f"{n} responses but {len(repeated_ground_truths)} ground truths")
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} responses do not split into groups of {group_size}")
    scores = [reward_fn(r, g) for r, g in zip(rollout_responses, repeated_ground_truths, strict=True)]
    raw = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)
    if reward_offsets is not None:
        raw = raw + reward_offsets.to(raw.dtype)
    grouped = raw.view(-1, group_size)
    if group_size > 1:
        std = grouped.std(dim=1, keepdim=True)  # unbiased
    else:
        std = torch.zeros_like(grouped)
    adv = group_advantages(raw, group_size, estimator, advantage_eps, normalize_by_std)
    meta = {
        "reward_mean": raw.mean().item(),
        "reward_std": raw.std().item() if n > 1 else 0.0,
        "reward_max": raw.max().item() if n else 0.0,
        "reward_min": raw.min().item() if n else 0.0,
        "format_reward_mean": sum(float(s.get("format_reward", 0.0)) for s in scores) / max(n, 1),
        "answer_reward_mean": sum(float(s.get("answer_reward", 0.0)) for s in scores) / max(n, 1),
        "group_reward_std_mean": std.mean().item() if n else 0.0,
        "frac_groups_zero_std": (std.squeeze(1) == 0).float().mean().item() if n else 0.0,
        "advantage_mean": adv.mean().item() if n else 0.0,
        "advantage_std": adv.std().item() if n > 1 else 0.0,
    }
    return adv, raw, meta


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward.

    0 up to ``max_len - buffer`` tokens, then falls linearly to -1 at ``max_len``, -1 beyond.
    """
    if buffer < 1 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in [1, max_len={max_len}], got {buffer}")
    lengths = lengths.to(torch.float32)
    soft = ((max_len - buffer) - lengths) / buffer
    return torch.clamp(torch.minimum(soft, torch.zeros_like(soft)), min=-1.0)


def compute_naive_policy_gradient_loss(
    raw_rewards_or_advantages: torch.Tensor, policy_log_probs: torch.Tensor
) -> torch.Tensor:
    """Per-token REINFORCE loss -A * log p, with A (B, 1) broadcast over the sequence."""
    return -raw_rewards_or_advantages.to(policy_log_probs.dtype) * policy_log_probs


def compute_grpo_clip_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    cliprange: float,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO/GRPO clipped surrogate -min(r A, clip(r, 1-c, 1+c_high) A), r = p / p_old.

    ``cliprange_high`` (default ``cliprange``) decouples the upper bound (DAPO's clip-higher).
    metadata: ``clipped`` (B, T) bool, true where the clipped term is the smaller one (the
    gradient is cut off there), and ``ratio`` (B, T), detached.
    """
    high = cliprange if cliprange_high is None else cliprange_high
    adv = advantages.to(policy_log_probs.dtype)
    ratio = torch.exp(policy_log_probs - old_log_probs.to(policy_log_probs.dtype))
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + high) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, {"clipped": (clipped < unclipped).detach(), "ratio": ratio.detach()}


def compute_gspo_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: float,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO's sequence-level clipped surrogate (Zheng et al. 2025), per token for aggregation.

    s_i = exp(mean over the response of log(p / p_old)) (the length-normalized sequence ratio);
    loss_i = -min(s_i A_i, clip(s_i, 1-c, 1+c_high) A_i), the same on every token of row i, so a
    per-sequence mean (seq_mean) gives loss_i itself and the gradient flows through all its tokens.
    metadata: ``clipped`` and ``ratio`` (B, T), constant along each row, detached.
    """
    high = cliprange if cliprange_high is None else cliprange_high
    adv = advantages.to(policy_log_probs.dtype)
    log_ratio = policy_log_probs - old_log_probs.to(policy_log_probs.dtype)
    seq_ratio = torch.exp(masked_mean(log_ratio, response_mask, dim=-1)).unsqueeze(-1)  # (B, 1)
    unclipped = seq_ratio * adv
    clipped = torch.clamp(seq_ratio, 1.0 - cliprange, 1.0 + high) * adv
    loss = (-torch.minimum(unclipped, clipped)).expand_as(policy_log_probs)
    shape = policy_log_probs.shape
    return loss, {
        "clipped": (clipped < unclipped).detach().expand(shape),
        "ratio": seq_ratio.detach().expand(shape),
    }


def compute_cispo_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    cliprange: float,
    cliprange_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, 2025): REINFORCE weighted by the clipped, detached IS ratio.

    loss = -sg(clip(r, 1-c, 1+c_high)) A log p, r = p / p_old. The weight is a constant, so every
    token keeps its gradient A * w * grad log p (GRPO-clip drops clipped tokens' gradient); the
    clip only bounds the weight. ``cliprange`` 1 = no lower bound (MiniMax-M1 sets eps_low large).
    metadata: ``clipped`` (B, T) where the weight was clipped, ``ratio`` (B, T), detached.
    """
    log_ratio = (policy_log_probs - old_log_probs.to(policy_log_probs.dtype)).detach()
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange_high)
    loss = -weight * advantages.to(policy_log_probs.dtype) * policy_log_probs
    return loss, {"clipped": weight != ratio, "ratio": ratio}


LOSS_TYPES = PG_ALGOS  # one loss per policy-gradient algorithm of the registry
LOSS_AGGREGATIONS = ("seq_mean", "token_mean", "sum_norm")
OFF_POLICY_CORRECTIONS = ("none", "tis")


def compute_tis_weights(
    old_log_probs: torch.Tensor, sampler_log_probs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance-sampling weights min(pi_old / pi_sampler, cap), detached.

    ``old_log_probs``: the trainer's log-probs of the sampled tokens under the weights that
    generated them; ``sampler_log_probs``: the inference engine's own log-probs of the same tokens.
    Both policies hold the same weights, so the ratio corrects only the engine-vs-trainer numerical
    mismatch (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL";
    verl's ``tis_imp_ratio_cap``). The cap bounds the variance a rare over-sampled token can add.
    """
    if cap <= 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    logr = old_log_probs.detach() - sampler_log_probs.detach().to(old_log_probs.dtype)
    return torch.exp(logr).clamp(max=cap)


def policy_drift_sums(
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    cliprange: float,
) -> dict[str, torch.Tensor]:
    """Sums over response tokens of how far pi_theta is from pi_old (detached; add them up over
    microbatches, divide by ``tokens``).

    ``abs_gap``: |log pi_theta - log pi_old|; ``abs_gap_max``: its max; ``k3``: Schulman's k3
    estimator of KL(pi_old || pi_theta), (r - 1) - log r with r = pi_theta / pi_old (unbiased,
    >= 0); ``clipped``: tokens where GRPO-clip's clipped term is the smaller one (the gradient is
    cut), computed for every variant so the drift is comparable; ``ratio``, ``ratio_min/max``.
    """
    mask = response_mask.bool()
    logr = (policy_log_probs.detach() - old_log_probs.to(policy_log_probs.dtype)).double()
    ratio = torch.exp(logr)
    adv = advantages.to(ratio.dtype)
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * adv < ratio * adv
    has = bool(mask.any())
    return {
        "tokens": mask.sum().double(),
        "abs_gap": torch.where(mask, logr.abs(), zero).sum(),
        "abs_gap_max": torch.where(mask, logr.abs(), zero).max() if has else zero,
        "k3": torch.where(mask, (ratio - 1) - logr, zero).sum(),
        "clipped": (clipped & mask).sum().double(),
        "ratio": torch.where(mask, ratio, zero).sum(),
        "ratio_min": torch.where(mask, ratio, torch.inf).min() if has else zero + 1,
        "ratio_max": torch.where(mask, ratio, -torch.inf).max() if has else zero + 1,
    }


def _loss_reinforce_raw(p, raw_rewards, advantages, old, cliprange, cliprange_high, mask):
    return compute_naive_policy_gradient_loss(raw_rewards, p), {}


def _loss_reinforce(p, raw_rewards, advantages, old, cliprange, cliprange_high, mask):
    return compute_naive_policy_gradient_loss(advantages, p), {}


def _loss_clip(p, raw_rewards, advantages, old, cliprange, cliprange_high, mask):
    return compute_grpo_clip_loss(advantages, p, old, cliprange, cliprange_high)


def _loss_gspo(p, raw_rewards, advantages, old, cliprange, cliprange_high, mask):
    return compute_gspo_loss(advantages, p, old, mask, cliprange, cliprange_high)


def _loss_cispo(p, raw_rewards, advantages, old, cliprange, cliprange_high, mask):
    return compute_cispo_loss(
        advantages, p, old, cliprange, cliprange if cliprange_high is None else cliprange_high
    )


@dataclass(frozen=True)
class PolicyLoss:
    """A per-token policy-gradient loss: ``fn(policy_log_probs, raw_rewards, advantages,
    old_log_probs, cliprange, cliprange_high, response_mask) -> (loss (B, T), metadata)`` and the
    inputs it cannot do without (checked before the call)."""

    fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    needs: tuple[str, ...]

    @property
    def clips(self) -> bool:
        """Whether the loss has a clip range (``cliprange``)."""
        return "cliprange" in self.needs


# The per-token losses the registry's entries name (``Algorithm.loss``).
POLICY_LOSSES: dict[str, PolicyLoss] = {
    "reinforce_raw": PolicyLoss(_loss_reinforce_raw, ("raw_rewards",)),  # -r log p (no baseline)
    "reinforce": PolicyLoss(_loss_reinforce, ("advantages",)),  # -A log p
    # PPO/GRPO clipped surrogate, optionally decoupled bounds
    "clip": PolicyLoss(_loss_clip, ("advantages", "old_log_probs", "cliprange")),
    # sequence-level clipped surrogate
    "gspo": PolicyLoss(_loss_gspo, ("advantages", "old_log_probs", "cliprange", "response_mask")),
    # clipped detached IS weight x REINFORCE
    "cispo": PolicyLoss(_loss_cispo, ("advantages", "old_log_probs", "cliprange")),
}


def policy_loss(loss_type: str) -> PolicyLoss:
    """The per-token loss of algorithm ``loss_type``, as its registry entry names it."""
    algo = algorithms.ALGORITHMS.get(loss_type)
    if algo is None or not algo.policy_gradient:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    return POLICY_LOSSES[algo.loss]


def compute_policy_gradient_loss(
    policy_log_probs: torch.Tensor,
    loss_type: str,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
    cliprange_high: float | None = None,
    response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token loss of algorithm ``loss_type`` (its registry entry names it); rewards and
    advantages are (B, 1). ``cliprange`` is the lower clip epsilon and, unless ``cliprange_high``
    is given, the upper one; ``response_mask`` is needed by sequence-level losses (GSPO)."""
    loss = policy_loss(loss_type)
    inputs = {
        "raw_rewards": raw_rewards,
        "advantages": advantages,
        "old_log_probs": old_log_probs,
        "cliprange": cliprange,
        "response_mask": response_mask,
    }
    missing = [k for k in loss.needs if inputs[k] is None]
    if missing:
        raise ValueError(f"loss_type {loss_type!r} needs {', '.join(missing)}")
    return loss.fn(
        policy_log_probs,
        raw_rewards,
        advantages,
        old_log_probs,
        cliprange,
        cliprange_high,
        response_mask,
    )


def aggregate_loss(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    loss_aggregation: str = "seq_mean",
    normalize_constant: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    seq_mean: per-sequence masked mean, then batch mean (CS336/GRPO). token_mean: masked sum over the
    whole batch / number of response tokens (or / ``normalize_constant`` when given, which lets a
    caller normalize by the token count of a larger batch split into microbatches). sum_norm:
    per-sequence masked sum / ``normalize_constant`` (default T), then batch mean (Dr. GRPO).
    """
    if loss_aggregation == "seq_mean":
        return masked_mean(per_token_loss, response_mask, dim=-1).mean()
    if loss_aggregation == "token_mean":
        denom = normalize_constant if normalize_constant is not None else response_mask.sum().clamp(min=1)
        return masked_normalize(per_token_loss, response_mask, 1.0) / denom
    if loss_aggregation == "sum_norm":
        c = normalize_constant if normalize_constant is not None else per_token_loss.shape[-1]
        return masked_normalize(per_token_loss, response_mask, c, dim=-1).mean()
    raise ValueError(f"unknown loss_aggregation {loss_aggregation!r}; expected one of {LOSS_AGGREGATIONS}")


def grpo_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: float,
    loss_type: str,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
    loss_aggregation: str = "seq_mean",
    normalize_constant: float | None = None,
    token_weights: torch.Tensor | None = None,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss of one microbatch, / ``gradient_accumulation_steps``, backpropagated.

    Default aggregation is CS336's (per-sequence masked mean, then batch mean); see
    ``aggregate_loss`` for the others. ``token_weights`` (B, T), e.g. ``compute_tis_weights``,
    multiply the per-token loss as constants before aggregation. metadata: ``response_tokens``;
    for the losses with a ratio, the per-token ``ratio`` and ``clipped`` (detached) and
    ``clip_fraction`` (over response tokens). How far pi_theta is from pi_old (ratio statistics,
    KL) is ``policy_drift_sums``'s, the one place the logged drift metrics come from.
    """
    per_token, meta = compute_policy_gradient_loss(
        policy_log_probs,
        loss_type,
        raw_rewards,
        advantages,
        old_log_probs,
        cliprange,
        cliprange_high=cliprange_high,
        response_mask=response_mask,
    )
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    loss = aggregate_loss(per_token, response_mask, loss_aggregation, normalize_constant)
    loss = loss / gradient_accumulation_steps
    loss.backward()
    out: dict[str, torch.Tensor] = dict(meta)
    with torch.no_grad():
        mask = response_mask.bool()
        out["response_tokens"] = mask.sum()
        if "ratio" in meta:
            out["clip_fraction"] = masked_mean(meta["clipped"].float(), mask)
    return loss.detach(), out
