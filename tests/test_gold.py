"""mathpt.teachers.gold: reference solutions as trace rows in each prompt style."""

from __future__ import annotations

import pytest

from mathpt.data import parse_gsm8k_answer
from mathpt.io import DataError, MathptError
from mathpt.prompts import format_prompt
from mathpt.rewards import get_reward_fn
from mathpt.teachers.gold import gold_traces

TRACE_KEYS = {"id", "question", "answer", "prompt", "response", "teacher", "teacher_answer", "correct", "sample_index"}


@pytest.fixture(scope="module")
def rows(gsm8k_train_rows):
    out = []
    for i, raw in enumerate(gsm8k_train_rows[:200]):
        solution, gold = parse_gsm8k_answer(raw["answer"])
        out.append({"id": f"train-{i:05d}", "question": raw["question"], "solution": solution, "answer": gold})
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
        assert (t["teacher"], t["teacher_answer"], t["correct"], t["sample_index"]) == ("gold", row["answer"], True, 0)
        # Graded by the rewards module, the gold response is well formed and correct.
        assert reward_fn(t["response"], row["answer"]) == {"reward": 1.0, "format_reward": 1.0, "answer_reward": 1.0}


def test_gold_bad_input(rows):
    with pytest.raises(MathptError, match="style"):
        gold_traces(rows[:1], "chatml")
    with pytest.raises(DataError, match="train-00000.*solution"):
        gold_traces([{"id": "train-00000", "question": "q", "answer": "1"}], "r1_zero")
