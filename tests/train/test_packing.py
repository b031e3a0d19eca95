"""mathpt.train.packing: a packed forward equals running each sequence alone, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_qwen

from mathpt.functional import naive_response_log_probs
from mathpt.train.batching import response_lengths
from mathpt.train.packing import pack_layout, packed_response_log_probs

V = 97


def padded_batch(seed: int, rows: int = 7, width: int = 23) -> dict[str, torch.Tensor]:
    """Right-padded rows of random length; one row without response tokens, one of full width."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (rows, width + 1), generator=gen)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for i in range(rows):
        p = int(torch.randint(1, 6, (1,), generator=gen))
        r = (
            0
            if i == 2
            else width - p + 1
            if i == 4
            else int(torch.randint(1, width - p + 1, (1,), generator=gen))
        )
        mask[i, p - 1 : p - 1 + r] = True
        ids[i, p + r :] = 0
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "response_mask": mask}


def test_pack_layout_restarts_positions_per_sequence():
    lengths = torch.tensor([3, 0, 5, 1])
    lay = pack_layout(lengths, 6)
    assert lay["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0]]
    assert lay["cu_seq_lens"].tolist() == [0, 3, 8, 9]
    assert lay["keep"].sum(1).tolist() == [3, 0, 5, 1]


def test_response_lengths_end_at_the_last_response_token():
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    assert response_lengths(mask).tolist() == [3, 0, 5]


def test_packed_log_probs_and_gradients_equal_one_sequence_at_a_time():
    model = tiny_qwen(torch.float64)
    batch = padded_batch(0)
    mask = batch["response_mask"]
    lengths = response_lengths(mask)

    packed = copy.deepcopy(model)
    out = packed_response_log_probs(
        packed, batch["input_ids"], batch["labels"], mask, return_token_entropy=True
    )
    loss = -(
        torch.where(mask, out["log_probs"], 0.0).sum()
        + 0.1 * torch.where(mask, out["token_entropy"], 0.0).sum()
    )
    loss.backward()

    alone = copy.deepcopy(model)
    ref_loss = torch.zeros((), dtype=torch.float64)
    for i in range(mask.shape[0]):
        n = int(lengths[i])
        if n == 0:
            continue
        ref = naive_response_log_probs(
            alone,
            batch["input_ids"][i : i + 1, :n],
            batch["labels"][i : i + 1, :n],
            return_token_entropy=True,
        )
        m = mask[i : i + 1, :n]
        torch.testing.assert_close(out["log_probs"][i, :n], ref["log_probs"][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            out["token_entropy"][i, :n], ref["token_entropy"][0], rtol=1e-10, atol=1e-12
        )
        assert (out["log_probs"][i, n:] == 0).all()
        ref_loss = ref_loss - (
            torch.where(m, ref["log_probs"], 0.0).sum()
            + 0.1 * torch.where(m, ref["token_entropy"], 0.0).sum()
        )
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-12, atol=1e-12)
    for p, r in zip(packed.parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-12)
    assert packed.config._attn_implementation == model.config._attn_implementation  # switched back


def test_packing_differs_from_attention_across_sequences():
    """The check above can fail: packing the same tokens without restarting attention changes them."""
    model = tiny_qwen(torch.float64)
    batch = padded_batch(1)
    mask = batch["response_mask"]
    lay = pack_layout(response_lengths(mask), mask.shape[1])
    keep = lay["keep"]
    leaky = naive_response_log_probs(
        model,
        batch["input_ids"][keep][None],
        batch["labels"][keep][None],
        position_ids=lay["position_ids"],
        attention_mask=torch.ones_like(lay["position_ids"]),
    )
    good = packed_response_log_probs(model, batch["input_ids"], batch["labels"], mask)["log_probs"][keep]
    assert not torch.allclose(leaky["log_probs"][0], good, atol=1e-6)


def test_packed_attention_refuses_a_mask():
    from mathpt.train.packing import packed_attention_forward

    q = torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        packed_attention_forward(None, q, q, q, attention_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))
