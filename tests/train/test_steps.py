"""mathpt.train.steps on a tiny random Qwen2: exact gradients, off-policy GRPO-clip, microbatching."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import tiny_qwen as shared_tiny_qwen

from mathpt.functional import aggregate_loss, compute_policy_gradient_loss, naive_response_log_probs
from mathpt.optim import MasterWeightAdamW
from mathpt.train.settings import update_settings
from mathpt.train.steps import compute_old_log_probs, pg_update, sft_update

V, B, T = 89, 8, 14


def settings(loss_type: str, **over):
    """pg_update's settings: the schema's defaults, except rows cut by microbatch_size (no token
    budget, no packing) and sum_norm's constant the batch width T, unless ``over`` says otherwise."""
    return update_settings(
        loss_type, **{"microbatch_tokens": None, "packing": False, "max_new_tokens": T, **over}
    )


tiny_qwen = functools.partial(shared_tiny_qwen, vocab_size=V)  # the one definition: conftest.py


@pytest.fixture(scope="module")
def model64():
    return tiny_qwen()


def rollout(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows: a prompt of 3-5 tokens, then a response of 0-8 tokens, then padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T + 1), generator=gen)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        p = int(torch.randint(3, 6, (1,), generator=gen))
        r = 0 if i == 1 else int(torch.randint(1, 9, (1,), generator=gen))
        mask[i, p - 1 : p - 1 + r] = True
        ids[i, p + r :] = 0  # pad
    rewards = (torch.rand(B, generator=gen) < 0.5).float()
    grp = rewards.view(-1, 4)
    adv = ((grp - grp.mean(1, keepdim=True)) / (grp.std(1, keepdim=True) + 1e-6)).reshape(-1)
    return {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "response_mask": mask,
        "raw_rewards": rewards,
        "advantages": adv,
    }


def reference_pg_grad(model, batch, loss_type, aggregation="seq_mean"):
    """Gradient of the whole-batch loss through the naive full-logits formula (no microbatches)."""
    m = copy.deepcopy(model)
    lp = naive_response_log_probs(m, batch["input_ids"], batch["labels"])["log_probs"]
    per_tok, _ = compute_policy_gradient_loss(
        lp,
        loss_type,
        batch["raw_rewards"].double()[:, None],
        batch["advantages"].double()[:, None],
        lp.detach(),
        0.2,
    )
    aggregate_loss(per_tok, batch["response_mask"], aggregation).backward()
    return [p.grad.clone() for p in m.parameters()]


def sgd_delta(model, fn, lr=1.0):
    m = copy.deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    metrics = fn(m, opt)
    return [(b - p.detach()) / lr for b, p in zip(before, m.parameters(), strict=True)], metrics


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean", "sum_norm"])
def test_pg_update_gradient_equals_full_batch_reference(model64, aggregation):
    batch = rollout(1)
    ref = reference_pg_grad(model64, batch, "reinforce_with_baseline", aggregation)
    for loss_type in ("reinforce_with_baseline", "grpo_clip"):
        got, metrics = sgd_delta(
            model64,
            lambda m, o, lt=loss_type: pg_update(
                m,
                o,
                batch,
                settings(
                    lt, cliprange=0.2, microbatch_size=2, max_grad_norm=None, loss_aggregation=aggregation
                ),
                seed=0,
                chunk_size=5,
            ),
        )
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)
        assert metrics["optimizer_steps"] == 1


def test_grpo_clip_equals_reinforce_with_baseline_for_one_step_per_batch(model64):
    batch = rollout(2)
    kw = {"microbatch_size": 2, "max_grad_norm": None}
    a, ma = sgd_delta(
        model64, lambda m, o: pg_update(m, o, batch, settings("grpo_clip", cliprange=0.2, **kw), seed=0)
    )
    b, _ = sgd_delta(
        model64, lambda m, o: pg_update(m, o, batch, settings("reinforce_with_baseline", **kw), seed=0)
    )
    assert any(x.abs().max() > 0 for x in a)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    assert ma["ratio_min"] == pytest.approx(1.0) and ma["ratio_max"] == pytest.approx(1.0)
    assert ma["clip_fraction"] == 0.0


