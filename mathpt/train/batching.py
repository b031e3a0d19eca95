"""How a batch is cut: response lengths, microbatches, and the minibatch plans of a PG update.

The one home of the cutting that SFT (``train/sft.py``), the PG update (``train/steps.py``) and the
old log-probs (``compute_old_log_probs``, ``train/pg.py``'s behaviour copy) share; ``update_plan``
reads an update's cuts off its ``UpdateSettings``. Microbatches are
cut by rows or by a token budget (padded tokens, or real tokens when they run packed,
``mathpt.train.packing``); the losses are normalized so the gradient of a step never depends on
the cut. Index tensors only: nothing here touches a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mathpt.train.settings import UpdateSettings


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the leading columns that matter: up to and including the last response token (0: none)."""
    m = response_mask.bool()
    last = m.shape[1] - m.flip(1).long().argmax(1)
    return torch.where(m.any(1), last, 0)


def token_budget_microbatches(
    lengths: torch.Tensor, max_tokens: int, max_rows: int | None = None, packed: bool = False
) -> list[torch.Tensor]:
    """Split rows into microbatches of at most ``max_tokens`` padded tokens (rows x longest row), or
    with ``packed`` of at most ``max_tokens`` real tokens (the sum of lengths: a packed microbatch
    computes no padding).

    Rows are taken longest first, so each microbatch holds rows of similar length: after trimming,
    little padding is left, and short rollouts share a microbatch instead of each costing a slot
    of the longest one. A single row longer than the budget gets a microbatch of its own.
    Returns index tensors into ``lengths``.
    """
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    out: list[list[int]] = []
    used = 0  # tokens of the current microbatch, as the budget counts them
    for i in order:
        cur = out[-1] if out else None
        n = max(int(lengths[i]), 1)
        if packed:
            cost = used + n
        else:
            cost = (len(cur) + 1) * max(int(lengths[cur[0]]), 1) if cur else n  # rows arrive longest first
        if cur is not None and cost <= max_tokens and (max_rows is None or len(cur) < max_rows):
            cur.append(i)
            used = cost
        else:
            out.append([i])
            used = n
    return [torch.tensor(rows, dtype=torch.long) for rows in out]


def microbatch_cuts(
    lengths: torch.Tensor, max_rows: int | None, max_tokens: int | None = None, packed: bool = False
) -> list[torch.Tensor]:
    """The microbatches (index tensors into ``lengths``) of rows of these lengths.

    ``max_tokens`` None: ``max_rows`` rows at a time, in the given order. Otherwise
    ``token_budget_microbatches`` (longest first; ``max_rows`` caps the rows, None = no cap).
    """
    if max_tokens is not None:
        return token_budget_microbatches(lengths, max_tokens, max_rows, packed=packed)
    n = len(lengths)
    return [torch.arange(s, min(s + max_rows, n)) for s in range(0, n, max_rows)]


def _minibatches(n: int, size: int, epochs: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for s in range(0, n, size):
            yield order[s : s + size]


def minibatch_plan(
    response_mask: torch.Tensor,
    minibatch_size: int | None = None,
    microbatch_size: int | None = None,
    microbatch_tokens: int | None = None,
    packing: bool = False,
    epochs: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    sort_by_length: bool = True,
) -> list[list[torch.Tensor]]:
    """``pg_update``'s cuts: per optimizer step, the row indices of each of its microbatches.

    Deterministic in its arguments, so a caller computing old log-probs (``train_pg``'s behaviour
    copy) cuts exactly as the updates will. The first ``ceil(B / minibatch_size)`` steps (one epoch)
    cover every row once.
    """
    n = response_mask.shape[0]
    minibatch_size = minibatch_size or n
    microbatch_size = microbatch_size or minibatch_size
    lengths = response_lengths(response_mask)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    plan = []
    for idx in _minibatches(n, minibatch_size, epochs, gen):
        if sort_by_length:
            idx = idx[torch.argsort(lengths[idx], descending=True, stable=True)]
        cuts = microbatch_cuts(lengths[idx], microbatch_size, microbatch_tokens, packed=packing)
        plan.append([idx[g] for g in cuts])
    return plan


def first_epoch_microbatches(
    plan: list[list[torch.Tensor]], n: int, minibatch_size: int | None
) -> list[torch.Tensor]:
    """The microbatches of the plan's first epoch: every row once, cut as the updates cut it."""
    return [g for step in plan[: math.ceil(n / (minibatch_size or n))] for g in step]


def update_plan(response_mask: torch.Tensor, settings: UpdateSettings, seed: int) -> list[list[torch.Tensor]]:
    """``pg_update(batch, settings, seed=seed)``'s cuts of a batch: ``minibatch_plan`` with its settings."""
    return minibatch_plan(
        response_mask,
        settings.minibatch_size,
        settings.microbatch_size,
        settings.microbatch_tokens,
        settings.packing,
        settings.epochs,
        seed=seed,
    )


def first_epoch_cuts(response_mask: torch.Tensor, settings: UpdateSettings, seed: int) -> list[torch.Tensor]:
    """The microbatches of ``update_plan``'s first epoch (every row once), for the old log-probs."""
    plan = update_plan(response_mask, settings, seed)
    return first_epoch_microbatches(plan, response_mask.shape[0], settings.minibatch_size)
