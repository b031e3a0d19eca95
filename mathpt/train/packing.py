"""Padding-free forward passes: the sequences of a right-padded microbatch packed into one row.

A microbatch of R right-padded rows (R, T) costs R x T tokens of compute however short most rows
are. Packing concatenates each row's real tokens (up to its last response token) into one row
(1, N), positions restarting at 0 per sequence, and runs attention that never crosses sequences,
so the forward and backward cost N tokens. Log-probs and entropies come back scattered into the
(R, T) layout the losses use (0 past each row's end), so every loss in ``mathpt.functional``
works unchanged and the gradient equals the padded path's.

Attention across sequences is cut by a transformers attention function registered here as
``"mathpt_packed"`` and switched on only for the packed forward (``packed_attention``): on CUDA
with bf16/fp16 it calls ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen, torch
>= 2.10, no flash_attn package), elsewhere (CPU, fp32/fp64) it runs causal SDPA one sequence at a
time. transformers' own position_ids path would instead build a dense (N, N) block-diagonal mask
for SDPA, whose attention cost grows with N^2 (transformers docs, "Padding-free training").
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mathpt.train.batching import response_lengths

ATTN_NAME = "mathpt_packed"


def pack_layout(lengths: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    """Where each row's first ``lengths[i]`` columns go in the packed row.

    Returns ``keep`` (R, width) bool (the packed tokens, in row-major order), ``position_ids``
    (1, N) restarting at 0 per sequence, and ``cu_seq_lens`` (S + 1,) int32, the boundaries of the
    S non-empty sequences (FlashAttention's convention).
    """
    lengths = lengths.clamp(min=0, max=width)
    cols = torch.arange(width, device=lengths.device)
    keep = cols[None, :] < lengths[:, None]
    pos = cols[None, :].expand_as(keep)[keep][None, :]
    nonempty = lengths[lengths > 0]
    cu = F.pad(torch.cumsum(nonempty, 0, dtype=torch.int32), (1, 0))
    return {"keep": keep, "position_ids": pos, "cu_seq_lens": cu}


def _unpack(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(1, N) packed values -> (R, T) with zeros outside ``keep`` (differentiable)."""
    return values.new_zeros(keep.shape).masked_scatter(keep, values.reshape(-1))


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module):
    """Run the model's attention through ``packed_attention_forward`` inside the block.

    The config is shared by every attention module of an HF model, so one attribute switches them
    all; the previous implementation is restored on exit (the inference engines never see this).
    """
    register()
    cfg = model.config
    before = cfg._attn_implementation
    cfg._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        cfg._attn_implementation = before


def packed_response_log_probs(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    response_mask: torch.Tensor,
    return_token_entropy: bool = False,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """``get_response_log_probs`` of a right-padded microbatch, computed on its packed row.

    Same outputs (R, T) as the padded forward on every position up to each row's last response
    token, 0 after it. Rows must be right-padded (no attention mask: a left-padded batch would pack
    its padding as if it were text).
    """
    from mathpt.functional import get_response_log_probs

    layout = pack_layout(response_lengths(response_mask), input_ids.shape[1])
    keep = layout["keep"]
    n = int(layout["cu_seq_lens"][-1])
    if n == 0:  # nothing to score: the padded forward gives the right zeros (masked out) and shapes
        return get_response_log_probs(
            model, input_ids, labels, return_token_entropy=return_token_entropy, chunk_size=chunk_size
        )
    cu = layout["cu_seq_lens"].to(input_ids.device)
    lens = cu.diff()
    attn = {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": int(lens.max()),
        "max_length_k": int(lens.max()),
    }
    with packed_attention(model):
        out = get_response_log_probs(
            model,
            input_ids[keep][None],
            labels[keep][None],
            return_token_entropy=return_token_entropy,
            chunk_size=chunk_size,
            position_ids=layout["position_ids"].to(input_ids.device),
            attn_kwargs=attn,
        )
    return {k: _unpack(v, keep) for k, v in out.items()}


def packed_attention_forward(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence; transformers' attention-function signature.

    query (1, H, N, D), key/value (1, Hkv, N, D) -> (1, N, H, D). Sequence boundaries come from
    ``cu_seq_lens_q`` (passed through the model's forward kwargs by ``packed_response_log_probs``).
    """
    if attention_mask is not None or cu_seq_lens_q is None:
        raise ValueError(
            "mathpt_packed attention needs cu_seq_lens_q and no attention mask "
            "(use it through packed_response_log_probs)"
        )
    if sliding_window is not None or query.shape[0] != 1:
        raise NotImplementedError("packed attention: one packed row, no sliding window")
    h, hkv = query.shape[1], key.shape[1]
    use_flash = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0
    if use_flash:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, heads, D)
        return _varlen_causal(q, k, v, cu_seq_lens_q, max_length_q, scaling)[None], None
    bounds = cu_seq_lens_q.tolist()
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, s:e],
            key[:, :, s:e],
            value[:, :, s:e],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=h != hkv,
        )
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _varlen_causal(q, k, v, cu: torch.Tensor, max_len: int, scale: float | None) -> torch.Tensor:
    """Causal ``varlen_attn`` across torch versions: 2.10-2.12 take ``is_causal`` and no GQA, later ones
    ``window_size`` and ``enable_gqa``; without GQA support the kv heads are repeated (as HF's repeat_kv)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **kw)


_REGISTERED = False


def register() -> None:
    """Register ``packed_attention_forward`` with transformers as ``"mathpt_packed"`` (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, packed_attention_forward)
        _REGISTERED = True
