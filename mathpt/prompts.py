"""Prompt templates for the two response styles mathpt ships.

- ``r1_zero``: CS336 assignment 5's R1-Zero prompt (text kept identical so numbers compare with that
  assignment); the model thinks inside ``<think> ... </think>`` and answers inside
  ``<answer> ... </answer>``. Generation stops at ``</answer>``, which is kept in the text.
- ``qwen_boxed``: the Qwen2.5-Math chat template with the "reason step by step ... \\boxed{}" system
  message; generation stops at ``<|im_end|>``.

A prompt is the exact text the model continues; a response is the exact text it should produce, so
``format_prompt(q, s) + format_response(r, a, s)`` is a complete training/eval sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mathpt.io import MathptError

STYLES: tuple[str, ...] = ("r1_zero", "qwen_boxed")

R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>.\nUser: {question}\nAssistant: <think>"
)

QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def check_style(style: str) -> str:
    """Return ``style`` if it is one we ship; otherwise raise MathptError naming the valid ones."""
    if style not in STYLES:
        raise MathptError(f"unknown prompt style {style!r}; valid styles: {', '.join(STYLES)}")
    return style


def _qwen_turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def format_prompt(question: str, style: str) -> str:
    """The text generation starts right after (ends in ``<think>`` or the assistant header)."""
    check_style(style)
    if style == "r1_zero":
        # str.replace, not str.format: the question may contain braces.
        return R1_ZERO_PROMPT.replace("{question}", question)
    return _qwen_turn("system", QWEN_SYSTEM) + _qwen_turn("user", question) + "<|im_start|>assistant\n"


def format_response(reasoning: str, answer: str, style: str) -> str:
    """A full response in ``style``: what a teacher or gold solution looks like after the prompt.

    Raises MathptError when ``answer`` would break the style's delimiters (so it could not be
    extracted again): ``<answer>``/``</answer>`` inside an r1_zero answer, unbalanced braces in a
    boxed one.
    """
    check_style(style)
    answer = str(answer)
    if style == "r1_zero":
        if "<answer>" in answer or "</answer>" in answer:
            raise MathptError(f"answer {answer[:80]!r} contains an <answer> tag")
        return f"{reasoning}</think> <answer>{answer}</answer>"
    depth = 0
    for ch in answer:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            break
    if depth != 0:
        raise MathptError(f"answer {answer[:80]!r} has unbalanced braces and cannot go inside \\boxed{{}}")
    return f"{reasoning}\nThe final answer is \\boxed{{{answer}}}."


def stop_strings(style: str) -> list[str]:
    """Strings that end generation in ``style`` (a fresh list each call)."""
    check_style(style)
    return ["</answer>"] if style == "r1_zero" else ["<|im_end|>"]


def _example_fields(ex: Mapping, i: int) -> tuple[str, str, str]:
    if not isinstance(ex, Mapping):
        raise MathptError(f"few-shot example {i}: expected a dict, got {type(ex).__name__}")
    missing = [k for k in ("question", "solution", "answer") if k not in ex]
    if missing:
        raise MathptError(f"few-shot example {i} (id={ex.get('id', '?')}): missing key(s) {missing}")
    return str(ex["question"]), str(ex["solution"]), str(ex["answer"])


def format_fewshot_prompt(question: str, examples: Sequence[Mapping], style: str) -> str:
    """A k-shot prompt: k worked examples in the style's response format, then ``question``.

    r1_zero: "prompt+response" blocks separated by blank lines, the target prompt last.
    qwen_boxed: one system message, then k user/assistant turns, then the target user turn and the
    assistant header. With no examples both reduce to ``format_prompt(question, style)``.
    """
    check_style(style)
    shots = [_example_fields(ex, i) for i, ex in enumerate(examples)]
    if style == "r1_zero":
        blocks = [format_prompt(q, style) + format_response(s, a, style) for q, s, a in shots]
        return "\n\n".join([*blocks, format_prompt(question, style)])
    turns = [_qwen_turn("system", QWEN_SYSTEM)]
    for q, s, a in shots:
        turns += [_qwen_turn("user", q), _qwen_turn("assistant", format_response(s, a, style))]
    return "".join(turns) + _qwen_turn("user", question) + "<|im_start|>assistant\n"
