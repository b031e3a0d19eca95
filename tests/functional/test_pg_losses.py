"""The issue-29 algorithms' advantages and per-token losses against float64 references written
independently (plain loops over rows and tokens), on random inputs, and the registry dispatch."""

from __future__ import annotations

import math

import pytest
import torch

from mathpt import algorithms
from mathpt.functional import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    aggregate_loss,
    compute_policy_gradient_loss,
    group_advantages,
    overlong_penalty,
)

B, T, G = 8, 9, 4


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.4  # ratios well off 1
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[:, 0] = True
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    return logp, old, mask, adv


def _loss_and_grad(algo: str, logp, old, mask, adv, **kw):
    p = logp.clone().requires_grad_()
    per_token, meta = compute_policy_gradient_loss(
        p,
        algo,
        raw_rewards=adv[:, None],
        advantages=adv[:, None],
        old_log_probs=old,
        response_mask=mask,
        **kw,
    )
    entry = algorithms.get(algo)
    agg = entry.loss_aggregation or "seq_mean"
    loss = aggregate_loss(per_token, mask, agg, normalize_constant=float(T) if agg == "sum_norm" else None)
    loss.backward()
    return loss.detach(), p.grad, meta


def test_every_pg_algorithm_names_a_loss_and_an_estimator():
    for name in algorithms.PG_ALGOS:
        a = algorithms.get(name)
        assert a.loss in POLICY_LOSSES and a.advantage in ADVANTAGE_ESTIMATORS, name
    assert algorithms.trainer("sft").name == "sft" and algorithms.trainer("dapo").name == "pg"
    with pytest.raises(ValueError, match="unknown algorithm"):
        algorithms.get("ppo")


def test_advantage_estimators_match_float64_reference():
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(3 * G, generator=gen, dtype=torch.float64)
    for est in ADVANTAGE_ESTIMATORS:
        got = group_advantages(r, G, est, advantage_eps=1e-6, normalize_by_std=True)
        want = torch.empty_like(r)
        for i in range(len(r)):
            g0 = (i // G) * G
            group = [float(x) for x in r[g0 : g0 + G]]
            mean = sum(group) / G
            if est == "rloo":
                want[i] = r[i] - (sum(group) - float(r[i])) / (G - 1)
            elif est == "group_mean":
                want[i] = r[i] - mean
            else:
                std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1))
                want[i] = (r[i] - mean) / (std + 1e-6)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # rloo is G/(G-1) x the group-mean baseline
    torch.testing.assert_close(
        group_advantages(r, G, "rloo"), group_advantages(r, G, "group_mean") * G / (G - 1)
    )


def test_gspo_ratio_is_per_sequence_and_matches_reference():
    logp, old, mask, adv = _inputs(2)
    lo, hi = 0.05, 0.08  # wide enough that some sequences are inside the clip range
    loss, grad, meta = _loss_and_grad("gspo", logp, old, mask, adv, cliprange=lo, cliprange_high=hi)
    p = logp.clone().requires_grad_()
    total = 0.0
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t]]
        s = torch.exp(sum(p[i, t] - old[i, t] for t in toks) / len(toks))
        a = float(adv[i])
        total = total - torch.minimum(s * a, torch.clamp(s, 1 - lo, 1 + hi) * a)
    want = total / B
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, p.grad, rtol=1e-10, atol=1e-12)
    r = meta["ratio"]
    assert torch.equal(r, r[:, :1].expand_as(r))  # one ratio per sequence
    assert meta["clipped"].any() and not meta["clipped"].all()