def test_grpo_clip_is_off_policy_after_the_first_step(model64):
    batch = rollout(3)
    m = copy.deepcopy(model64)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-2)
    metrics = pg_update(
        m,
        opt,
        batch,
        settings("grpo_clip", cliprange=0.05, epochs_per_batch=2, minibatch_size=4, microbatch_size=2),
        seed=0,
    )
    steps = metrics["per_step"]
    assert len(steps) == 4 and metrics["optimizer_steps"] == 4
    first, later = steps[0], steps[1:]
    assert first["ratio_min"] == pytest.approx(1.0) and first["ratio_max"] == pytest.approx(1.0)
    assert first["clip_fraction"] == 0.0
    assert max(abs(s["ratio_max"] - 1) + abs(s["ratio_min"] - 1) for s in later) > 0.05
    assert max(s["clip_fraction"] for s in later) > 0.0


def test_given_old_log_probs_are_the_behaviour_policy(model64):
    batch = rollout(4)
    old = compute_old_log_probs(model64, batch, microbatch_size=4, autocast_dtype=None)
    want = naive_response_log_probs(model64, batch["input_ids"], batch["labels"])["log_probs"].detach()
    mask = batch["response_mask"]
    torch.testing.assert_close(old[mask].double(), want[mask], rtol=1e-6, atol=1e-6)
    shifted = dict(batch, old_log_probs=old - 0.5)  # as if the sampler's policy was different
    m = copy.deepcopy(model64)
    metrics = pg_update(
        m, torch.optim.SGD(m.parameters(), lr=0.0), shifted, settings("grpo_clip", cliprange=0.2), seed=0
    )
    assert metrics["ratio_min"] == pytest.approx(torch.exp(torch.tensor(0.5)).item(), rel=1e-5)
    assert metrics["clip_fraction"] > 0.0


def test_sft_update_equals_full_batch_gradient(model64):
    batch = rollout(5)
    full = copy.deepcopy(model64)
    lp = naive_response_log_probs(full, batch["input_ids"], batch["labels"])["log_probs"]
    loss = (
        -torch.where(batch["response_mask"], lp, 0.0).sum() / batch["response_mask"].sum()
    )  # per response token
    loss.backward()
    ref = [p.grad for p in full.parameters()]
    micro = [{k: batch[k][s : s + 4] for k in ("input_ids", "labels", "response_mask")} for s in (0, 4)]
    got, metrics = sgd_delta(
        model64, lambda m, o: sft_update(m, o, micro, max_grad_norm=None, autocast_dtype=None)
    )
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-9)
    assert metrics["tokens"] == batch["response_mask"].sum().item()


def test_bf16_model_with_master_weights_trains_under_autocast():
    model = tiny_qwen(torch.bfloat16, seed=1)
    batch = rollout(6)
    opt = MasterWeightAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = pg_update(
        model,
        opt,
        batch,
        settings("grpo_clip", cliprange=0.2, epochs_per_batch=2, minibatch_size=4, microbatch_size=2),
        seed=0,
        autocast_dtype=torch.bfloat16,
    )
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if isinstance(v, float))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert metrics["entropy"] > 0


def test_token_budget_microbatches_cover_rows_and_respect_budget():
    from mathpt.train.batching import token_budget_microbatches

    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 50, (37,), generator=gen)
    groups = token_budget_microbatches(lengths, max_tokens=120, max_rows=6)
    assert sorted(torch.cat(groups).tolist()) == list(range(37))
    for g in groups:
        longest = int(lengths[g].max())
        assert len(g) <= 6
        assert len(g) == 1 or len(g) * longest <= 120


