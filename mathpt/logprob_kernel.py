"""The chunked LM-head kernel: per-token log-probs (and entropy) of ``hidden @ W.T`` without
materializing (tokens, vocab) fp32 logits, forward and backward.

Why hand-written: a 151,936-token vocabulary costs ~0.6 MB of fp32 logits per token, so the naive
``log_softmax(lm_head(h))`` dominates training memory; no library we depend on offers a fused
linear + log-softmax + entropy with its backward (Liger's needs its own package and CUDA). On CUDA the
block functions are compiled with ``torch.compile`` (``MATHPT_COMPILE_HEAD``: auto | 1 | 0), falling
back to eager for good if compiling fails. ``mathpt.functional.get_response_log_probs`` is the user.
"""

from __future__ import annotations

import os
import warnings

import torch

# Elements of fp32 logits per chunk when the caller gives no chunk size: 2**27 floats = 512 MiB,
# i.e. ~880 tokens of a 151,936-token vocab, and one chunk for a tiny CPU model.
LOGITS_CHUNK_ELEMENTS = 2**27


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
