"""GSM8K k-shot eval: few-shot selection, sharding invariance, row contract, strict eval files."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mathpt.data import to_row
from mathpt.engines.base import Generation
from mathpt.evaluation import gsm8k_eval
from mathpt.evaluation.gsm8k_eval import (
    ROW_TYPES,
    chunk_indices,
    read_eval,
    run_gsm8k_eval,
    select_fewshot,
    split_shards,
    write_eval,
)
from mathpt.io import DataError, MathptError, sha256_text
from mathpt.prompts import format_fewshot_prompt


@pytest.fixture(scope="module")
def data(gsm8k_dir) -> dict[str, list[dict]]:
    out = {}
    for split, n in (("train", 300), ("test", 40)):
        with open(gsm8k_dir / f"{split}.jsonl") as f:
            raw = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
        out[split] = [to_row(r, f"{split}-{i:05d}", f"{split}:{i + 1}") for i, r in enumerate(raw)]
    return out


@pytest.fixture(scope="module")
def varied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with large random weights: its greedy output depends on the prompt, so a
    mis-ordered merge would show (the default init answers '>>>>' to everything)."""
    from mathpt.models import load_model, load_tokenizer, save_model

    model = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    out = tmp_path_factory.mktemp("varied_model")
    save_model(model, load_tokenizer(tiny_model_dir), out)
    return out


def test_fewshot_is_deterministic_train_only_and_order_free(data):
    pool = data["train"]
    a = select_fewshot(pool, 4, seed=3)
    shuffled = pool[:]
    random.Random(1).shuffle(shuffled)
    assert [e["id"] for e in select_fewshot(shuffled, 4, seed=3)] == [e["id"] for e in a]
    assert len({e["id"] for e in a}) == 4 and all(e["id"].startswith("train-") for e in a)
    assert [e["id"] for e in select_fewshot(pool, 4, seed=4)] != [e["id"] for e in a]
    assert select_fewshot(pool, 0, seed=3) == []
    with pytest.raises(MathptError, match="never from test"):
        select_fewshot(pool + data["test"][:1], 2, seed=0)
    with pytest.raises(MathptError, match="only 300 rows"):
        select_fewshot(pool, 301, seed=0)
    leaked = [{**r, "id": f"train-x{i}"} for i, r in enumerate(data["test"][:3])]
    with pytest.raises(MathptError, match="same question as a test problem"):
        select_fewshot(leaked, 3, seed=0, test_rows=data["test"])


def test_chunks_are_shard_independent():
    rng = random.Random(0)
    for _ in range(200):
        n, bs, shards = rng.randint(1, 60), rng.randint(1, 9), rng.randint(1, 8)
        chunks = chunk_indices(n, bs)
        assert [i for c in chunks for i in c] == list(range(n))
        assert all(len(c) == bs for c in chunks[:-1])
        split = split_shards(chunks, shards)
        assert [c for s in split for c in s] == chunks  # contiguous, order kept, nothing lost
        sizes = [len(s) for s in split]
        assert len(split) == min(shards, len(chunks)) and max(sizes) - min(sizes) <= 1


class FakeEngine:
    """Answers problem i correctly when i is even; responses of i+1 tokens; truncated when i % 3 == 0;
    without the answer format ("The answer is N.") when i % 5 == 4."""

    def __init__(self, by_prompt: dict[str, tuple[int, str]]):
        self.by_prompt = by_prompt
        self.calls: list[int] = []

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        assert params.temperature == 0 and params.stop == ("</answer>",)
        out = []
        for j, p in enumerate(prompts):
            i, gold = self.by_prompt[p]
            answer = gold if i % 2 == 0 else str(int(gold) + 1)
            text = (
                f"some steps. The answer is {answer}."
                if i % 5 == 4
                else f"some steps</think> <answer>{answer}</answer>"
            )
            out.append(
                Generation(
                    prompt_index=j,
                    sample_index=0,
                    text=text,
                    token_ids=list(range(i + 1)),
                    logprobs=None,
                    finish_reason="length" if i % 3 == 0 else "stop",
                    weight_version=7,
                )
            )
        return out

    def close(self):
        pass