def test_token_budget_pg_and_uneven_sft_microbatches_keep_the_exact_gradient(model64):
    batch = rollout(8)
    ref = reference_pg_grad(model64, batch, "reinforce_with_baseline")
    got, _ = sgd_delta(
        model64,
        lambda m, o: pg_update(
            m, o, batch, settings("reinforce_with_baseline", microbatch_tokens=20, max_grad_norm=None), seed=0
        ),
    )
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-10)

    full = copy.deepcopy(model64)
    lp = naive_response_log_probs(full, batch["input_ids"], batch["labels"])["log_probs"]
    (-torch.where(batch["response_mask"], lp, 0.0).sum() / batch["response_mask"].sum()).backward()
    keys = ("input_ids", "labels", "response_mask")
    micro = [{k: batch[k][rows] for k in keys} for rows in (slice(0, 1), slice(1, 6), slice(6, 8))]
    got, _ = sgd_delta(model64, lambda m, o: sft_update(m, o, micro, max_grad_norm=None, autocast_dtype=None))
    for g, p in zip(got, full.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean", "sum_norm"])
def test_train_pg_update_gradient_does_not_depend_on_microbatching(model64, aggregation):
    """Issue 14 item 2: through the settings train_pg parses (UpdateSettings), one optimizer step's
    gradient is the float64 one-shot reference whatever the microbatch size; token_mean is a true
    mean over the minibatch's response tokens (it was sum / max_new_tokens, scaling with microbatch)."""
    batch = rollout(9)
    m = copy.deepcopy(model64)
    lp = naive_response_log_probs(m, batch["input_ids"], batch["labels"])["log_probs"]
    per_tok = -batch["advantages"].double()[:, None] * lp
    mask = batch["response_mask"]
    masked = torch.where(mask, per_tok, 0.0)
    lengths = mask.sum(-1).clamp(min=1)
    ref_loss = {
        "seq_mean": (masked.sum(-1) / lengths).mean(),
        "token_mean": masked.sum() / mask.sum(),
        "sum_norm": (masked.sum(-1) / 11.0).mean(),
    }[aggregation]
    ref_loss.backward()
    ref = [p.grad.clone() for p in m.parameters()]
    # row counts, then token budgets (padded and packed: the cut the pipeline makes by default)
    cuts = [(micro, None, False) for micro in (B, 4, 2, 1)]
    cuts += [(B, 30, False), (B, 30, True), (B, 9, True), (3, 1000, True)]
    for micro, tokens, packing in cuts:
        # a train.pg block (one minibatch of the whole batch), read as train_pg reads its own
        s = update_settings(
            "reinforce_with_baseline",
            minibatch_size=B,
            microbatch_size=micro,
            microbatch_tokens=tokens,
            packing=packing,
            max_grad_norm=None,
            loss_aggregation=aggregation,
            max_new_tokens=11,
        )
        got, metrics = sgd_delta(model64, lambda mm, o, s=s: pg_update(mm, o, batch, s, seed=0))
        assert metrics["optimizer_steps"] == 1
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(
                g, r, rtol=1e-7, atol=1e-10, msg=f"microbatch {micro}, budget {tokens}, packing {packing}"
            )


def test_packed_old_log_probs_equal_padded(model64):
    """The behaviour log-probs train_pg takes (token budget + packing) equal the padded ones."""
    batch = rollout(4)
    ref = compute_old_log_probs(model64, batch, B, autocast_dtype=None)
    for tokens, packing in ((9, True), (30, False), (1000, True)):
        got = compute_old_log_probs(
            model64, batch, B, autocast_dtype=None, microbatch_tokens=tokens, packing=packing
        )
        mask = batch["response_mask"]  # what the losses read; elsewhere the packed path leaves 0
        torch.testing.assert_close(got[mask], ref[mask], rtol=1e-10, atol=1e-12)


def test_tis_weights_multiply_every_variants_per_token_loss(model64):
    """With off_policy_correction tis, the gradient is that of min(pi_old / pi_sampler, cap) x the
    per-token loss (float64 reference), for a variant without a ratio of its own."""
    batch = rollout(10)
    gen = torch.Generator().manual_seed(1)
    old = compute_old_log_probs(model64, batch, microbatch_size=B, autocast_dtype=None)
    sampler = old + torch.randn(old.shape, generator=gen, dtype=old.dtype) * 0.7
    b = dict(batch, old_log_probs=old, sampler_log_probs=sampler)
    m = copy.deepcopy(model64)
    lp = naive_response_log_probs(m, batch["input_ids"], batch["labels"])["log_probs"]
    w = torch.exp(old - sampler).clamp(max=1.5)
    per_tok = -batch["advantages"].double()[:, None] * lp * w
    mask = batch["response_mask"]
    (torch.where(mask, per_tok, 0.0).sum() / mask.sum()).backward()
    got, metrics = sgd_delta(
        model64,
        lambda mm, o: pg_update(
            mm,
            o,
            b,
            settings(
                "reinforce_with_baseline",
                microbatch_size=2,
                max_grad_norm=None,
                loss_aggregation="token_mean",
                off_policy_correction="tis",
                tis_cap=1.5,
            ),
            seed=0,
        ),
    )
    for g, p in zip(got, m.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-7, atol=1e-10)
    assert metrics["tis_weight_mean"] == pytest.approx(float(w[mask].mean()), rel=1e-9)
    assert metrics["sampler_logp_gap_max"] == pytest.approx(
        float((old - sampler)[mask].abs().max()), rel=1e-9
    )
    with pytest.raises(ValueError, match="sampler"):
        pg_update(
            copy.deepcopy(model64),
            torch.optim.SGD(model64.parameters(), lr=0.0),
            batch,
            settings("reinforce_with_baseline", off_policy_correction="tis"),
            seed=0,
        )


def _many_rows(rows: int, seed: int) -> dict[str, torch.Tensor]:
    """``rows`` right-padded rows with responses of 4-10 tokens and +-1 advantages."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (rows, T + 1), generator=gen)
    mask = torch.zeros(rows, T, dtype=torch.bool)
    for i in range(rows):
        r = int(torch.randint(4, 11, (1,), generator=gen))
        mask[i, 2 : 2 + r] = True
        ids[i, 3 + r :] = 0
    adv = torch.where(torch.arange(rows) % 2 == 0, 1.0, -1.0)
    return {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "response_mask": mask,
        "raw_rewards": (adv > 0).float(),
        "advantages": adv,
    }


def _step_gradient(model, update) -> list[torch.Tensor]:
    """The fp32 gradient MasterWeightAdamW would step on, taken through ``update(model, opt)``."""
    opt = MasterWeightAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    seen: list[torch.Tensor] = []

    def record(closure=None):
        seen.extend(m.grad.double().clone() for ms in opt.masters for m in ms)

    opt.step = record
    update(model, opt)
    return seen


def _rel_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float((g - r).pow(2).sum()) for g, r in zip(got, ref, strict=True))
    return (num / sum(float(r.pow(2).sum()) for r in ref)) ** 0.5


@pytest.mark.parametrize("trainer", ["sft", "pg"])
def test_bf16_gradient_error_does_not_grow_with_microbatches(trainer):
    """Issue 27.2: accumulating 64 microbatches in bf16 grew the error vs float64 by ~50%; in fp32 it
    stays at the single forward's bf16 error, whatever the number of microbatches."""
    rows = 64
    batch = _many_rows(rows, seed=11)
    model = tiny_qwen(torch.bfloat16, seed=3)
    ref_model = copy.deepcopy(model).double()
    if trainer == "sft":
        ref_out = naive_response_log_probs(ref_model, batch["input_ids"], batch["labels"])["log_probs"]
        mask = batch["response_mask"]
        (-(torch.where(mask, ref_out, 0.0)).sum() / mask.sum()).backward()
        ref = [p.grad.clone() for p in ref_model.parameters()]

        def update(micro):
            def run(m, o):
                mbs = [
                    {k: batch[k][s : s + micro] for k in ("input_ids", "labels", "response_mask")}
                    for s in range(0, rows, micro)
                ]
                sft_update(m, o, mbs, max_grad_norm=None)

            return run
    else:
        ref = reference_pg_grad(ref_model, batch, "reinforce_with_baseline")

        def update(micro):
            def run(m, o):
                s = settings("reinforce_with_baseline", microbatch_size=micro, max_grad_norm=None)
                pg_update(m, o, batch, s, seed=0)

            return run

    errors = {
        micro: _rel_error(_step_gradient(copy.deepcopy(model), update(micro)), ref) for micro in (rows, 1)
    }
    assert errors[rows] < 2e-2, errors  # the bf16 forward/backward's own error
    assert errors[1] <= 1.1 * errors[rows], errors
