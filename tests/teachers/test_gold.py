"""mathpt.teachers.gold: reference solutions as trace rows in each prompt style."""

from __future__ import annotations

import pytest
from conftest import TRACE_KEYS

from mathpt.data import parse_gsm8k_answer
from mathpt.io import DataError, MathptError
from mathpt.prompts import format_prompt
from mathpt.rewards import get_reward_fn
from mathpt.teachers.gold import gold_traces


@pytest.fixture(scope="module")
def rows(gsm8k_train_rows):
    out = []
    for i, raw in enumerate(gsm8k_train_rows[:200]):
        solution, gold = parse_gsm8k_answer(raw["answer"])
        out.append(
            {"id": f"train-{i:05d}", "question": raw["question"], "solution": solution, "answer": gold}
        )
    return out


@pytest.mark.parametrize("style", ["r1_zero", "qwen_boxed"])
def test_gold_traces_follow_contract_and_earn_full_reward(rows, style):
    traces = gold_traces(rows, style)
    reward_fn = get_reward_fn(style)
    assert len(traces) == len(rows)
    for row, t in zip(rows, traces, strict=True):
        assert set(t) == TRACE_KEYS
        assert (t["id"], t["question"], t["answer"]) == (row["id"], row["question"], row["answer"])
        assert t["prompt"] == format_prompt(row["question"], style)
        assert t["response"].startswith(row["solution"])
        assert (t["teacher"], t["teacher_answer"], t["correct"], t["sample_index"]) == (
            "gold",
            row["answer"],
            True,
            0,
        )
        # Graded by the rewards module, the gold response is well formed and correct.
        assert reward_fn(t["response"], row["answer"]) == {
            "reward": 1.0,
            "format_reward": 1.0,
            "answer_reward": 1.0,
        }


def test_gold_bad_input(rows):
    with pytest.raises(MathptError, match="style"):
        gold_traces(rows[:1], "chatml")
    with pytest.raises(DataError, match="train-00000.*solution"):
        gold_traces([{"id": "train-00000", "question": "q", "answer": "1"}], "r1_zero")


@pytest.mark.parametrize("style", ["r1_zero", "qwen_boxed"])
def test_unformatted_fraction(rows, style):
    """That share of traces (by id, stable across runs) keeps the reasoning and the number but drops
    the answer format, so the reward scores it 0; the rest are untouched."""
    reward_fn = get_reward_fn(style)
    plain = gold_traces(rows, style)
    mixed = gold_traces(rows, style, unformatted_fraction=0.5)
    assert gold_traces(rows, style, unformatted_fraction=0.5) == mixed
    off = [t for t in mixed if not t["correct"]]
    assert 0.35 * len(rows) < len(off) < 0.65 * len(rows)
    for p, m, row in zip(plain, mixed, rows, strict=True):
        assert set(m) == TRACE_KEYS and m["prompt"] == p["prompt"]
        if m["correct"]:
            assert m == p
        else:
            assert m["response"].startswith(row["solution"]) and m["response"].endswith(
                f"is {row['answer']}."
            )
            assert reward_fn(m["response"], row["answer"])["reward"] == 0.0
    assert all(not t["correct"] for t in gold_traces(rows, style, unformatted_fraction=1.0))
    assert gold_traces(rows, style, unformatted_fraction=0.0) == plain


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_unformatted_fraction_rejects_bad_values(rows, bad):
    with pytest.raises(MathptError, match="unformatted_fraction"):
        gold_traces(rows, "qwen_boxed", unformatted_fraction=bad)


def test_unformatted_fraction_is_gold_only(tmp_path, rows):
    from mathpt.teachers.dispatch import generate_traces

    with pytest.raises(MathptError, match="only the gold teacher"):
        generate_traces(
            {"kind": "api", "model": "m", "base_url": "http://127.0.0.1:9/v1", "unformatted_fraction": 0.5},
            rows,
            "qwen_boxed",
            tmp_path / "t.jsonl",
            tmp_path,
        )
