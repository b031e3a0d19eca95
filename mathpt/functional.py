"""Pure tensor functions for SFT and policy-gradient training (CS336 assignment 5 names and semantics).

No I/O here. Everything a trainer needs to turn (prompt, response, reward) into a loss lives in
this module; the update loops that call these functions are in ``mathpt.train.steps``.
"""

from __future__ import annotations

import os
import warnings

import torch

from mathpt.algorithms import PG_ALGOS


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

# Elements of fp32 logits per chunk when the caller gives no chunk size: 2**27 floats = 512 MiB,
# i.e. ~880 tokens of a 151,936-token vocab, and one chunk for a tiny CPU model.
LOGITS_CHUNK_ELEMENTS = 2**27


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


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _acc_dtype(cdt: torch.dtype) -> torch.dtype:
    """Softmax statistics run in fp32, or fp64 for fp64 models (float64 references in tests)."""
    return torch.float64 if cdt == torch.float64 else torch.float32


def _blocks(n: int, vocab: int, chunk_size: int) -> tuple[int, int]:
    """(rows, cols) of one logits block holding about ``chunk_size * vocab`` elements.

    Up to 16 x chunk_size rows share one block (one row block for a usual microbatch): dW of each
    vocab slice then comes from a single matmul, without fp32 accumulation across row blocks.
    """
    rows = min(n, 16 * chunk_size)
    cols = max(1, min(vocab, (chunk_size * vocab) // max(rows, 1)))
    if cols > 128:  # keep vocab slices 256-byte aligned: odd widths push cuBLAS/Triton off their fast paths
        cols -= cols % 128
    return max(rows, 1), cols


def _block_logits(h, w, b, rows, v0, v1):
    return torch.nn.functional.linear(h[rows], w[v0:v1], None if b is None else b[v0:v1])


def _fwd_block(z, m_old, s_old, t_old, zl_old, idx, acc: torch.dtype):
    """Fold one logits block into the running (max, sum exp, sum exp * shifted logit, label logit)."""
    z = z.to(acc)
    m_new = torch.maximum(m_old, z.amax(-1))
    scale = torch.exp(m_old - m_new)  # 0 on the first block (m_old = -inf)
    shift = torch.where(torch.isinf(m_old), torch.zeros_like(m_new), m_new - m_old)
    zs = z - m_new.unsqueeze(-1)
    e = torch.exp(zs)
    # t is relative to the running max: moving the max by `shift` moves every old term by -shift
    t_new = scale * (t_old - shift * s_old) + (e * zs).sum(-1)
    s_new = scale * s_old + e.sum(-1)
    cols = z.shape[-1]
    hit = (idx >= 0) & (idx < cols)
    got = zs.gather(-1, idx.clamp(0, cols - 1).unsqueeze(-1)).squeeze(-1) + m_new
    return m_new, s_new, t_new, torch.where(hit, got, zl_old)


def _bwd_block(z, m, log_s, ent, g_lp, g_ent, idx, out_dtype: torch.dtype, acc: torch.dtype):
    """d(sum g_lp logp + g_ent H)/dz for one block: g_lp (onehot - p) - g_ent p (log p + H)."""
    logp = z.to(acc) - m.unsqueeze(-1) - log_s.unsqueeze(-1)
    p = torch.exp(logp)
    gl = g_lp.unsqueeze(-1)
    if g_ent is None:
        dz = -p * gl
    else:
        dz = -p * (gl + g_ent.to(acc).unsqueeze(-1) * (logp + ent.unsqueeze(-1)))
    cols = torch.arange(z.shape[-1], device=z.device)
    dz = dz + torch.where(
        cols.unsqueeze(0) == idx.unsqueeze(-1), gl, torch.zeros((), dtype=acc, device=z.device)
    )
    return dz.to(out_dtype)


# On CUDA the block math is compiled (one fused kernel reads each logits block once instead of
# ~10 fp32 passes); elsewhere it runs eagerly. MATHPT_COMPILE_HEAD=0/1 forces either way.
_KERNELS: dict[str, tuple] = {}


def _with_fallback(compiled, eager, device_type: str):
    """Run ``compiled``; if compiling fails (no Triton/C compiler, ...), warn once and go eager for good."""

    def call(*args):
        try:
            return compiled(*args)
        except Exception as exc:  # the block functions are pure, so rerunning eagerly is safe
            warnings.warn(
                f"compiling the chunked log-prob kernels failed ({exc!r}); running them eagerly", stacklevel=2
            )
            _KERNELS[device_type] = (_fwd_block, _bwd_block)
            return eager(*args)

    return call


def _kernels(device_type: str) -> tuple:
    if device_type not in _KERNELS:
        flag = os.environ.get("MATHPT_COMPILE_HEAD", "auto")
        use = flag == "1" or (flag == "auto" and device_type == "cuda")
        if use:
            _KERNELS[device_type] = (
                _with_fallback(torch.compile(_fwd_block, dynamic=True), _fwd_block, device_type),
                _with_fallback(torch.compile(_bwd_block, dynamic=True), _bwd_block, device_type),
            )
        else:
            _KERNELS[device_type] = (_fwd_block, _bwd_block)
    return _KERNELS[device_type]


class _ChunkedLinearLogProbs(torch.autograd.Function):
    """log p(label) and entropy of softmax(h W^T + b) without ever holding (N, V) logits.

    Logits are produced one (rows x cols) block at a time. The forward keeps per-token online-softmax
    statistics (running max m, sum s = sum exp(z - m), t = sum exp(z - m)(z - m), the label logit),
    so entropy = log s - t / s never subtracts two large numbers. The backward recomputes each block
    with the very same matmul (so z - m is exact where the forward had it exact), forms
    dz = g_lp (onehot - p) - g_H p (log p + H), and writes dW for its vocab slice once (fp32
    accumulation over row blocks) while dh accumulates in fp32. Hand-written because the fused
    kernels that do this (Liger's fused linear cross-entropy) are CUDA/Triton-only, return a loss
    rather than per-token log-probs, and give no entropy.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, chunk_size, with_entropy):
        cdt = _compute_dtype(h, weight)
        acc = _acc_dtype(cdt)
        n, vocab = h.shape[0], weight.shape[0]
        rb, cb = _blocks(n, vocab, chunk_size)
        hc, w = h.to(cdt), weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        m = torch.full((n,), -torch.inf, dtype=acc, device=h.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m)
        zl = torch.zeros_like(m)
        fwd, _ = _kernels(h.device.type)
        with torch.autocast(h.device.type, enabled=False):
            for v0 in range(0, vocab, cb):
                v1 = min(vocab, v0 + cb)
                for r0 in range(0, n, rb):
                    rows = slice(r0, min(n, r0 + rb))
                    z = _block_logits(hc, w, b, rows, v0, v1)
                    m[rows], s[rows], t[rows], zl[rows] = fwd(
                        z, m[rows], s[rows], t[rows], zl[rows], labels[rows] - v0, acc
                    )
                    del z
        log_s = torch.log(s)
        logp = zl - m - log_s
        ent = log_s - t / s
        ctx.save_for_backward(h, weight, bias, labels, m, log_s, ent)
        ctx.cdt = cdt
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, bias, labels, m, log_s, ent = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None
        cdt = ctx.cdt
        acc = _acc_dtype(cdt)
        n, vocab = h.shape[0], weight.shape[0]
        rb, cb = _blocks(n, vocab, ctx.chunk_size)
        hc, w = h.to(cdt), weight.to(cdt)
        b = bias.to(cdt) if bias is not None else None
        g_lp = g_logp.to(acc) if g_logp is not None else torch.zeros_like(m)
        g_h = torch.zeros(h.shape, dtype=acc, device=h.device) if ctx.needs_input_grad[0] else None
        need_w, need_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        g_w = torch.empty_like(weight) if need_w else None
        g_b = torch.empty_like(bias) if need_b else None
        single = rb >= n  # one row block: dW of a vocab slice comes from a single matmul
        _, bwd = _kernels(h.device.type)
        with torch.autocast(h.device.type, enabled=False):
            for v0 in range(0, vocab, cb):
                v1 = min(vocab, v0 + cb)
                gw_acc = (
                    None
                    if single or not need_w
                    else torch.zeros((v1 - v0, h.shape[1]), dtype=acc, device=h.device)
                )
                gb_acc = torch.zeros((v1 - v0,), dtype=acc, device=h.device) if need_b else None
                for r0 in range(0, n, rb):
                    rows = slice(r0, min(n, r0 + rb))
                    z = _block_logits(hc, w, b, rows, v0, v1)
                    dzc = bwd(
                        z,
                        m[rows],
                        log_s[rows],
                        ent[rows],
                        g_lp[rows],
                        None if g_ent is None else g_ent[rows],
                        labels[rows] - v0,
                        cdt,
                        acc,
                    )
                    del z
                    if g_h is not None:
                        g_h[rows] += dzc @ w[v0:v1]
                    if need_w:
                        if single:
                            g_w[v0:v1] = (dzc.t() @ hc[rows]).to(weight.dtype)
                        else:
                            gw_acc += dzc.t() @ hc[rows]
                    if gb_acc is not None:
                        gb_acc += dzc.to(acc).sum(0)
                if gw_acc is not None:
                    g_w[v0:v1] = gw_acc.to(weight.dtype)
                if gb_acc is not None:
                    g_b[v0:v1] = gb_acc.to(bias.dtype)
        return (g_h.to(h.dtype) if g_h is not None else None), g_w, g_b, None, None, None


def chunked_log_probs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_token_entropy: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token log p(label) (and entropy) of ``hidden @ weight.T (+ bias)`` computed chunk by chunk.

    ``hidden`` (..., D), ``labels`` (...) -> tensors shaped like ``labels``, fp32. Matches the naive
    ``log_softmax(linear(hidden).float()).gather(labels)`` while holding at most ``chunk_size`` x V
    fp32 logits (forward and backward).
    """
    shape = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1)
    if chunk_size is None:
        chunk_size = max(1, LOGITS_CHUNK_ELEMENTS // weight.shape[0])
    logp, ent = _ChunkedLinearLogProbs.apply(h, weight, bias, lab, int(chunk_size), return_token_entropy)
    out = {"log_probs": logp.view(shape)}
    if return_token_entropy:
        out["token_entropy"] = ent.view(shape)
    return out


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


def sft_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: float,
    normalize_constant: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the response tokens, backpropagated for one microbatch.

    loss = mean over the batch of -(masked sum over the sequence / normalize_constant), divided by
    ``gradient_accumulation_steps`` so that summing microbatch gradients gives the batch gradient.
    """
    nll = -masked_normalize(policy_log_probs, response_mask, normalize_constant, dim=-1)
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


def compute_group_normalized_rewards(
    reward_fn,
    rollout_responses: list[str],
    repeated_ground_truths: list[str],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Score each response and turn rewards into group-relative advantages.

    Responses come in consecutive groups of ``group_size`` (the samples of one prompt). advantage =
    (r - group mean) / (group std + eps) with the unbiased std, or r - group mean when
    ``normalize_by_std`` is false. A group whose rewards are all equal gets zero advantages.
    Returns (advantages (B,), raw_rewards (B,), metadata of floats for logging).
    """
    n = len(rollout_responses)
    if n != len(repeated_ground_truths):
        raise ValueError(f"{n} responses but {len(repeated_ground_truths)} ground truths")
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} responses do not split into groups of {group_size}")
    scores = [reward_fn(r, g) for r, g in zip(rollout_responses, repeated_ground_truths, strict=True)]
    raw = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)
    grouped = raw.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if group_size > 1:
        std = grouped.std(dim=1, keepdim=True)  # unbiased
    else:
        std = torch.zeros_like(grouped)
    adv = centered / (std + advantage_eps) if normalize_by_std else centered
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
    return adv.reshape(-1), raw, meta


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO/GRPO clipped surrogate -min(r A, clip(r, 1-c, 1+c) A), r = p / p_old.

    metadata: ``clipped`` (B, T) bool, true where the clipped term is the smaller one (the
    gradient is cut off there), and ``ratio`` (B, T), detached.
    """
    adv = advantages.to(policy_log_probs.dtype)
    ratio = torch.exp(policy_log_probs - old_log_probs.to(policy_log_probs.dtype))
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, {"clipped": (clipped < unclipped).detach(), "ratio": ratio.detach()}


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


def compute_policy_gradient_loss(
    policy_log_probs: torch.Tensor,
    loss_type: str,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dispatch to the per-token loss of ``loss_type``; rewards/advantages are (B, 1)."""
    if loss_type == "no_baseline":
        if raw_rewards is None:
            raise ValueError("loss_type 'no_baseline' needs raw_rewards")
        return compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        if advantages is None:
            raise ValueError("loss_type 'reinforce_with_baseline' needs advantages")
        return compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}
    if loss_type == "grpo_clip":
        if advantages is None or old_log_probs is None or cliprange is None:
            raise ValueError("loss_type 'grpo_clip' needs advantages, old_log_probs and cliprange")
        return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss of one microbatch, / ``gradient_accumulation_steps``, backpropagated.

    Default aggregation is CS336's (per-sequence masked mean, then batch mean); see
    ``aggregate_loss`` for the others. ``token_weights`` (B, T), e.g. ``compute_tis_weights``,
    multiply the per-token loss as constants before aggregation. metadata holds detached scalars
    for logging: for grpo_clip ``clip_fraction`` (over response tokens) and ratio mean/min/max,
    plus the per-token tensors.
    """
    per_token, meta = compute_policy_gradient_loss(
        policy_log_probs, loss_type, raw_rewards, advantages, old_log_probs, cliprange
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
            ratio = meta["ratio"]
            big = torch.finfo(ratio.dtype).max
            out["clip_fraction"] = masked_mean(meta["clipped"].float(), mask)
            out["ratio_mean"] = masked_mean(ratio, mask)
            out["ratio_max"] = torch.where(mask, ratio, -big).max() if mask.any() else ratio.new_tensor(1.0)
            out["ratio_min"] = torch.where(mask, ratio, big).min() if mask.any() else ratio.new_tensor(1.0)
            # k1 estimator of KL(old || new) over response tokens
            out["approx_kl"] = masked_mean((old_log_probs - policy_log_probs.detach()).float(), mask)
    return loss.detach(), out
