"""Prompt templates: exact CS336 r1_zero text, Qwen chat turns, few-shot layout, style errors."""

from __future__ import annotations

import pytest

from mathpt.io import MathptError
from mathpt.prompts import (
    STYLES,
    format_fewshot_prompt,
    format_prompt,
    format_response,
    stop_strings,
)

# The spec text (CS336 assignment 5, cs336_alignment/prompts/r1_zero.prompt).
CS336_R1_ZERO = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with the "
    "answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>.\nUser: {question}\nAssistant: <think>"
)

EXAMPLES = [
    {"id": "train-00001", "question": "What is 2+3?", "solution": "2+3 is 5.", "answer": "5"},
    {"id": "train-00002", "question": "Half of {10}?", "solution": "10/2 = 5.", "answer": "5"},
    {"id": "train-00003", "question": "What is 7*6?", "solution": "7*6 = 42.", "answer": "42"},
]


def test_r1_zero_prompt_is_cs336_text():
    q = "Natalia sold clips to {48} friends. How many?"
    assert format_prompt(q, "r1_zero") == CS336_R1_ZERO.replace("{question}", q)


def test_qwen_boxed_prompt_layout():
    p = format_prompt("What is 1+1?", "qwen_boxed")
    assert p.startswith(
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert "<|im_start|>user\nWhat is 1+1?<|im_end|>\n" in p
    assert p.endswith("<|im_start|>assistant\n")
    assert p.count("<|im_start|>") == 3 and p.count("<|im_end|>") == 2


def test_responses_and_stop_strings():
    r = format_response("Add them.", "18", "r1_zero")
    assert r == "Add them.</think> <answer>18</answer>"
    # Generation stops at </answer> and keeps it, so a stopped response ends with the stop string.
    assert r.endswith(stop_strings("r1_zero")[0])
    q = format_response("Add them.", "18", "qwen_boxed")
    assert q == "Add them.\nThe final answer is \\boxed{18}."
    assert stop_strings("qwen_boxed") == ["<|im_end|>"]
    s = stop_strings("r1_zero")
    s.append("x")
    assert stop_strings("r1_zero") == ["</answer>"]  # callers get a fresh list


@pytest.mark.parametrize("style", STYLES)
def test_zero_shot_equals_plain_prompt(style):
    assert format_fewshot_prompt("Q?", [], style) == format_prompt("Q?", style)


def test_fewshot_r1_zero_blocks():
    p = format_fewshot_prompt("Final question?", EXAMPLES, "r1_zero")
    blocks = p.split("\n\n")
    assert len(blocks) == len(EXAMPLES) + 1
    for block, ex in zip(blocks, EXAMPLES, strict=False):
        assert block == format_prompt(ex["question"], "r1_zero") + format_response(
            ex["solution"], ex["answer"], "r1_zero"
        )
    assert blocks[-1] == format_prompt("Final question?", "r1_zero")
    assert p.endswith("Assistant: <think>")


def test_fewshot_qwen_boxed_turns():
    p = format_fewshot_prompt("Final question?", EXAMPLES, "qwen_boxed")
    assert p.count("<|im_start|>system") == 1
    assert p.count("<|im_start|>user\n") == len(EXAMPLES) + 1
    assert p.count("<|im_start|>assistant\n") == len(EXAMPLES) + 1
    # Examples in order, each answered in the boxed response format, the target question last.
    pos = [p.index(f"<|im_start|>user\n{ex['question']}<|im_end|>") for ex in EXAMPLES]
    assert pos == sorted(pos)
    for ex in EXAMPLES:
        turn = (
            "<|im_start|>assistant\n"
            + format_response(ex["solution"], ex["answer"], "qwen_boxed")
            + "<|im_end|>\n"
        )
        assert turn in p
    assert p.endswith("<|im_start|>user\nFinal question?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "call",
    [
        lambda: format_prompt("q", "chatml"),
        lambda: format_response("r", "1", "R1_ZERO"),
        lambda: stop_strings(""),
        lambda: format_fewshot_prompt("q", [], "boxed"),
    ],
)
def test_unknown_style_names_valid_styles(call):
    with pytest.raises(MathptError, match="r1_zero, qwen_boxed"):
        call()


def test_bad_examples_and_answers_raise():
    with pytest.raises(MathptError, match=r"example 1 \(id=train-9\).*'answer'"):
        format_fewshot_prompt(
            "q", [EXAMPLES[0], {"id": "train-9", "question": "q", "solution": "s"}], "r1_zero"
        )
    with pytest.raises(MathptError, match="example 0"):
        format_fewshot_prompt("q", ["not a dict"], "qwen_boxed")
    with pytest.raises(MathptError, match="unbalanced"):
        format_response("r", "{1", "qwen_boxed")
    with pytest.raises(MathptError, match="<answer>"):
        format_response("r", "1</answer>", "r1_zero")
