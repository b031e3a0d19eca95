"""Each issue-29 algorithm through train_pg (tiny HF model, the inline client of test_pg_offpolicy):
the gradient of a real update equals the float64 gradient of the algorithm's formula, written here
independently, and differs from the nearest other formula (so the test can fail); DAPO's dynamic
sampling drops all-equal groups, refills with its own prompts and seeds, reruns the same, and takes
old log-probs under the weights that drew each row when staleness 1 mixes two versions."""

from __future__ import annotations

import math

import pytest
import test_pg_offpolicy as offp
import torch

from mathpt.functional import naive_response_log_probs

MAX_NEW = 6


def _cfg(algo: str, staleness: int = 1, **pg) -> dict:
    from mathpt.config import load_config, rule_slice

    cfg = rule_slice(load_config(offp.REPO / "config" / "config.yaml"), "train", algo=algo, seed=0)
    cfg["dtype"] = "float32"
    cfg["runtime"] = {**cfg["runtime"], "layout": "cpu", "engine": "hf"}
    cfg["pg"].update(
        n_steps=2,
        rollout_batch_size=8,
        group_size=4,
        minibatch_size=8,
        microbatch_size=4,
        lr=offp.LR,
        max_new_tokens=MAX_NEW,
        temperature=1.0,
        staleness=staleness,
        eval_every=10_000,
        checkpoint_every=10_000,
        val_max_new_tokens=2,
        max_grad_norm=None,
        warmup_steps=0,
    )
    cfg["pg"].update(pg)
    return cfg


def _run_with_grads(tmp_path, tiny_model_dir, monkeypatch, cfg):
    """offp._run, also recording the gradient of every optimizer step (by parameter name)."""
    import mathpt.train.run as run_mod

    grads: list[dict[str, torch.Tensor]] = []
    real = run_mod.make_optimizer

    def make(model, conf):
        opt = real(model, conf)
        names = {id(p): n for n, p in model.named_parameters()}

        def record(o, args, kwargs):
            grads.append(
                {
                    names[id(p)]: p.grad.detach().clone()
                    for g in o.param_groups
                    for p in g["params"]
                    if p.grad is not None
                }
            )

        opt.register_step_pre_hook(record)
        return opt

    monkeypatch.setattr(run_mod, "make_optimizer", make)
    calls, client, logged = offp._run(tmp_path, tiny_model_dir, monkeypatch, cfg)
    return calls, client, logged, grads


