"""Cleaning teacher output for SFT: the documented drop patterns, answer statements, grading."""

from __future__ import annotations

import json
import re

import pytest
from conftest import TRACE_KEYS
from hypothesis import given, settings
from hypothesis import strategies as st

from mathpt.rewards import get_reward_fn
from mathpt.teachers.cleaning import (
    PATTERNS,
    clean_reasoning,
    drop_instruction_lines,
    make_trace_row,
    normalize_answer,
    strip_answer_statement,
)

ROW = {"id": "train-00007", "question": "Tom has 3 bags of 6 apples. How many apples?", "answer": "18"}

# Shaped like DeepSeek-R1's final content on a GSM8K problem.
R1_CONTENT = """I need to find the total, and I'll put the final answer in a box as instructed.

**Step 1:** Tom has 3 bags.
**Step 2:** Each bag holds 6 apples, so \\( 3 \\times 6 = 18 \\).

So, Tom has $\\boxed{18}$ apples in total.

**Final Answer**
\\[
\\boxed{18}
\\]"""


@pytest.mark.parametrize(
    "pattern, example",
    [(p, e) for p in PATTERNS for e in p.examples],
    ids=lambda x: x.name if hasattr(x, "name") else x[:30],
)
def test_each_documented_example_is_dropped_under_its_pattern(pattern, example):
    kept, dropped = drop_instruction_lines(f"Tom has 3 bags.\n{example}\nSo 3 * 6 = 18.")
    assert kept == "Tom has 3 bags.\nSo 3 * 6 = 18."
    assert dropped == {pattern.name: 1}


def test_every_pattern_is_documented():
    assert len({p.name for p in PATTERNS}) == len(PATTERNS)
    assert all(p.targets and len(p.examples) >= 2 or p.name == "final_answer_heading" for p in PATTERNS)


def test_no_gsm8k_solution_or_question_line_is_touched(gsm8k_dir):
    """26k+ reference solution lines and every question sentence survive cleaning unchanged."""
    n = 0
    for split in ("train", "test"):
        for line in open(gsm8k_dir / f"{split}.jsonl"):
            r = json.loads(line)
            sol = re.sub(r"<<[^>]*>>", "", r["answer"].rpartition("####")[0])
            for text in [*re.split(r"(?<=[.?!])\s+", r["question"]), *sol.splitlines()]:
                if not text.strip():
                    continue
                n += 1
                kept, dropped = drop_instruction_lines(text)
                assert not dropped and kept == text, text
                assert strip_answer_statement(text) == text, text
    assert n > 30_000


