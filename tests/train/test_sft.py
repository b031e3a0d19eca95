"""SFT: the loss is a mean per response token of the whole step (whatever the microbatch cut, packed or
padded), the clip is reported, and each training seed visits the examples in its own order."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, tiny_qwen

from mathpt.functional import naive_response_log_probs
from mathpt.train.batching import response_lengths
from mathpt.train.sft import epoch_order, step_microbatches
from mathpt.train.steps import sft_update

V = 97


def examples(seed: int, rows: int = 12, width: int = 30) -> dict[str, torch.Tensor]:
    """Right-padded SFT rows (prompt, response, padding) of very different lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (rows, width + 1), generator=gen)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for i in range(rows):
        p = int(torch.randint(2, 8, (1,), generator=gen))
        r = int(torch.randint(1, width - p + 2, (1,), generator=gen))
        mask[i, p - 1 : p - 1 + r] = True
        ids[i, p + r :] = 0
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "response_mask": mask}


def sgd_grad(model, microbatches, **kw):
    """The gradient sft_update applied (SGD with lr 1: the parameter change) and its metrics."""
    m = copy.deepcopy(model)
    before = [p.detach().clone() for p in m.parameters()]
    metrics = sft_update(m, torch.optim.SGD(m.parameters(), lr=1.0), microbatches, autocast_dtype=None, **kw)
    return [b - p.detach() for b, p in zip(before, m.parameters(), strict=True)], metrics


@pytest.fixture(scope="module")
def model64():
    return tiny_qwen(torch.float64)


def test_sft_step_is_the_token_mean_nll_whatever_the_cut(model64):
    ex = examples(0)
    rows = torch.arange(ex["input_ids"].shape[0])
    mask = ex["response_mask"]
    ref_model = copy.deepcopy(model64)
    lp = naive_response_log_probs(ref_model, ex["input_ids"], ex["labels"])["log_probs"]
    ref_loss = (
        -torch.where(mask, lp, 0.0).sum() / mask.sum()
    )  # float64 reference: mean NLL per response token
    ref_loss.backward()
    ref = [p.grad for p in ref_model.parameters()]
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref])).item()

    cuts = {
        "one microbatch": ([ex], False),
        "rows of 1": ([{k: v[i : i + 1] for k, v in ex.items()} for i in range(12)], False),
        "rows of 5": ([{k: v[s : s + 5] for k, v in ex.items()} for s in range(0, 12, 5)], False),
        "padded budget": (step_microbatches(ex, rows, 4, 60, packing=False)[0], False),
        "packed budget": (step_microbatches(ex, rows, 4, 60, packing=True)[0], True),
        "packed, one row": ([ex], True),
    }
    assert len(cuts["padded budget"][0]) > 2 and len(cuts["packed budget"][0]) > 2  # real splits
    for name, (mbs, packing) in cuts.items():
        got, metrics = sgd_grad(model64, mbs, max_grad_norm=None, packing=packing)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11, msg=name)
        assert metrics["loss"] == pytest.approx(ref_loss.item(), rel=1e-10), name
        assert metrics["tokens"] == mask.sum().item()
        assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-8)
        assert metrics["grad_clipped"] == 0.0


def test_sft_reports_the_pre_clip_norm_and_whether_it_clipped(model64):
    ex = examples(1)
    _, free = sgd_grad(model64, [ex], max_grad_norm=None)
    got, clipped = sgd_grad(model64, [ex], max_grad_norm=free["grad_norm"] / 4)
    assert clipped["grad_clipped"] == 1.0 and clipped["grad_norm"] == pytest.approx(
        free["grad_norm"], rel=1e-10
    )
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in got])).item()
    assert norm == pytest.approx(free["grad_norm"] / 4, rel=1e-5)  # the step really was clipped
    _, loose = sgd_grad(model64, [ex], max_grad_norm=free["grad_norm"] * 4)
    assert loose["grad_clipped"] == 0.0


def test_token_budget_groups_respect_the_budget_and_keep_every_row():
    ex = examples(2, rows=40, width=60)
    rows = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    lengths = response_lengths(ex["response_mask"])
    for packing in (False, True):
        mbs, real = step_microbatches(ex, rows, 8, 150, packing=packing)
        assert real == int(lengths.sum())
        seen = sorted(tuple(r.tolist()) for mb in mbs for r in mb["input_ids"])
        assert seen == sorted(tuple(r.tolist()) for r in ex["input_ids"])
        for mb in mbs:
            n = response_lengths(mb["response_mask"])
            cost = int(n.sum()) if packing else len(n) * int(n.max())
            assert len(n) == 1 or cost <= 150
    fixed, _ = step_microbatches(ex, rows, 8, None, packing=False)
    assert [mb["input_ids"].shape[0] for mb in fixed] == [8] * 5
    assert torch.equal(torch.cat([mb["input_ids"] for mb in fixed]), ex["input_ids"][rows])