def test_rows_and_summary_follow_the_contract(data, tiny_model_dir, tmp_path, monkeypatch):
    test, train = data["test"][:10], data["train"]
    examples = select_fewshot(train, 2, seed=5, test_rows=test)
    prompts = [format_fewshot_prompt(r["question"], [], "r1_zero") for r in test]  # primary: trained, 0-shot
    kshot = [format_fewshot_prompt(r["question"], examples, "r1_zero") for r in test]
    fake = FakeEngine({p: (i, r["answer"]) for i, (p, r) in enumerate(zip(prompts, test, strict=True))})
    fake.by_prompt.update({p: (i + 1, r["answer"]) for i, (p, r) in enumerate(zip(kshot, test, strict=True))})
    monkeypatch.setattr(gsm8k_eval, "make_engine", lambda name, path, **kw: fake)

    rows, summary = run_gsm8k_eval(
        tiny_model_dir,
        data["test"],
        train,
        k_shot=2,
        style="r1_zero",
        max_new_tokens=16,
        engine="hf",
        devices=["cpu"],
        fewshot_seed=5,
        limit=10,
        batch_size=4,
    )
    assert fake.calls == [4, 4, 4, 4, 4]  # 10 primary + 10 k-shot prompts through one engine
    assert [r["index"] for r in rows] == list(range(10))
    assert [r["id"] for r in rows] == [r["id"] for r in test]
    assert [r["prompt_hash"] for r in rows] == [sha256_text(p) for p in prompts]
    assert [r["kshot_prompt_hash"] for r in rows] == [sha256_text(p) for p in kshot]
    assert all(set(ROW_TYPES) <= set(r) for r in rows)
    assert [r["kshot_correct"] for r in rows] == [i % 2 == 1 and i % 5 != 3 for i in range(10)]
    formatted = [i % 5 != 4 for i in range(10)]
    assert [r["formatted"] for r in rows] == formatted
    assert [r["correct_any_format"] for r in rows] == [i % 2 == 0 for i in range(10)]
    assert [r["correct"] for r in rows] == [i % 2 == 0 and f for i, f in enumerate(formatted)]
    assert [r["extracted"] for r in rows] == [
        r["answer"] if i % 2 == 0 else str(int(r["answer"]) + 1) for i, r in enumerate(test)
    ]
    assert [r["truncated"] for r in rows] == [i % 3 == 0 for i in range(10)]
    assert [r["generated_tokens"] for r in rows] == [i + 1 for i in range(10)]
    assert summary["n"] == 10 and summary["accuracy"] == pytest.approx(
        0.4
    )  # problem 4 is right but unformatted
    assert summary["accuracy_any_format"] == pytest.approx(0.5) and summary["format_rate"] == pytest.approx(
        0.8
    )
    assert summary["truncated_fraction"] == pytest.approx(4 / 10)
    assert summary["mean_generated_tokens"] == pytest.approx(5.5)
    assert summary["fewshot_ids"] == [e["id"] for e in examples]
    assert summary["weight_versions"] == [7] and summary["k_shot"] == 2 and summary["style"] == "r1_zero"

    out_rows, out_summary = tmp_path / "gsm8k.jsonl", tmp_path / "summary.json"
    write_eval(rows, summary, out_rows, out_summary)
    assert read_eval(out_rows) == rows
    assert json.loads(out_summary.read_text())["accuracy"] == summary["accuracy"]


def test_context_overflow_fails_up_front(data, tiny_model_dir):
    with pytest.raises(MathptError, match="k_shot"):
        run_gsm8k_eval(
            tiny_model_dir,
            data["test"],
            data["train"],
            k_shot=2,
            style="r1_zero",
            max_new_tokens=4096,
            engine="hf",
            devices=["cpu"],
            limit=2,
        )


def test_shard_count_leaves_rows_identical(data, varied_model_dir):
    kw = dict(
        k_shot=1, style="qwen_boxed", max_new_tokens=12, engine="hf", devices=["cpu"], limit=7, batch_size=2
    )
    rows1, s1 = run_gsm8k_eval(varied_model_dir, data["test"], data["train"], num_shards=1, **kw)
    rows3, s3 = run_gsm8k_eval(varied_model_dir, data["test"], data["train"], num_shards=3, inline=True, **kw)
    assert len({r["response"] for r in rows1}) > 1  # the model's output depends on the problem
    assert rows3 == rows1
    assert s3["accuracy"] == s1["accuracy"] and s3["num_shards"] == 3


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda lines: lines.__setitem__(2, "{not json"), ":3: invalid JSON"),
        (lambda lines: lines.__setitem__(1, json.dumps({"index": 1})), ":2: missing key"),
        (
            lambda lines: lines.__setitem__(3, lines[3].replace('"correct": false', '"correct": "no"')),
            ":4: key 'correct'",
        ),
        (
            lambda lines: lines.__setitem__(0, lines[0].replace('"index": 0', '"index": true')),
            ":1: key 'index'",
        ),
        (lambda lines: lines.__delitem__(1), ":2: index 2 out of order"),
    ],
)
def test_malformed_eval_file_names_path_and_line(tmp_path, mutate, message):
    rows = [
        {
            "index": i,
            "id": f"test-{i:05d}",
            "prompt_hash": "h",
            "response": "r",
            "extracted": None,
            "gold": "1",
            "correct": False,
            "formatted": False,
            "correct_any_format": False,
            "generated_tokens": 3,
            "truncated": False,
        }
        for i in range(5)
    ]
    path = tmp_path / "gsm8k.jsonl"
    lines = [json.dumps(r) for r in rows]
    mutate(lines)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        read_eval(path)
    assert str(path) + message in str(e.value)