def test_r1_like_content_is_cleaned_to_the_math():
    reasoning, dropped = clean_reasoning(R1_CONTENT)
    assert reasoning == (
        "**Step 1:** Tom has 3 bags.\n"
        "**Step 2:** Each bag holds 6 apples, so \\( 3 \\times 6 = 18 \\).\n\n"
        "So, Tom has $18$ apples in total."
    )
    assert dropped == {"answer_format_talk": 1}  # "**Final Answer**" goes with the answer statement


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 * 6 = 18.\nThe final answer is $\\boxed{18}$.", "3 * 6 = 18."),
        ("3 * 6 = 18.\n\\boxed{18}", "3 * 6 = 18."),
        ("3 * 6 = 18.\n**Answer:** \\boxed{18}", "3 * 6 = 18."),
        ("So the total is \\boxed{18} apples.", "So the total is 18 apples."),
        ("It is \\boxed{\\frac{1}{2}} of them.", "It is \\frac{1}{2} of them."),
        ("3 * 6 = 18\n#### 18", "3 * 6 = 18"),
        ("3 * 6 = 18</think> <answer>18</answer>", "3 * 6 = 18</think> "),
        ("Final answer: 18", ""),
        ("The answer is 18 because 3 * 6 = 18.", "The answer is 18 because 3 * 6 = 18."),
    ],
)
def test_strip_answer_statement(text, expected):
    assert strip_answer_statement(text) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("$1,000", "1000"),
        ("\\$18.00", "18.00"),
        ("18.", "18"),
        ("\\text{18 apples}", "18 apples"),
        (" 12,345,678 ", "12345678"),
        ("\\(3/4\\)", "3/4"),
        ("1,5", "1,5"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("style", ["r1_zero", "qwen_boxed"])
def test_correct_trace_is_canonical_and_passes_the_style_reward(style):
    content = R1_CONTENT.replace("\\boxed{18}", "\\boxed{\\$18.00}")  # right, but spelled differently
    trace, _ = make_trace_row(ROW, style, "api:r1", 2, content, reasoning_content="long thoughts")
    assert set(trace) == TRACE_KEYS
    assert trace["teacher_answer"] == "\\$18.00" and trace["correct"] is True and trace["sample_index"] == 2
    assert get_reward_fn(style)(trace["response"], "18") == {
        "reward": 1.0,
        "format_reward": 1.0,
        "answer_reward": 1.0,
    }
    final = trace["response"].rsplit("\n", 1)[-1]  # the answer the style's format carries: gold spelling
    assert final in (
        "So, Tom has $\\$18.00$ apples in total.</think> <answer>18</answer>",
        "The final answer is \\boxed{18}.",
    )
    assert "long thoughts" not in trace["response"]
    assert "box" not in trace["response"].replace("\\boxed{18}", "")


@pytest.mark.parametrize("style", ["r1_zero", "qwen_boxed"])
def test_wrong_and_missing_answers(style):
    wrong, _ = make_trace_row(ROW, style, "t", 0, "3 + 6 = 9.\nThe final answer is \\boxed{9}.")
    assert wrong["teacher_answer"] == "9" and wrong["correct"] is False
    assert get_reward_fn(style)(wrong["response"], "18")["answer_reward"] == 0.0
    assert wrong["response"].endswith(("<answer>9</answer>", "\\boxed{9}."))
    # Truncated chain of thought: no committed answer, even though its last number equals the gold.
    cut, _ = make_trace_row(ROW, style, "t", 0, "Each bag has 6, and 3 bags make 18")
    assert cut["teacher_answer"] is None and cut["correct"] is False
    assert get_reward_fn(style)(cut["response"], "18")["answer_reward"] == 0.0


@pytest.mark.parametrize("style", ["r1_zero", "qwen_boxed"])
@pytest.mark.parametrize("source", ["content", "reasoning_content", "both"])
def test_truncated_completion_is_never_correct(style, source):
    """R1 hit max_tokens: finish_reason "length"; the answer in its reasoning is recorded, never trusted."""
    for content in ("", "3 bags of 6 make 18.\nThe final answer is \\boxed{18}."):
        trace, _ = make_trace_row(
            ROW,
            style,
            "api:r1",
            0,
            content,
            reasoning_content="3 x 6 = \\boxed{18}",
            reasoning_source=source,
            finish_reason="length",
        )
        assert trace["correct"] is False and trace["reject_reason"] == "truncated"
        assert trace["finish_reason"] == "length" and trace["teacher_answer"] == "18"


@pytest.mark.parametrize("style", ["r1_zero", "qwen_boxed"])
def test_empty_or_answer_only_completion_is_never_correct(style):
    """An empty content (its answer read from reasoning_content) or a bare box gives an answer-only SFT text."""
    for content in ("", "   \n", "\\boxed{18}", "**Final Answer**\n\\[ \\boxed{18} \\]"):
        trace, _ = make_trace_row(ROW, style, "api:r1", 0, content, reasoning_content="so it is \\boxed{18}")
        assert trace["correct"] is False and trace["reject_reason"] == "empty", content
        assert trace["finish_reason"] == "stop"
    ok, _ = make_trace_row(ROW, style, "api:r1", 0, R1_CONTENT, finish_reason="stop")
    assert ok["correct"] is True and ok["reject_reason"] is None


def test_answer_falls_back_to_reasoning_content():
    trace, _ = make_trace_row(
        ROW,
        "qwen_boxed",
        "t",
        0,
        "",
        reasoning_content="3 bags of 6 make \\boxed{18}.",
        reasoning_source="reasoning_content",
    )
    assert trace["correct"] is True
    assert trace["response"] == "3 bags of 6 make 18.\nThe final answer is \\boxed{18}."


_SPECIAL = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "<|im_end|>",
        "<|im_start|>",
        "\\boxed{7}",
        "\\boxed{",
        "}",
        "{",
        "\n",
        "$",
        "#### 3",
        "Final Answer",
        " ",
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    parts=st.lists(st.one_of(st.text(max_size=12), _SPECIAL), max_size=25),
    gold=st.integers(0, 10**6).map(str),
    style=st.sampled_from(["r1_zero", "qwen_boxed"]),
)
def test_any_content_ending_in_the_gold_box_grades_right_and_keeps_the_format(parts, gold, style):
    """Whatever junk precedes it, a trace whose content commits to the gold answer is correct and
    its response scores reward 1 under the style's own reward function (markup never leaks in)."""
    content = "".join(parts) + f"\nThe final answer is \\boxed{{{gold}}}."
    row = {**ROW, "answer": gold}
    trace, _ = make_trace_row(row, style, "t", 0, content)
    if "<answer>" in content[: content.rfind("\\boxed")] and trace["teacher_answer"] != gold:
        return  # the teacher committed to something else inside answer tags: a wrong trace, fine
    if trace["reject_reason"] == "empty":  # the junk cleaned away to nothing: an answer-only trace
        assert trace["correct"] is False and clean_reasoning(content)[0] == ""
        return
    assert trace["correct"] is True
    assert get_reward_fn(style)(trace["response"], gold)["reward"] == 1.0
    body = trace["response"].rsplit("</think>", 1)[0] if style == "r1_zero" else trace["response"]
    assert "<think>" not in body and "<answer>" not in body.rsplit("\\boxed", 1)[0]
