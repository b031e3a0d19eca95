"""mathpt.functional against independent float64 references, plus property tests of invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_qwen
from hypothesis import given, settings
from hypothesis import strategies as st

from mathpt import functional as F

# ----------------------------------------------------------------------------- helpers / references


def rand_logits(gen: torch.Generator, shape, extreme: bool = True) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    if extreme:  # sprinkle +-1e4 logits
        hit = torch.rand(shape, generator=gen) < 0.01
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
        x = torch.where(hit, sign * 1e4, x)
    return x


def ref_entropy(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(-1)


def ref_log_probs(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1))
    return np.take_along_axis(z, labels[..., None], -1)[..., 0] - lse


def random_mask(gen: torch.Generator, b: int, t: int) -> torch.Tensor:
    mask = torch.rand(b, t, generator=gen) < 0.6
    mask[0] = False  # always one empty row
    return mask


# ----------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer():
    from mathpt.models import train_tokenizer

    texts = [
        "Natalia sold clips to 48 of her friends in April.",
        "How many clips did she sell? 72 <answer>",
    ] * 4
    return train_tokenizer(texts, 300)


def test_tokenize_prompt_and_output_matches_manual_construction(tokenizer):
    prompts = ["Natalia sold", "How many clips did she sell?", "A"]
    outputs = [" clips to 48 of her friends", " 72", " <answer>72<|endoftext|>"]
    got = F.tokenize_prompt_and_output(prompts, outputs, tokenizer)
    pad = tokenizer.pad_token_id
    rows = []
    for p, o in zip(prompts, outputs, strict=True):
        pi = tokenizer.encode(p, add_special_tokens=False)
        oi = tokenizer.encode(o, add_special_tokens=False)
        rows.append((pi, oi))
    max_len = max(len(p) + len(o) for p, o in rows)
    for k in ("input_ids", "labels", "response_mask"):
        assert got[k].shape == (3, max_len - 1)
    assert got["response_mask"].dtype == torch.bool
    for i, (pi, oi) in enumerate(rows):
        full = pi + oi + [pad] * (max_len - len(pi) - len(oi))
        assert got["input_ids"][i].tolist() == full[:-1]
        assert got["labels"][i].tolist() == full[1:]
        want = [len(pi) <= j + 1 < len(pi) + len(oi) for j in range(max_len - 1)]
        assert got["response_mask"][i].tolist() == want
        # the masked labels are exactly the output tokens
        assert got["labels"][i][got["response_mask"][i]].tolist() == oi


# ----------------------------------------------------------------------------- entropy / log-probs


def test_compute_entropy_matches_float64_reference():
    gen = torch.Generator().manual_seed(1)
    for shape in [(3, 5, 11), (2, 257), (1, 1, 2)]:
        logits = rand_logits(gen, shape)
        want = ref_entropy(logits.numpy())
        for dtype, tol in [(torch.float64, 1e-9), (torch.float32, 2e-5)]:
            got = F.compute_entropy(logits.to(dtype))
            assert torch.isfinite(got).all()
            np.testing.assert_allclose(got.double().numpy(), want, atol=tol, rtol=tol)


def _naive_head(h, w, b, labels):
    logits = torch.nn.functional.linear(h, w, b)
    logp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(logits, -1)
    ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
    return logp, ent


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_head_forward_and_backward_match_float64(seed, with_bias):
    gen = torch.Generator().manual_seed(seed)
    b, t, d = (int(x) for x in torch.randint(1, 6, (3,), generator=gen))
    v = int(torch.randint(2, 300, (1,), generator=gen))
    h64 = torch.randn(b, t, d * 4, generator=gen, dtype=torch.float64)
    w64 = torch.randn(v, d * 4, generator=gen, dtype=torch.float64)
    w64[0] *= 1e3  # an extreme logit column
    b64 = torch.randn(v, generator=gen, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, v, (b, t), generator=gen)
    g_lp = torch.randn(b, t, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(b, t, generator=gen, dtype=torch.float64)

    leaves64 = [x.clone().requires_grad_(True) for x in (h64, w64) + ((b64,) if with_bias else ())]
    lp_ref, ent_ref = _naive_head(leaves64[0], leaves64[1], leaves64[2] if with_bias else None, labels)
    ((lp_ref * g_lp).sum() + (ent_ref * g_ent).sum()).backward()

    chunk = int(torch.randint(1, b * t + 2, (1,), generator=gen))
    leaves = [x.detach().float().requires_grad_(True) for x in leaves64]
    out = F.chunked_log_probs_from_hidden(
        leaves[0],
        leaves[1],
        labels,
        leaves[2] if with_bias else None,
        chunk_size=chunk,
        return_token_entropy=True,
    )
    ((out["log_probs"] * g_lp.float()).sum() + (out["token_entropy"] * g_ent.float()).sum()).backward()

    # the naive fp32 formula on the same inputs: its error vs float64 is the yardstick (logits ~1e4
    # are ill-conditioned in fp32 whatever the algorithm)
    naive = [x.detach().float().requires_grad_(True) for x in leaves64]
    lp32, ent32 = _naive_head(naive[0], naive[1], naive[2] if with_bias else None, labels)
    ((lp32 * g_lp.float()).sum() + (ent32 * g_ent.float()).sum()).backward()

    def rel(a, ref):
        return ((a.double() - ref).norm() / ref.norm().clamp(min=1e-12)).item()

    def ok(a, a32, ref):
        return rel(a, ref) <= 4 * rel(a32, ref) + 1e-5

    assert ok(out["log_probs"].detach(), lp32.detach(), lp_ref.detach())
    assert ok(out["token_entropy"].detach(), ent32.detach(), ent_ref.detach())
    for got, n32, ref in zip(leaves, naive, leaves64, strict=True):
        assert ok(got.grad, n32.grad, ref.grad)


def test_chunked_head_gradient_without_entropy_and_float64_exact():
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (5,), generator=gen)
    out = F.chunked_log_probs_from_hidden(h, w, labels, chunk_size=3)
    assert out["log_probs"].dtype == torch.float64 and "token_entropy" not in out
    assert torch.autograd.gradcheck(
        lambda h_, w_: F.chunked_log_probs_from_hidden(h_, w_, labels, chunk_size=3)["log_probs"], (h, w)
    )
    assert torch.autograd.gradcheck(
        lambda h_, w_: F.chunked_log_probs_from_hidden(
            h_, w_, labels, chunk_size=2, return_token_entropy=True
        )["token_entropy"],
        (h, w),
    )


def test_get_response_log_probs_matches_naive_on_tiny_qwen():
    model = tiny_qwen()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 13), generator=gen)
    labels = torch.randint(0, 97, (3, 13), generator=gen)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double().numpy()
        got = F.get_response_log_probs(model, ids, labels, return_token_entropy=True, chunk_size=5)
    np.testing.assert_allclose(got["log_probs"].numpy(), ref_log_probs(logits, labels.numpy()), atol=1e-10)
    np.testing.assert_allclose(got["token_entropy"].numpy(), ref_entropy(logits), atol=1e-10)

    # gradients equal those of the naive formula
    model.zero_grad()
    F.get_response_log_probs(model, ids, labels, chunk_size=4)["log_probs"].sum().backward()
    g_chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.naive_response_log_probs(model, ids, labels)["log_probs"].sum().backward()
    for a, b in zip(g_chunked, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_get_response_log_probs_attention_mask_left_padding():
    model = tiny_qwen()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 97, (1, 9), generator=gen)
    labels = torch.randint(0, 97, (1, 9), generator=gen)
    with torch.no_grad():
        alone = F.get_response_log_probs(model, ids, labels)["log_probs"]
        padded_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
        padded_labels = torch.cat([torch.zeros(1, 3, dtype=torch.long), labels], 1)
        am = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        got = F.get_response_log_probs(model, padded_ids, padded_labels, attention_mask=am, position_ids=pos)
    torch.testing.assert_close(got["log_probs"][:, 3:], alone, rtol=1e-9, atol=1e-9)


def test_get_response_log_probs_falls_back_for_plain_models():
    class Plain(torch.nn.Module):  # no .model / .lm_head
        def __init__(self):
            super().__init__()
            self.inner = tiny_qwen()

        def forward(self, input_ids, **kw):
            return self.inner(input_ids=input_ids, **kw)

    plain = Plain()
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 97, (2, 6), generator=gen)
    labels = torch.randint(0, 97, (2, 6), generator=gen)
    with torch.no_grad():
        a = F.get_response_log_probs(plain, ids, labels, return_token_entropy=True)
        b = F.get_response_log_probs(plain.inner, ids, labels, return_token_entropy=True)
    torch.testing.assert_close(a["log_probs"], b["log_probs"])
    torch.testing.assert_close(a["token_entropy"], b["token_entropy"])


def test_get_response_log_probs_bf16_autocast_close_to_naive():
    model = tiny_qwen(dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 97, (2, 10), generator=gen)
    labels = torch.randint(0, 97, (2, 10), generator=gen)
    with torch.no_grad():
        ref = F.naive_response_log_probs(model.double(), ids, labels)["log_probs"]
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = F.get_response_log_probs(model, ids, labels, chunk_size=3)["log_probs"]
    assert got.dtype == torch.float32
    assert ((got.double() - ref).norm() / ref.norm()).item() < 2e-2


# ----------------------------------------------------------------------------- masked reductions


def ref_masked(t: np.ndarray, m: np.ndarray, dim, mean: bool, const: float = 1.0):
    t = np.where(m, t, 0.0)
    s = t.sum() if dim is None else t.sum(dim)
    if not mean:
        return s / const
    c = m.sum() if dim is None else m.sum(dim)
    return np.where(c > 0, s / np.maximum(c, 1), 0.0)


@pytest.mark.parametrize("seed", range(4))
def test_masked_mean_and_normalize_match_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    b, t = (int(x) for x in torch.randint(1, 7, (2,), generator=gen))
    x = torch.randn(b, t, generator=gen, dtype=torch.float64) * 100
    m = random_mask(gen, b, t)
    for dim in (None, 0, 1, -1):
        np.testing.assert_allclose(
            F.masked_mean(x, m, dim).numpy(),
            ref_masked(x.numpy(), m.numpy(), dim, True),
            rtol=1e-12,
            atol=1e-12,
        )
        np.testing.assert_allclose(
            F.masked_normalize(x, m, 3.5, dim).numpy(),
            ref_masked(x.numpy(), m.numpy(), dim, False, 3.5),
            rtol=1e-12,
            atol=1e-12,
        )


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 5),
    t=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    junk=st.sampled_from([math.inf, -math.inf, math.nan, 1e30, -7.0]),
    dim=st.sampled_from([None, 0, 1]),
)
def test_masked_functions_ignore_masked_positions(b, t, seed, junk, dim):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, generator=gen)
    m = torch.rand(b, t, generator=gen) < 0.5
    y = torch.where(m, x, torch.tensor(junk))
    assert torch.equal(F.masked_mean(x, m, dim), F.masked_mean(y, m, dim))
    assert torch.equal(F.masked_normalize(x, m, 2.0, dim), F.masked_normalize(y, m, 2.0, dim))
    assert torch.isfinite(F.masked_mean(y, m, dim)).all()


# ----------------------------------------------------------------------------- SFT step


def test_sft_microbatch_train_step_loss_and_grad():
    gen = torch.Generator().manual_seed(11)
    lp = (-torch.rand(4, 9, generator=gen, dtype=torch.float64) * 5).requires_grad_(True)
    m = random_mask(gen, 4, 9)
    loss, meta = F.sft_microbatch_train_step(lp, m, gradient_accumulation_steps=3, normalize_constant=2.5)
    lp_np, m_np = lp.detach().numpy(), m.numpy()
    want = -(np.where(m_np, lp_np, 0).sum(1) / 2.5).mean() / 3
    assert loss.item() == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(lp.grad.numpy(), np.where(m_np, -1.0 / (2.5 * 4 * 3), 0.0), rtol=1e-12)
    assert meta["response_tokens"].item() == m_np.sum()


# ----------------------------------------------------------------------------- group rewards


def ref_group_adv(rewards: list[float], g: int, eps: float, by_std: bool) -> np.ndarray:
    out = []
    for s in range(0, len(rewards), g):
        grp = np.array(rewards[s : s + g], dtype=np.float64)
        c = grp - grp.mean()
        if by_std:
            sd = grp.std(ddof=1) if g > 1 else 0.0
            c = c / (sd + eps)
        out.extend(c)
    return np.array(out)


def fake_reward_fn(response: str, gt: str) -> dict:
    r = float(response.count("x")) / 3.0 + (1.0 if response.endswith(gt) else 0.0)
    return {
        "reward": r,
        "format_reward": float("x" in response),
        "answer_reward": float(response.endswith(gt)),
    }


@pytest.mark.parametrize("by_std", [True, False])
def test_group_normalized_rewards_match_reference(by_std):
    rng = np.random.default_rng(0)
    g = 4
    responses = ["x" * int(rng.integers(0, 4)) + str(int(rng.integers(0, 3))) for _ in range(12)]
    gts = [str(i % 3) for i in range(3) for _ in range(g)]
    adv, raw, meta = F.compute_group_normalized_rewards(fake_reward_fn, responses, gts, g, 1e-6, by_std)
    raw_ref = [fake_reward_fn(r, t)["reward"] for r, t in zip(responses, gts, strict=True)]
    np.testing.assert_allclose(raw.numpy(), raw_ref, rtol=1e-6)
    np.testing.assert_allclose(adv.numpy(), ref_group_adv(raw_ref, g, 1e-6, by_std), rtol=1e-5, atol=1e-6)
    assert meta["reward_mean"] == pytest.approx(np.mean(raw_ref), rel=1e-6)
    assert meta["answer_reward_mean"] == pytest.approx(
        np.mean([fake_reward_fn(r, t)["answer_reward"] for r, t in zip(responses, gts, strict=True)])
    )


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 4),
    g=st.integers(1, 6),
    data=st.data(),
    by_std=st.booleans(),
)
def test_group_advantages_invariants(groups, g, data, by_std):
    rewards = data.draw(
        st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=groups * g, max_size=groups * g)
    )
    const_group = data.draw(st.integers(0, groups - 1))
    rewards[const_group * g : (const_group + 1) * g] = [rewards[const_group * g]] * g  # one group all equal
    responses = [str(r) for r in rewards]
    adv, _, _ = F.compute_group_normalized_rewards(
        lambda r, _gt: {"reward": float(r)}, responses, ["?"] * len(rewards), g, 1e-6, by_std
    )
    assert torch.isfinite(adv).all()
    per_group = adv.view(groups, g).double().sum(1)
    assert per_group.abs().max().item() < 1e-4
    assert torch.equal(adv.view(groups, g)[const_group], torch.zeros(g))


def test_group_rewards_rejects_bad_sizes():
    with pytest.raises(ValueError, match="groups of 3"):
        F.compute_group_normalized_rewards(fake_reward_fn, ["a"] * 4, ["a"] * 4, 3, 1e-6, True)
    with pytest.raises(ValueError, match="ground truths"):
        F.compute_group_normalized_rewards(fake_reward_fn, ["a"] * 4, ["a"] * 3, 2, 1e-6, True)


# ----------------------------------------------------------------------------- policy-gradient losses


def _pg_inputs(seed: int, b: int = 5, t: int = 7):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 4
    old = lp + torch.randn(b, t, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.randn(b, 1, generator=gen, dtype=torch.float64)
    raw = torch.rand(b, 1, generator=gen, dtype=torch.float64)
    mask = random_mask(gen, b, t)
    return lp, old, adv, raw, mask


def ref_grpo(adv, lp, old, c):
    r = np.exp(lp - old)
    a, b_ = r * adv, np.clip(r, 1 - c, 1 + c) * adv
    return -np.minimum(a, b_), b_ < a


def test_pg_losses_match_reference():
    lp, old, adv, raw, _ = _pg_inputs(0)
    np.testing.assert_allclose(
        F.compute_naive_policy_gradient_loss(raw, lp).numpy(), -raw.numpy() * lp.numpy(), rtol=1e-12
    )
    loss, meta = F.compute_grpo_clip_loss(adv, lp, old, 0.2)
    want, clipped = ref_grpo(adv.numpy(), lp.numpy(), old.numpy(), 0.2)
    np.testing.assert_allclose(loss.numpy(), want, rtol=1e-12)
    assert np.array_equal(meta["clipped"].numpy(), clipped) and clipped.any() and not clipped.all()
    for lt, ref in [
        ("no_baseline", -raw.numpy() * lp.numpy()),
        ("reinforce_with_baseline", -adv.numpy() * lp.numpy()),
        ("grpo_clip", want),
    ]:
        got, _ = F.compute_policy_gradient_loss(lp, lt, raw, adv, old, 0.2)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown loss_type"):
        F.compute_policy_gradient_loss(lp, "ppo", raw, adv, old, 0.2)
    with pytest.raises(ValueError, match="old_log_probs"):
        F.compute_policy_gradient_loss(lp, "grpo_clip", raw, adv, None, 0.2)


def ref_aggregate(per_tok: np.ndarray, m: np.ndarray, how: str, const):
    masked = np.where(m, per_tok, 0.0)
    if how == "seq_mean":
        return (masked.sum(1) / np.maximum(m.sum(1), 1)).mean()
    if how == "token_mean":
        return masked.sum() / (const if const is not None else max(m.sum(), 1))
    return (masked.sum(1) / (const if const is not None else per_tok.shape[1])).mean()


@pytest.mark.parametrize("how", ["seq_mean", "token_mean", "sum_norm"])
@pytest.mark.parametrize("loss_type", ["no_baseline", "reinforce_with_baseline", "grpo_clip"])
def test_grpo_microbatch_train_step_loss_grad_and_metadata(how, loss_type):
    lp0, old, adv, raw, m = _pg_inputs(hash((how, loss_type)) % 1000)
    const = None if how == "seq_mean" else 9.0
    lp = lp0.clone().requires_grad_(True)
    loss, meta = F.grpo_microbatch_train_step(lp, m, 2, loss_type, raw, adv, old, 0.2, how, const)
    per_tok = {
        "no_baseline": -raw.numpy() * lp0.numpy(),
        "reinforce_with_baseline": -adv.numpy() * lp0.numpy(),
        "grpo_clip": ref_grpo(adv.numpy(), lp0.numpy(), old.numpy(), 0.2)[0],
    }[loss_type]
    assert loss.item() == pytest.approx(ref_aggregate(per_tok, m.numpy(), how, const) / 2, rel=1e-10)
    # gradient by central differences of the float64 reference aggregate
    eps = 1e-6
    num = np.zeros(lp0.shape)
    for i in range(lp0.shape[0]):
        for j in range(lp0.shape[1]):
            for s in (1, -1):
                x = lp0.numpy().copy()
                x[i, j] += s * eps
                pt = {
                    "no_baseline": -raw.numpy() * x,
                    "reinforce_with_baseline": -adv.numpy() * x,
                    "grpo_clip": ref_grpo(adv.numpy(), x, old.numpy(), 0.2)[0],
                }[loss_type]
                num[i, j] += s * ref_aggregate(pt, m.numpy(), how, const) / 2 / (2 * eps)
    np.testing.assert_allclose(lp.grad.numpy(), num, atol=1e-7)
    assert np.all(lp.grad.numpy()[~m.numpy()] == 0)
    if loss_type == "grpo_clip":
        _, clipped = ref_grpo(adv.numpy(), lp0.numpy(), old.numpy(), 0.2)
        mm = m.numpy()
        assert meta["clip_fraction"].item() == pytest.approx(clipped[mm].mean())
        r = np.exp(lp0.numpy() - old.numpy())[mm]
        np.testing.assert_allclose(meta["ratio"].numpy()[mm], r, rtol=1e-12)
        assert not ({"ratio_mean", "approx_kl"} & set(meta))  # the drift metrics: policy_drift_sums only


def test_aggregate_loss_rejects_unknown():
    with pytest.raises(ValueError, match="loss_aggregation"):
        F.aggregate_loss(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), "mean")


def test_compiled_head_falls_back_to_eager_when_compiling_fails(monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setenv("MATHPT_COMPILE_HEAD", "1")
    monkeypatch.setattr(torch, "compile", broken_compile)
    import mathpt.logprob_kernel as kernel

    monkeypatch.setattr(kernel, "_KERNELS", {})
    gen = torch.Generator().manual_seed(9)
    h = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 20, (6,), generator=gen)
    with pytest.warns(UserWarning, match="running them eagerly"):
        got = F.chunked_log_probs_from_hidden(h, w, labels, chunk_size=2)["log_probs"]
    want = ref_log_probs((h @ w.T).numpy(), labels.numpy())
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_policy_drift_sums_match_numpy_reference(seed):
    lp, old, adv, _, m = _pg_inputs(100 + seed)
    lp[~m] = float("nan")  # masked positions never leak into the sums
    got = F.policy_drift_sums(lp, old, m, adv, 0.2)
    mk = m.numpy()
    d = (lp.numpy() - old.numpy())[mk]
    r = np.exp(d)
    _, clipped = ref_grpo(np.broadcast_to(adv.numpy(), lp.shape)[mk], lp.numpy()[mk], old.numpy()[mk], 0.2)
    want = {
        "tokens": mk.sum(),
        "abs_gap": np.abs(d).sum(),
        "abs_gap_max": np.abs(d).max(),
        "k3": ((r - 1) - d).sum(),
        "clipped": clipped.sum(),
        "ratio": r.sum(),
        "ratio_min": r.min(),
        "ratio_max": r.max(),
    }
    for k, v in want.items():
        assert float(got[k]) == pytest.approx(float(v), rel=1e-12, abs=1e-12), k
    assert float(got["k3"]) >= 0


def test_grpo_microbatch_train_step_token_weights_scale_the_per_token_loss():
    lp0, old, adv, raw, m = _pg_inputs(7)
    w = torch.rand(lp0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    lp = lp0.clone().requires_grad_()
    F.grpo_microbatch_train_step(
        lp,
        m,
        1,
        "reinforce_with_baseline",
        raw,
        adv,
        old,
        0.2,
        "token_mean",
        token_weights=w.requires_grad_(),
    )
    want = np.where(m.numpy(), -adv.numpy() * w.detach().numpy(), 0.0) / m.sum().item()
    np.testing.assert_allclose(lp.grad.numpy(), want, rtol=1e-12, atol=1e-15)
    assert w.grad is None  # the weights are constants