def test_epoch_order_depends_on_seed_and_epoch_and_is_reproducible():
    n = 50
    a0, a1, b0 = epoch_order(n, 0, 0), epoch_order(n, 0, 1), epoch_order(n, 1, 0)
    for p in (a0, a1, b0):
        assert sorted(p.tolist()) == list(range(n))  # every example once per epoch
    assert not torch.equal(a0, b0) and not torch.equal(a0, a1)
    assert torch.equal(a0, epoch_order(n, 0, 0))
    assert not torch.equal(epoch_order(n, 1, 0), epoch_order(n, 0, 1))  # (seed, epoch) pairs do not alias


class FakeClient:
    """Stands in for the inference worker: no generation; every validation job comes back failed."""

    def __init__(self, **_):
        self.jobs = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def push_weights(self, model, version):
        return 0.0

    def submit(self, kind, prompts, params, step):
        self.jobs += 1
        return self.jobs

    def poll(self, kind=None):
        return []

    def wait(self, job_id):
        return SimpleNamespace(kind="eval", job_id=job_id, error="not run in this test", step=0)


@pytest.fixture(scope="module")
def shards(tiny_model_dir, word_problems, tmp_path_factory):
    from mathpt.data import parse_gsm8k_answer
    from mathpt.io import write_jsonl
    from mathpt.shards import write_prompt_set, write_sft_shards
    from mathpt.teachers.gold import gold_traces

    rows = []
    for i, raw in enumerate(word_problems[:21]):
        solution, gold = parse_gsm8k_answer(raw["answer"])
        rows.append(
            {"id": f"train-{i:05d}", "question": raw["question"], "solution": solution, "answer": gold}
        )
    work = tmp_path_factory.mktemp("sft_loop")
    write_jsonl(work / "traces.jsonl", gold_traces(rows, "qwen_boxed"))
    write_sft_shards(
        work / "traces.jsonl", tiny_model_dir, work / "shards", max_seq_len=512, microbatch_size=4
    )
    write_prompt_set(rows[:2], "qwen_boxed", work / "val.jsonl")
    return work


def run_loop(shards, tiny_model_dir, monkeypatch, seed: int, tag: str) -> list[list[tuple]]:
    """train_sft for 2 epochs with the update recorded instead of applied: the examples of each step."""
    import yaml

    import mathpt.train.run as run_mod
    import mathpt.train.sft as sft_mod
    from mathpt.config import rule_slice, validate_config

    cfg = yaml.safe_load((REPO / "config" / "arith.yaml").read_text())
    cfg["train"]["sft"].update(epochs=2, eval_every=10_000, checkpoint_every=10_000, microbatch_tokens=300)
    validate_config(cfg)
    steps: list[list[tuple]] = []

    def record(model, optimizer, microbatches, **kw):
        steps.append(
            [
                tuple(r[: int(n)].tolist())
                for mb in microbatches
                for r, n in zip(mb["input_ids"], response_lengths(mb["response_mask"]), strict=True)
            ]
        )
        return {
            "loss": 0.0,
            "nll": 0.0,
            "grad_norm": 0.0,
            "grad_clipped": 0.0,
            "entropy": 0.0,
            "tokens": float(sum(int(mb["response_mask"].sum()) for mb in microbatches)),
        }

    monkeypatch.setattr(sft_mod, "sft_update", record)
    monkeypatch.setattr(run_mod, "InferenceClient", FakeClient)
    d = shards / tag
    sft_mod.train_sft(
        rule_slice(cfg, "train", algo="sft", seed=seed),
        init_dir=str(tiny_model_dir),
        shards_dir=str(shards / "shards"),
        val_prompts_path=str(shards / "val.jsonl"),
        out_dir=str(d / "ckpt"),
        run_dir=str(d / "run"),
        state_dir=str(d / "state"),
    )
    return steps


def test_train_sft_seeds_change_the_data_order(shards, tiny_model_dir, monkeypatch):
    s0 = run_loop(shards, tiny_model_dir, monkeypatch, 0, "a")
    s0_again = run_loop(shards, tiny_model_dir, monkeypatch, 0, "b")
    s1 = run_loop(shards, tiny_model_dir, monkeypatch, 1, "c")
    assert len(s0) == 2 * 6  # 21 examples, 4 per step: 6 steps per epoch
    assert s0 == s0_again
    flat0 = [[x for step in s0[e * 6 : (e + 1) * 6] for x in step] for e in range(2)]
    flat1 = [[x for step in s1[e * 6 : (e + 1) * 6] for x in step] for e in range(2)]
    for epoch in flat0 + flat1:
        assert len(epoch) == 21 and len(set(epoch)) == 21  # every example exactly once per epoch
        assert set(epoch) == set(flat0[0])
    assert [set(s) for s in s0] != [set(s) for s in s1]  # different step compositions, not only order
    assert flat0[0] != flat0[1]  # and a new order each epoch
