"""train_pg itself: what GRPO-clip's ratio is taken against, per-minibatch off-policy metrics, the PG
learning-rate warm-up, per-sample sampling seeds, and TIS weights against float64 references.

The inference worker is replaced by an in-process client that runs each job at submit time on
exactly the newest pushed weights (the worker's guarantee), with the real HF engine, so the test
knows which weights generated every batch and keeps a copy of each version for the references.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch

from mathpt.engines.base import SamplingConfig
from mathpt.functional import compute_tis_weights, naive_response_log_probs
from mathpt.runtime.worker import JobResult

REPO = Path(__file__).resolve().parents[2]
LR = 5e-2


class InlineClient:
    """InferenceClient's interface, in process: a job runs when submitted, on the newest pushed weights."""

    instances: list[InlineClient] = []

    def __init__(self, engine: str, model_path: str, **_):
        from mathpt.engines.hf_engine import HFEngine

        self.engine = HFEngine(model_path, batch_size=64)
        self.weights = {0: {k: v.detach().clone() for k, v in self.engine.model.state_dict().items()}}
        self.results: dict[int, JobResult] = {}
        self.ids = itertools.count()
        self.pushed = 0
        InlineClient.instances.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def submit(self, kind, prompts, params, step, tag=None) -> int:
        job_id = next(self.ids)
        gens = self.engine.generate(prompts, params)
        self.results[job_id] = JobResult(job_id, kind, step, self.engine.weight_version, gens)
        return job_id

    def wait(self, job_id, timeout=None) -> JobResult:
        return self.results.pop(job_id)

    def poll(self, kind=None):
        ids = [i for i, r in self.results.items() if kind is None or r.kind == kind]
        return [self.results.pop(i) for i in ids]

    @property
    def pushed_version(self) -> int:
        return self.pushed

    def push_weights(self, model, version: int) -> float:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.engine.load_weights(state.items(), version)
        self.weights[version] = state
        self.pushed = version
        return 0.0


def _reward(text: str, answer: str) -> dict:
    """Varies with the sample, so advantages are nonzero and the weights move."""
    r = float(len(text) % 2)
    return {"reward": r, "format_reward": r, "answer_reward": r}


