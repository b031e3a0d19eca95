"""fp32 master weights: small updates survive bf16, match an fp32 AdamW, and resume exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mathpt.optim import MasterWeightAdamW, make_optimizer

N = 100_000
REPO = Path(__file__).resolve().parents[2]


def _grads(steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=gen).bfloat16() for _ in range(steps)]


def test_master_weights_move_at_small_lr_and_match_fp32_reference():
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(N, generator=gen) * 0.02).bfloat16()
    grads = _grads(5, 1)
    hyper = {"lr": 1e-6, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}

    p = torch.nn.Parameter(w0.clone())
    opt = MasterWeightAdamW([p], **hyper)
    ref = torch.nn.Parameter(w0.double().clone())  # float64 AdamW from the same bf16 start
    ref_opt = torch.optim.AdamW([ref], **hyper, foreach=False)
    pure = torch.nn.Parameter(w0.clone())  # the trap: AdamW directly on bf16 weights
    pure_opt = torch.optim.AdamW([pure], **hyper, foreach=False)
    for g in grads:
        p.grad, ref.grad, pure.grad = g.clone(), g.double(), g.clone()
        opt.step()
        ref_opt.step()
        pure_opt.step()

    master = opt.masters[0][0]
    start = w0.double()
    moved = (master.double() != start).double().mean().item()
    pure_moved = (pure.double() != start).double().mean().item()
    assert moved > 0.999, moved
    assert pure_moved < 0.2, pure_moved
    # the master trajectory is the fp32 rounding of the exact update
    torch.testing.assert_close(master.double(), ref.detach(), rtol=1e-6, atol=1e-9)
    delta_ref = ref.detach() - start
    rel = ((master.double() - start - delta_ref).norm() / delta_ref.norm()).item()
    assert rel < 1e-2, rel
    # and the bf16 parameter is the master rounded to bf16
    assert torch.equal(p.detach(), master.bfloat16())


def test_state_dict_resumes_bit_for_bit():
    gen = torch.Generator().manual_seed(2)
    w0 = (torch.randn(N, generator=gen) * 0.02).bfloat16()
    grads = _grads(6, 3)

    p = torch.nn.Parameter(w0.clone())
    opt = MasterWeightAdamW([p], lr=1e-5, betas=(0.9, 0.999), weight_decay=0.01)
    for g in grads:
        p.grad = g.clone()
        opt.step()

    q = torch.nn.Parameter(w0.clone())
    opt_q = MasterWeightAdamW([q], lr=1e-5, betas=(0.9, 0.999), weight_decay=0.01)
    for g in grads[:3]:
        q.grad = g.clone()
        opt_q.step()
    saved = opt_q.state_dict()
    r = torch.nn.Parameter(torch.zeros_like(w0))  # fresh process: weights come from the checkpoint
    opt_r = MasterWeightAdamW([r], lr=1e-5, betas=(0.9, 0.999), weight_decay=0.01)
    opt_r.load_state_dict(saved)
    assert torch.equal(r.detach(), q.detach())
    for g in grads[3:]:
        r.grad = g.clone()
        opt_r.step()
    assert torch.equal(opt_r.masters[0][0], opt.masters[0][0])
    assert torch.equal(r.detach(), p.detach())


def test_lr_scheduler_reaches_inner_adamw():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([p], lr=1.0, weight_decay=0.0, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # lr 0: nothing may move
    p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == 0.0
    assert torch.equal(p.detach(), torch.ones(4, dtype=torch.bfloat16))


def test_make_optimizer_picks_by_dtype_and_skips_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = make_optimizer(model, {"lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]})
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    decays = {p.ndim: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {2: 0.1, 1: 0.0}
    opt_bf16 = make_optimizer(
        model.to(torch.bfloat16), {"lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]}
    )
    assert isinstance(opt_bf16, MasterWeightAdamW)
    assert all(m.dtype == torch.float32 for ms in opt_bf16.masters for m in ms)


def test_clip_grad_norm_matches_torch():
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(300, generator=gen) * 5, torch.randn(7, 3, generator=gen)]
    ps = [torch.nn.Parameter(torch.zeros_like(g).bfloat16()) for g in grads]
    qs = [torch.nn.Parameter(torch.zeros_like(g).bfloat16()) for g in grads]
    for p, q, g in zip(ps, qs, grads, strict=True):
        p.grad, q.grad = g.bfloat16(), g.bfloat16()
    opt = MasterWeightAdamW(ps, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    norm = opt.clip_grad_norm_(1.0)
    want = torch.nn.utils.clip_grad_norm_(qs, 1.0)
    exact = torch.cat([g.bfloat16().double().flatten() for g in grads]).norm().item()
    assert float(norm) == pytest.approx(exact, rel=1e-6)  # fp32 accumulation
    assert float(want) == pytest.approx(exact, rel=4e-3)  # torch returns a bf16 norm
    # grads moved to the fp32 masters and rescaled in place there, like torch does (CPU path)
    for p, m, q in zip(ps, opt.masters[0], qs, strict=True):
        assert p.grad is None and m.grad.dtype == torch.float32
        torch.testing.assert_close(m.grad, q.grad.float(), rtol=8e-3, atol=1e-6)


def test_triton_master_kernel_matches_torch_adamw(monkeypatch):
    """The one-pass kernel (CUDA path) run in Triton's CPU interpreter against torch's AdamW."""
    pytest.importorskip("triton")
    import mathpt.optim as optim

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(optim, "_TRITON_KERNEL", None)
    gen = torch.Generator().manual_seed(5)
    w0 = [(torch.randn(n, generator=gen) * 0.02).bfloat16() for n in (5000, 130)]
    grads = [[torch.randn(w.shape, generator=gen).bfloat16() for w in w0] for _ in range(3)]

    def run(flag, clip):
        monkeypatch.setenv("MATHPT_MASTER_KERNEL", flag)
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = MasterWeightAdamW(ps, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999))
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            opt.clip_grad_norm_(clip)
            opt.step()
        return opt, ps

    try:
        kern, kp = run("force", math.inf)
        assert kern.use_kernel
        ref, rp = run("0", math.inf)
        assert not ref.use_kernel
        clipped, _ = run("force", 30.0)
    finally:
        monkeypatch.setattr(optim, "_TRITON_KERNEL", None)
    # clipped run against a float64 AdamW on grads scaled by min(1, 30 / ||g||)
    w = [x.double() for x in w0]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for t, gs in enumerate(grads, start=1):
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs))
        coef = min(1.0, 30.0 / (norm + 1e-6))
        for i, g in enumerate(gs):
            g = g.double() * coef
            w[i] *= 1 - 1e-3 * 0.1
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            w[i] -= 1e-3 / (1 - 0.9**t) * m[i] / (v[i].sqrt() / math.sqrt(1 - 0.999**t) + 1e-8)
    for a, b in zip(clipped.masters[0], w, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)
    for a, b in zip(kern.masters[0], ref.masters[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        sa, sb = kern.inner.state[a], ref.inner.state[b]
        assert float(sa["step"]) == float(sb["step"]) == 3
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-3, atol=1e-7)
    # the bf16 param is the master rounded (the interpreter truncates, so allow one bf16 ulp)
    for p, m in zip(kp, kern.masters[0], strict=True):
        torch.testing.assert_close(p.float(), m, rtol=2**-7, atol=0)


def test_make_optimizer_takes_its_settings_from_the_schema_only():
    """Issue 26.2: no code default; the schema's betas (0.9, 0.95) reach the optimizer of both trainers."""
    from mathpt.config import load_config, pg_config

    cfg = load_config(REPO / "config" / "config.yaml")
    model = torch.nn.Linear(4, 3)
    for settings in (cfg["train"]["sft"], pg_config(cfg, "grpo_clip")):
        opt = make_optimizer(model, settings)
        assert opt.param_groups[0]["betas"] == tuple(settings["betas"])
    with pytest.raises(KeyError, match="betas"):
        make_optimizer(model, {"lr": 1e-4, "weight_decay": 0.0})


def test_grads_accumulate_into_fp32_masters_across_backwards():
    """A bf16 grad is folded into the fp32 master after every backward, so the sum is not rounded."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([p], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    for _ in range(1024):  # a bf16 sum of 2**-10s stalls at 0.25 (half an ulp, rounded to even)
        (p * 2.0**-10).sum().backward()
    assert p.grad is None
    assert opt.masters[0][0].grad.dtype == torch.float32
    torch.testing.assert_close(opt.masters[0][0].grad, torch.full((4,), 1.0), rtol=0, atol=0)
    opt.zero_grad()
    assert opt.masters[0][0].grad is None