def _adv(raw: torch.Tensor, kind: str) -> torch.Tensor:
    out = torch.empty_like(raw)
    for i in range(len(raw)):
        g = [float(x) for x in raw[(i // 4) * 4 : (i // 4) * 4 + 4]]
        mean = sum(g) / 4
        if kind == "rloo":
            out[i] = float(raw[i]) - (sum(g) - float(raw[i])) / 3
        elif kind == "mean":
            out[i] = float(raw[i]) - mean
        else:
            std = math.sqrt(sum((x - mean) ** 2 for x in g) / 3)
            out[i] = (float(raw[i]) - mean) / (std + 1e-6)
    return out


def _formula(variant: str, logp, old, mask, raw, lo, hi):
    """float64 loss of one rollout batch, row by row and token by token."""
    B = logp.shape[0]
    adv = _adv(raw, {"dr_grpo": "mean", "rloo": "rloo", "rloo_mean": "mean"}.get(variant, "std"))
    n_tok = int(mask.sum())
    total = logp.new_zeros(())
    for i in range(B):
        toks = [t for t in range(logp.shape[1]) if mask[i, t]]
        a = float(adv[i])
        if variant in ("gspo", "gspo_token"):
            if variant == "gspo":
                s = torch.exp(sum(logp[i, t] - old[i, t] for t in toks) / len(toks))
                total = total - torch.minimum(s * a, torch.clamp(s, 1 - lo, 1 + hi) * a) / B
            else:  # token-level ratios (GRPO-clip with GSPO's range): not GSPO
                row = [
                    -torch.minimum(r * a, torch.clamp(r, 1 - lo, 1 + hi) * a)
                    for r in (torch.exp(logp[i, t] - old[i, t]) for t in toks)
                ]
                total = total + sum(row) / len(toks) / B
            continue
        for t in toks:
            r = torch.exp(logp[i, t] - old[i, t])
            if variant in ("rloo", "rloo_mean"):
                total = total - a * logp[i, t] / len(toks) / B
            elif variant == "cispo":
                total = total - torch.clamp(r.detach(), 1 - lo, 1 + hi) * a * logp[i, t] / n_tok
            elif variant == "cispo_drop":  # GRPO-clip's gradient: clipped tokens give none
                total = total - torch.minimum(r * a, torch.clamp(r, 1 - lo, 1 + hi) * a) / n_tok
            else:
                term = -torch.minimum(r * a, torch.clamp(r, 1 - lo, 1 + hi) * a)
                norm = {"dr_grpo": B * MAX_NEW, "dr_grpo_len": B * len(toks), "dapo": n_tok}[variant]
                total = total + term / norm
    return total


def _ref_grad(tiny_model_dir, call, variant, lo, hi) -> dict[str, torch.Tensor]:
    from mathpt.models import load_model

    m = load_model(str(tiny_model_dir), dtype=torch.float32, device="cpu")
    m.load_state_dict(call["before"])
    m = m.double().train()
    b = call["batch"]
    logp = naive_response_log_probs(m, b["input_ids"], b["labels"])["log_probs"]
    loss = _formula(
        variant, logp, b["old_log_probs"].double(), b["response_mask"], b["raw_rewards"].double(), lo, hi
    )
    loss.backward()
    return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def _rel(a: dict, b: dict) -> float:
    keys = sorted(set(a) & set(b))
    x = torch.cat([a[k].double().flatten() for k in keys])
    y = torch.cat([b[k].double().flatten() for k in keys])
    return float((x - y).norm() / y.norm())


# (algorithm, config overrides, its formula, the nearest other formula, lo, hi)
CASES = [
    ("dr_grpo", {}, "dr_grpo", "dr_grpo_len", 0.2, 0.2),
    ("gspo", {"cliprange_low": 0.02, "cliprange_high": 0.03}, "gspo", "gspo_token", 0.02, 0.03),
    ("rloo", {}, "rloo", "rloo_mean", None, None),
    ("dapo", {"max_draws": 1}, "dapo", "dr_grpo", 0.2, 0.28),
    ("cispo", {"cliprange_high": 0.01}, "cispo", "cispo_drop", 1.0, 0.01),
]


@pytest.mark.slow
@pytest.mark.parametrize("algo,over,formula,other,lo,hi", CASES, ids=[c[0] for c in CASES])
def test_train_pg_update_is_the_algorithms_gradient(
    tmp_path, tiny_model_dir, monkeypatch, algo, over, formula, other, lo, hi
):
    calls, _, logged, grads = _run_with_grads(tmp_path, tiny_model_dir, monkeypatch, _cfg(algo, **over))
    assert len(calls) == 2 and len(grads) == 2  # one optimizer step per PG step
    call = calls[1]  # staleness 1: the ratio is pi_v1 / pi_v0, not 1
    assert float(call["batch"]["raw_rewards"].std()) > 0
    want = _ref_grad(tiny_model_dir, call, formula, lo, hi)
    assert _rel(grads[1], want) < 1e-4
    assert _rel(grads[1], _ref_grad(tiny_model_dir, call, other, lo, hi)) > 1e-2  # the test can fail
    if algo in ("gspo", "cispo"):
        assert call["out"]["loss_clip_fraction"] > 0  # the clip was exercised


def _dapo_reward(text: str, answer: str) -> dict:
    """All-equal groups for most prompts (answers 0..6: the test's questions 0..3), varied for the rest."""
    r = 0.0 if int(answer) <= 6 else float(len(text) % 2)
    return {"reward": r, "format_reward": r, "answer_reward": r}


def _dapo_run(tmp_path, tiny_model_dir, monkeypatch, staleness: int):
    seeds: list[list[int]] = []
    real_submit = offp.InlineClient.submit

    def submit(self, kind, prompts, params, step, tag=None):
        if kind == "rollout":
            seeds.append(list(params.seeds))
        return real_submit(self, kind, prompts, params, step, tag)

    monkeypatch.setattr(offp.InlineClient, "submit", submit)
    monkeypatch.setattr(offp, "_reward", _dapo_reward)
    tmp_path.mkdir()
    cfg = _cfg("dapo", staleness, n_steps=3, max_draws=6)
    calls, client, logged = offp._run(tmp_path, tiny_model_dir, monkeypatch, cfg)
    return calls, client, sorted(logged, key=lambda r: r["step"]), seeds


@pytest.mark.slow
def test_dapo_dynamic_sampling_through_train_pg(tmp_path, tiny_model_dir, monkeypatch):
    calls, client, logged, seeds = _dapo_run(tmp_path / "a", tiny_model_dir, monkeypatch, staleness=1)
    flat = [s for job in seeds for s in job]
    assert len(flat) == len(set(flat))  # every draw of every step has its own sampling seeds
    assert sum(r["dynamic/draws"] for r in logged) > len(logged)  # some batch needed extra draws
    mixed = 0
    for call, row in zip(calls, logged, strict=True):
        b = call["batch"]
        assert b["input_ids"].shape[0] == 8  # the batch is full
        assert row["dynamic/groups_drawn"] == 2 * row["dynamic/draws"]
        assert row["dynamic/groups_kept"] + row["dynamic/groups_padded"] == 2
        assert row["dynamic/draws"] <= 6
        groups = b["raw_rewards"].view(-1, 4)
        varied = int((groups.std(dim=1) > 0).sum())
        assert varied == row["dynamic/groups_kept"]  # only padding may be all-equal
        if row["dynamic/groups_padded"] == 0:
            assert varied == 2
        # old log-probs under the weights that drew each row (staleness 1 + extra draws: two versions)
        versions = b["weight_version"]
        mixed += len(set(versions.tolist())) > 1
        for v in set(versions.tolist()):
            rows = versions == v
            sub = {k: b[k][rows] for k in ("input_ids", "labels", "response_mask")}
            ref = offp._ref_log_probs(tiny_model_dir, client.weights[v], sub)
            m = sub["response_mask"]
            # pi_old as pg_update used it (on-policy rows: the update's own forward)
            old = call["out"]["old_log_probs"]
            torch.testing.assert_close(old[rows][m].double(), ref[m], rtol=0, atol=2e-5)
    assert mixed >= 1  # the staleness-1 case was exercised
    # a rerun draws the same samples
    seeds, calls = list(seeds), list(calls)  # (the rerun's spies wrap these, which keep appending)
    again, _, logged2, seeds2 = _dapo_run(tmp_path / "b", tiny_model_dir, monkeypatch, staleness=1)
    assert seeds2 == seeds
    for c1, c2 in zip(calls, again, strict=True):
        assert torch.equal(c1["batch"]["input_ids"], c2["batch"]["input_ids"])
    assert [r["dynamic/draws"] for r in logged2] == [r["dynamic/draws"] for r in logged]