def _cfg(staleness: int, **pg) -> dict:
    from mathpt.config import load_config, rule_slice

    cfg = rule_slice(load_config(REPO / "config" / "config.yaml"), "train", algo="grpo_clip", seed=0)
    cfg["dtype"] = "float32"
    cfg["runtime"] = {**cfg["runtime"], "layout": "cpu", "engine": "hf"}
    cfg["pg"].update(
        n_steps=3,
        rollout_batch_size=8,
        group_size=4,
        minibatch_size=8,
        microbatch_size=4,
        lr=LR,
        max_new_tokens=6,
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


def _run(tmp_path, tiny_model_dir, monkeypatch, cfg) -> tuple[list[dict], InlineClient, list[dict]]:
    """train_pg with the inline client; returns (each pg_update call: model state before, batch, its
    settings and seed, output), the client, and the logged training rows."""
    import mathpt.train.pg as pg_mod
    import mathpt.train.run as run_mod
    from mathpt.tracking import read_metrics

    calls = []
    real = pg_mod.pg_update

    def spy(model, optimizer, batch, settings, **kw):
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out = real(model, optimizer, batch, settings, **kw)
        calls.append(
            {
                "before": before,
                "batch": copy.deepcopy(batch),
                "settings": settings,
                "seed": kw["seed"],
                "out": out,
            }
        )
        return out

    InlineClient.instances.clear()
    monkeypatch.setattr(run_mod, "InferenceClient", InlineClient)
    monkeypatch.setattr(pg_mod, "pg_update", spy)
    monkeypatch.setattr(pg_mod, "get_reward_fn", lambda style: _reward)
    rows = [
        {"id": f"p{i}", "prompt": f"Question {i}: what is {i} plus {i}?", "answer": str(2 * i)}
        for i in range(6)
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    pg_mod.train_pg(
        cfg,
        init_dir=str(tiny_model_dir),
        train_prompts_path=str(prompts),
        val_prompts_path=str(prompts),
        out_dir=str(tmp_path / "out"),
        run_dir=str(run_dir),
        state_dir=str(tmp_path / "state"),
    )
    logged = read_metrics(run_dir / "metrics.jsonl", kind="train")
    return calls, InlineClient.instances[0], logged


def _ref_log_probs(tiny_model_dir, state: dict, batch: dict) -> torch.Tensor:
    """float64 log-probs of the batch's labels under the weights ``state`` (naive full-logits formula)."""
    from mathpt.models import load_model

    m = load_model(str(tiny_model_dir), dtype=torch.float32, device="cpu")
    m.load_state_dict(state)
    m = m.double().eval()
    with torch.no_grad():
        return naive_response_log_probs(m, batch["input_ids"], batch["labels"])["log_probs"]


@pytest.mark.slow
@pytest.mark.parametrize("staleness", [0, 1])
def test_train_pg_ratio_is_against_the_weights_that_generated_the_batch(
    tmp_path, tiny_model_dir, monkeypatch, staleness
):
    calls, client, logged = _run(tmp_path, tiny_model_dir, monkeypatch, _cfg(staleness))
    assert len(calls) == 3
    call = calls[1]  # the trainer holds v1 here
    batch, mask = call["batch"], call["batch"]["response_mask"]
    behaviour_version = 1 - staleness
    assert not torch.equal(client.weights[0]["model.norm.weight"], client.weights[1]["model.norm.weight"])
    ref_old = _ref_log_probs(tiny_model_dir, client.weights[behaviour_version], batch)
    old = batch["old_log_probs"] if staleness else call["out"]["old_log_probs"]  # on-policy: pg_update's
    torch.testing.assert_close(old[mask].double(), ref_old[mask], rtol=0, atol=2e-5)
    # pi_theta: the trainer's weights at the first minibatch (before any update on this batch) = v1
    for k, v in call["before"].items():
        torch.testing.assert_close(v, client.weights[1][k])
    ref_ratio = torch.exp(_ref_log_probs(tiny_model_dir, call["before"], batch) - ref_old)[mask]
    first = call["out"]["per_step"][0]
    assert first["ratio_mean"] == pytest.approx(float(ref_ratio.mean()), abs=2e-5)
    assert first["ratio_min"] == pytest.approx(float(ref_ratio.min()), abs=2e-5)
    assert first["ratio_max"] == pytest.approx(float(ref_ratio.max()), abs=2e-5)
    gap = (ref_ratio.log()).abs()
    assert first["logp_gap_mean"] == pytest.approx(float(gap.mean()), abs=2e-5)
    assert first["kl_k3"] == pytest.approx(float(((ref_ratio - 1) - ref_ratio.log()).mean()), abs=2e-5)
    if staleness == 0:
        assert float(ref_ratio.min()) == pytest.approx(1.0, abs=1e-5) and first["logp_gap_max"] < 1e-5
    else:
        assert float((ref_ratio - 1).abs().max()) > 1e-3  # one policy behind: the ratio is not 1
        assert first["logp_gap_max"] > 1e-3
    # logged per PG step, every minibatch (the first included); the sampler-vs-trainer gap on the
    # batches whose sampler log-probs were asked for (the first one here: eval_every is large)
    row = next(r for r in logged if r["step"] == 2)
    for k in ("mb0/clip_fraction", "mb0/logp_gap_mean", "mb0/logp_gap_max", "mb0/kl_k3"):
        assert k in row, k
    assert row["mb0/logp_gap_mean"] == pytest.approx(first["logp_gap_mean"])
    first_row = next(r for r in logged if r["step"] == 1)
    for k in ("sampler_logp_gap_mean", "sampler_logp_gap_max", "sampler_kl_k3"):
        assert k in first_row and k not in row, k


@pytest.mark.slow
def test_train_pg_lr_warmup_step_zero_is_lr_over_warmup(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _cfg(1, warmup_steps=4, minibatch_size=4, lr_decay="constant")  # 2 optimizer steps per PG step
    calls, _, logged = _run(tmp_path, tiny_model_dir, monkeypatch, cfg)
    lrs = [s["lr"] for c in calls for s in c["out"]["per_step"]]
    assert lrs == pytest.approx([LR / 4, 2 * LR / 4, 3 * LR / 4, LR, LR, LR])
    assert [r["lr"] for r in sorted(logged, key=lambda r: r["step"])] == pytest.approx(
        [LR / 4, 3 * LR / 4, LR]
    )


def test_lr_schedule_cosine_and_constant():
    import math

    from mathpt.optim import lr_schedule

    for decay in ("constant", "cosine"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = lr_schedule(opt, 2, 10, decay=decay)
        got = []
        for _ in range(10):
            got.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        want = [0.5, 1.0] + [
            1.0 if decay == "constant" else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 8))
            for k in range(8)
        ]
        assert got == pytest.approx(want)


def test_sample_seeds_are_distinct_per_sample_and_reproducible():
    from mathpt.train.pg import sample_seeds

    a = sample_seeds(0, 5, n_prompts=16, group_size=8)
    assert len(a) == 128 and len(set(a)) == 128  # every (prompt, sample) of the step has its own stream
    assert a == sample_seeds(0, 5, 16, 8)  # a rerun draws the same
    others = set(sample_seeds(0, 6, 16, 8)) | set(sample_seeds(1, 5, 16, 8))
    assert not others & set(a)  # no stream shared with the next step or another run seed
    assert all(0 <= s < 2**63 for s in a)


def test_identical_prompts_get_different_samples_and_reruns_reproduce(tiny_model_dir):
    from mathpt.engines.hf_engine import HFEngine
    from mathpt.train.pg import sample_seeds

    eng = HFEngine(tiny_model_dir, batch_size=3)  # 3 < 4 rows: seeds follow rows across batches
    prompts = ["What is 2 plus 2?", "What is 2 plus 2?"]
    params = SamplingConfig(max_new_tokens=8, temperature=1.0, n=2, seeds=sample_seeds(0, 0, 2, 2))
    a = eng.generate(prompts, params)
    b = eng.generate(prompts, params)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert len({tuple(g.token_ids) for g in a}) == 4
    # a row's sample depends on its own seed only, not on its batch neighbours
    solo = eng.generate(
        prompts[1:], SamplingConfig(max_new_tokens=8, temperature=1.0, n=2, seeds=params.seeds[2:])
    )
    assert [g.token_ids for g in solo] == [g.token_ids for g in a[2:]]
    with pytest.raises(ValueError, match="seeds"):
        eng.generate(prompts, SamplingConfig(max_new_tokens=2, n=2, seeds=(1, 2, 3)))


def test_tis_weights_match_float64_reference():
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(5, 7, generator=gen, dtype=torch.float64) * 3
    sampler = old + torch.randn(5, 7, generator=gen, dtype=torch.float64) * 0.8
    got = compute_tis_weights(old.float().requires_grad_(), sampler.float(), cap=1.5)
    want = torch.minimum(torch.exp(old - sampler), torch.tensor(1.5, dtype=torch.float64))
    assert not got.requires_grad
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert (want == 1.5).any() and (want < 1.5).any()  # both sides of the cap are exercised
    with pytest.raises(ValueError, match="cap"):
        compute_tis_weights(old, sampler, cap=0.0)


def _vllm_generate(model_dir: str, out: str) -> None:
    """In a spawned process (vLLM sets process-wide state): the same seeded request twice."""
    from mathpt.engines.vllm_engine import VLLMEngine
    from mathpt.train.pg import sample_seeds

    eng = VLLMEngine(model_dir, device="cpu", max_model_len=256)
    prompts = ["What is 2 plus 2?"] * 2 + ["A much longer question about apples and pears " * 6]
    params = SamplingConfig(max_new_tokens=8, temperature=1.0, n=2, seeds=sample_seeds(0, 0, 3, 2))
    runs = [
        [(g.prompt_index, g.sample_index, g.token_ids) for g in eng.generate(prompts, params)]
        for _ in range(2)
    ]
    Path(out).write_text(json.dumps(runs))


@pytest.mark.slow
def test_vllm_per_sample_seeds_differ_within_a_group_and_reproduce(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    import multiprocessing

    out = tmp_path / "gens.json"
    proc = multiprocessing.get_context("spawn").Process(
        target=_vllm_generate, args=(str(tiny_model_dir), str(out))
    )
    proc.start()
    proc.join(600)
    assert proc.exitcode == 0
    a, b = json.loads(out.read_text())
    assert a == b  # a rerun reproduces every sample
    assert [(i, j) for i, j, _ in a] == [(i, j) for i in range(3) for j in range(2)]
    assert len({tuple(t) for i, _, t in a if i < 2}) == 4  # identical prompts, four distinct samples


@pytest.mark.parametrize("staleness", [0, 1])
def test_train_pg_old_log_probs_take_the_updates_cuts_and_mb0_ratio_is_exactly_1(
    tmp_path, tiny_model_dir, monkeypatch, staleness
):
    """Issue 27.1: in bf16 a different pack gives different logits (GPU), so pi_old must be computed
    with the update's own cuts, and on-policy the first step's ratio must be exactly 1."""
    import mathpt.train.steps as steps_mod
    from mathpt.train import batching
    from mathpt.train.batching import response_lengths, token_budget_microbatches

    old_cuts = []
    real_old = steps_mod.compute_old_log_probs

    def old_spy(*a, groups=None, **kw):
        old_cuts.append(groups)
        return real_old(*a, groups=groups, **kw)

    monkeypatch.setattr(steps_mod, "compute_old_log_probs", old_spy)  # pg_update's and the behaviour's
    cfg = _cfg(staleness, minibatch_size=4, microbatch_size=None, microbatch_tokens=50, packing=True)
    cfg["dtype"] = "bfloat16"
    calls, _, _ = _run(tmp_path, tiny_model_dir, monkeypatch, cfg)
    assert len(calls) == len(old_cuts) == 3
    as_sets = lambda cuts: sorted(tuple(sorted(c.tolist())) for c in cuts)  # noqa: E731
    for i, call in enumerate(calls):
        # the plan pg_update ran (deterministic in the batch, the settings and the seed it was given)
        update_plan = batching.update_plan(call["batch"]["response_mask"], call["settings"], call["seed"])
        first_epoch = [g for step in update_plan[:2] for g in step]  # 8 rows / minibatch 4
        on_policy = "old_log_probs" not in call["batch"]
        assert on_policy == (staleness == 0 or i == 0)
        if on_policy:  # the first step's rows come from its own forward; the rest with its cuts
            assert as_sets(old_cuts[i]) == as_sets(update_plan[1])
            mb0 = call["out"]["per_step"][0]
            assert mb0["ratio_min"] == mb0["ratio_max"] == 1.0 and mb0["logp_gap_max"] == 0.0
        else:
            assert as_sets(old_cuts[i]) == as_sets(first_epoch)
        # the whole-batch cuts the old code used are not the update's: this setting can tell them apart
        lengths = response_lengths(call["batch"]["response_mask"])
        assert as_sets(token_budget_microbatches(lengths, 50, None, packed=True)) != as_sets(first_epoch)


def test_train_pg_rejects_a_temperature_other_than_1(tmp_path, tiny_model_dir, monkeypatch):
    """Issue 27.6: at T != 1 the samples are not from the policy the trainer scores."""
    from mathpt.io import MathptError

    with pytest.raises(MathptError, match=r"train\.pg\.temperature is 0\.7"):
        _run(tmp_path, tiny_model_dir, monkeypatch, _cfg(0, temperature=0.7))


def test_train_pg_resume_at_staleness_1_draws_the_uninterrupted_batches(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Issue 27.7: after a resume at step 2, batch 2 is generated with v1 (the saved behaviour copy),
    as in the uninterrupted run, so it holds the same tokens and the same pi_old."""
    import mathpt.train.pg as pg_mod

    cfg = _cfg(1, checkpoint_every=1)
    for d in ("full", "resumed"):
        (tmp_path / d).mkdir()
    full, _, _ = _run(tmp_path / "full", tiny_model_dir, monkeypatch, cfg)
    real = pg_mod.pg_update
    n_calls = itertools.count()

    def killed_at_step_2(*a, **kw):
        if next(n_calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    monkeypatch.setattr(pg_mod, "pg_update", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed", tiny_model_dir, monkeypatch, cfg)
    assert (tmp_path / "resumed" / "state" / "state.json").exists()
    monkeypatch.setattr(pg_mod, "pg_update", real)
    resumed, _, logged = _run(tmp_path / "resumed", tiny_model_dir, monkeypatch, cfg)
    assert len(resumed) == 1  # step 2 only
    want, got = full[2]["batch"], resumed[0]["batch"]
    assert not torch.equal(full[1]["batch"]["input_ids"], want["input_ids"])  # batches differ per step
    assert torch.equal(got["input_ids"], want["input_ids"])
    torch.testing.assert_close(got["old_log_probs"], want["old_log_probs"], rtol=0, atol=0)
    row = next(r for r in logged if r["step"] == 3)
    assert row["rollout_weight_version"] == 1