@pytest.mark.slow
def test_spawned_hf_shards_match_one_shard(data, varied_model_dir):
    kw = dict(k_shot=1, style="r1_zero", max_new_tokens=12, engine="hf", limit=6, batch_size=2)
    rows1, _ = run_gsm8k_eval(
        varied_model_dir, data["test"], data["train"], num_shards=1, devices=["cpu"], **kw
    )
    rows2, _ = run_gsm8k_eval(
        varied_model_dir, data["test"], data["train"], num_shards=2, devices=["cpu", "cpu"], **kw
    )
    assert rows2 == rows1


@pytest.mark.slow
def test_vllm_engine_eval_is_shard_invariant(data, varied_model_dir):
    kw = dict(
        k_shot=1,
        style="r1_zero",
        max_new_tokens=12,
        engine="vllm",
        limit=6,
        batch_size=3,
        devices=["cpu"],
        engine_kwargs={"gpu_memory_utilization": 0.15, "max_model_len": 2048},
    )
    rows1, s1 = run_gsm8k_eval(varied_model_dir, data["test"], data["train"], num_shards=1, **kw)
    rows2, _ = run_gsm8k_eval(varied_model_dir, data["test"], data["train"], num_shards=2, **kw)
    assert len({r["response"] for r in rows1}) > 1
    assert rows2 == rows1
    assert s1["engine"] == "vllm" and s1["n"] == 6
    assert all(0 < r["generated_tokens"] <= 12 for r in rows1)


def test_primary_eval_is_the_trained_prompt_and_kshot_is_secondary(
    word_problems, tiny_model_dir, monkeypatch
):
    """Issue 27 item 4: `correct` grades the 0-shot trained prompt; with k_shot > 0 the k-shot prompt
    runs in the same engine (one engine built, one set of calls) and lands in kshot_* keys."""
    rows_all = [to_row(r, f"train-{i:05d}", f"arith:{i}") for i, r in enumerate(word_problems[:40])]
    test = [{**r, "id": f"test-{i:05d}"} for i, r in enumerate(rows_all[:6])]
    train = rows_all[6:]
    examples = select_fewshot(train, 2, seed=1, test_rows=test)
    zero = [format_fewshot_prompt(r["question"], [], "r1_zero") for r in test]
    kshot = [format_fewshot_prompt(r["question"], examples, "r1_zero") for r in test]
    fake = FakeEngine({p: (0, r["answer"]) for p, r in zip(zero, test, strict=True)})  # 0-shot: right
    fake.by_prompt.update({p: (1, r["answer"]) for p, r in zip(kshot, test, strict=True)})  # k-shot: wrong
    built = []
    monkeypatch.setattr(gsm8k_eval, "make_engine", lambda name, path, **kw: built.append(name) or fake)
    kw = dict(style="r1_zero", max_new_tokens=8, engine="hf", devices=["cpu"], fewshot_seed=1, batch_size=4)
    rows, summary = run_gsm8k_eval(tiny_model_dir, test, train, k_shot=2, **kw)
    assert built == ["hf"] and sum(fake.calls) == 12
    assert all(r["correct"] and not r["kshot_correct"] for r in rows)
    assert [r["prompt_hash"] for r in rows] == [sha256_text(p) for p in zero]
    assert summary["accuracy"] == 1.0 and summary["accuracy_kshot"] == 0.0
    rows0, summary0 = run_gsm8k_eval(tiny_model_dir, test, train, k_shot=0, **kw)
    assert not any(k.startswith("kshot_") for r in rows0 for k in r) and summary0["accuracy_kshot"] is None
    assert [r["correct"] for r in rows0] == [r["correct"] for r in rows]  # primary does not depend on k_shot