def test_dapo_decoupled_clip_token_mean_matches_reference():
    logp, old, mask, adv = _inputs(3)
    loss, grad, _ = _loss_and_grad("dapo", logp, old, mask, adv, cliprange=0.2, cliprange_high=0.28)
    p = logp.clone().requires_grad_()
    terms = []
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                r = torch.exp(p[i, t] - old[i, t])
                rv = float(r.detach())
                c = min(max(rv, 0.8), 1.28)  # constant where clipped: no gradient there
                rc = r if 0.8 <= rv <= 1.28 else torch.tensor(c, dtype=torch.float64)
                terms.append(-torch.minimum(r * float(adv[i]), rc * float(adv[i])))
    want = sum(terms) / len(terms)  # one mean over all tokens of the batch
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, p.grad, rtol=1e-10, atol=1e-12)


def test_dr_grpo_sums_tokens_over_a_constant():
    logp, old, mask, adv = _inputs(4)
    loss, grad, _ = _loss_and_grad("dr_grpo", logp, old, mask, adv, cliprange=0.2)
    p = logp.clone().requires_grad_()
    total = 0.0
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                r = torch.exp(p[i, t] - old[i, t])
                a = float(adv[i])
                total = total - torch.minimum(r * a, torch.clamp(r, 0.8, 1.2) * a)
    want = total / (B * T)  # constant normalizer, not the response lengths
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, p.grad, rtol=1e-10, atol=1e-12)


def test_cispo_keeps_gradient_on_clipped_tokens():
    logp, old, mask, adv = _inputs(5)
    lo, hi = 1.0, 0.1  # no lower bound, a low cap so many weights are clipped
    loss, grad, meta = _loss_and_grad("cispo", logp, old, mask, adv, cliprange=lo, cliprange_high=hi)
    want_grad = torch.zeros_like(logp)
    want_loss = 0.0
    n = int(mask.sum())
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                w = min(math.exp(float(logp[i, t] - old[i, t])), 1 + hi)  # detached weight
                want_loss -= w * float(adv[i]) * float(logp[i, t]) / n
                want_grad[i, t] = -w * float(adv[i]) / n
    assert meta["clipped"][mask].any()
    torch.testing.assert_close(float(loss), want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert (grad[mask & meta["clipped"]] != 0).all()  # clipped tokens keep their gradient


def test_rloo_is_reinforce_with_leave_one_out_advantages():
    logp, old, mask, adv = _inputs(6)
    loss, grad, _ = _loss_and_grad("rloo", logp, old, mask, adv)
    want = (
        sum(
            -float(adv[i]) * sum(float(logp[i, t]) for t in range(T) if mask[i, t]) / int(mask[i].sum())
            for i in range(B)
        )
        / B
    )
    torch.testing.assert_close(float(loss), want, rtol=1e-12, atol=1e-12)


def test_overlong_penalty_matches_dapo_formula():
    L, buf = 20, 5
    lengths = torch.arange(0, 26)
    got = overlong_penalty(lengths, L, buf)
    want = [0.0 if n <= L - buf else ((L - buf) - n) / buf if n <= L else -1.0 for n in range(26)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)


def test_update_settings_reject_an_aggregation_that_is_not_the_algorithms():
    """pg_update's settings are checked once, when parsed: dapo is defined by token_mean."""
    from mathpt.train.settings import update_settings

    assert update_settings("dapo", microbatch_tokens=None).loss_aggregation == "token_mean"
    with pytest.raises(ValueError, match="token_mean"):
        update_settings("dapo", microbatch_tokens=None, loss_aggregation="seq_mean")


def test_update_settings_name_a_missing_key_and_refuse_an_unresolved_budget():
    """No defaults in code: a key the schema defines and the block lacks is an error naming it."""
    from mathpt.config import ConfigError
    from mathpt.train.settings import UpdateSettings, update_settings

    block = {"loss_type": "grpo_clip", "cliprange": 0.2, "epochs_per_batch": 1}
    with pytest.raises(ConfigError, match=r"'train\.pg\.microbatch_tokens' is missing"):
        UpdateSettings.from_config(block)
    with pytest.raises(ValueError, match="auto"):
        update_settings("grpo_clip")  # the schema's `auto` budget: the memory planner resolves it first
