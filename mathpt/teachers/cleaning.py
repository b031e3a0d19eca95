"""Turn a teacher's raw output into an SFT trace in the chosen prompt style.

A teacher answers our instruction ("reason step by step, put the final answer in \\boxed{}"), and
reasoning models talk about that instruction: "I will output the answer in a box", "The user wants
me to show my reasoning". A student fine-tuned on such lines learns to chatter about a format it is
never asked for, so they are dropped. Each pattern below has a name (counted in the summary), the
kind of line it targets and examples it must catch; ``tests/teachers/test_cleaning.py`` checks every example
and checks that ordinary solution lines survive.

Then the teacher's own answer statement (``\\boxed{18}``, "**Final Answer**", ``<answer>18</answer>``,
``#### 18``) is removed from the reasoning, because ``mathpt.prompts.format_response`` writes the
answer back in the style's own format. The answer is taken from the raw text *before* any cleaning,
graded against the gold answer with ``mathpt.rewards``, and recorded per row (``teacher_answer``,
``correct``). When the teacher is right, the response carries the gold answer's spelling (equivalent
by the grader, e.g. ``18`` for ``\\$18.00``) so SFT targets are canonical; when it is wrong, a lightly
normalized form of the teacher's answer.

Which text SFT learns (``teacher.reasoning_source``): by default the teacher's final ``content``,
i.e. for DeepSeek-R1 its written-up step-by-step solution, not the chain of thought in
``reasoning_content``. The reference R1 distillation pipeline trains on the chain of thought
(``reasoning_content``, thousands of tokens of "wait, let me check"); a 1.5B student with a
2,048-token budget learns more from the short solution, so ``content`` is the default and
``reasoning_content`` / ``both`` are the opt-ins for a student large enough to imitate the search.

Truncated or empty completions are never ``correct`` (``reject_reason``). When R1 hits
``max_tokens`` (which counts its reasoning too) ``content`` comes back empty or cut off with
``finish_reason: length``; the answer can still be read from ``reasoning_content`` and is recorded
as ``teacher_answer``, but the SFT text built from the content would be answer-only, so such a row
is rejected as ``truncated``. A completion whose SFT text is blank once cleaned (an empty content
under the default source, or a content that is nothing but the answer) is rejected as ``empty``. Every row records its ``finish_reason``;
the traces summary counts both kinds of rejection.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from mathpt.io import MathptError

_I = re.IGNORECASE


@dataclass(frozen=True)
class LinePattern:
    name: str
    regex: re.Pattern
    targets: str
    examples: tuple[str, ...]


def _p(name: str, regex: str, targets: str, *examples: str) -> LinePattern:
    return LinePattern(name, re.compile(regex, _I), targets, examples)


_META = r"(?:\bi\b|\bi'll\b|\bi'm\b|\bwe\b|\bwe'll\b|\blet me\b|\blet's\b|\bi need\b|\bi should\b|\bmake sure\b|\bremember\b|\bdon't forget\b)"
_FORMAT_WORD = (
    r"(?:\\boxed|\bbox(?:ed)?\b|<answer>|\banswer tags?\b|\bformat(?:ted|ting)?\b|\bANSWER\b|\blatex\b)"
)

# Applied line by line; a line matching any pattern is dropped whole.
PATTERNS: tuple[LinePattern, ...] = (
    _p(
        "answer_format_talk",
        rf"{_META}.*\b(?:output|put|write|present|format|box|enclose|wrap|give|provide|state|place|display)\s+"
        rf"(?:the\s+|my\s+|our\s+|your\s+)?(?:final\s+)?answer\b|{_META}.*\banswer\b.*{_FORMAT_WORD}",
        "the teacher announcing how it will present its answer",
        "I will output ANSWER: 18 at the end.",
        "I'll put the final answer in a box as instructed.",
        "Let me make sure to present the final answer within \\boxed{}.",
        "We need to write the answer in the required format.",
    ),
    _p(
        "instruction_echo",
        r"\breason(?:ing)? step[- ]by[- ]step\b|\bshow (?:your|my|the) (?:reasoning|work|steps)\b"
        r"|\bput (?:the|your|my) final answer\b|^\W*as (?:instructed|requested)\b"
        r"|\bas (?:the )?(?:user|prompt|question) (?:asked|asks|requested|instructed|wants)\b"
        rf"|^(?=.*{_META}).*\b(?:following|follow|per|according to) (?:the|your|these|my) instructions?\b"
        r"|\b(?:the )?user (?:wants|asked|asks|is asking|requests|wants me)\b|\bthe prompt (?:says|asks)\b"
        r"|\b(?:they|you) want(?:s|ed)? (?:me )?to (?:show|see|reason|put|box)\b",
        "lines repeating or discussing the instruction we sent",
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "Okay, so the user wants me to solve this and show my reasoning.",
        "As instructed, here is the solution.",
        "Following the instructions, I'll explain each step.",
    ),
    _p(
        "output_format_talk",
        r"\b(?:output|response|answer) format\b|\bin the (?:required|requested|specified|correct|following|right|proper) format\b"
        r"|\bformat(?:ting)? (?:the|my|your) (?:final )?(?:answer|response|output)\b|\banswer tags?\b|</?answer>\s*tags?\b",
        "lines about formatting rather than the problem",
        "The output format should be a single number.",
        "Formatting the final answer now.",
        "I should wrap it in answer tags.",
    ),
    _p(
        "final_answer_heading",
        r"^\W*(?:final answer|answer|solution|step-by-step (?:solution|explanation))\W*$",
        "bare headings ('**Final Answer**', 'Answer:') left over once the answer itself is moved",
        "**Final Answer**",
        "### Final Answer:",
        "Answer:",
    ),
)

# Style markup that must not appear inside a reasoning (it would end or corrupt the style's format).
_MARKUP = re.compile(
    r"</?think>|</?answer>|<\|im_start\|>(?:assistant|user|system)?\n?|<\|im_end\|>|<\|endoftext\|>", _I
)
_ANSWER_TAGS = re.compile(r"<answer>.*?(?:</answer>|$)", re.DOTALL | _I)
_HASH_ANSWER = re.compile(r"^\s*####.*$", re.MULTILINE)
# A line that states the answer: "The final answer is $\boxed{18}$.", "\[ \boxed{18} \]", "Final answer: 18".
_ANSWER_LINE = re.compile(
    r"^\W*(?:so,?\s*|therefore,?\s*|thus,?\s*|hence,?\s*)?(?:the\s+)?final\s+answer\b.*$", _I
)
_LEFTOVER = re.compile(
    r"^[\s$\\\[\]().,:;*_]*(?:so|thus|therefore|hence|the answer is|answer:?)?[\s$\\\[\]().,:;*_]*$", _I
)


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every ``\\boxed{...}`` with balanced braces."""
    out = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += (text[i] == "{") - (text[i] == "}")
            i += 1
        if depth == 0:
            out.append((m.start(), i, text[m.end() : i - 1]))
    return out


def drop_instruction_lines(text: str) -> tuple[str, Counter]:
    """Remove every line matching a pattern in ``PATTERNS``; count drops per pattern name."""
    kept, dropped = [], Counter()
    for line in text.splitlines():
        hit = next((p.name for p in PATTERNS if p.regex.search(line)), None)
        if hit is None:
            kept.append(line)
        else:
            dropped[hit] += 1
    return "\n".join(kept), dropped


def strip_answer_statement(text: str) -> str:
    """Remove the teacher's own answer statement; inline ``\\boxed{x}`` inside a sentence becomes ``x``."""
    text = _ANSWER_TAGS.sub("", text)
    text = _HASH_ANSWER.sub("", text)
    lines = []
    for line in text.splitlines():
        if _ANSWER_LINE.match(line):
            continue
        spans = _boxed_spans(line)
        if spans:
            for start, end, inner in reversed(spans):
                line = line[:start] + inner + line[end:]
            bare = line
            for _, _, inner in spans:
                bare = bare.replace(inner, "", 1)
            if _LEFTOVER.match(bare):  # the line was only the boxed answer (plus "So", "$", "\[" ...)
                continue
        lines.append(line)
    # Display-math delimiters left empty once the boxed answer inside them is gone.
    return re.sub(r"\\\[\s*\\\]|\$\$\s*\$\$", "", "\n".join(lines))


def strip_markup(text: str) -> str:
    return _MARKUP.sub("", text)


def clean_reasoning(text: str) -> tuple[str, Counter]:
    """Markup, answer statement and instruction/format chatter out; blank runs collapsed."""
    text = strip_markup(strip_answer_statement(text))
    text, dropped = drop_instruction_lines(text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip(), dropped


def normalize_answer(answer: str) -> str:
    """Light, grader-independent normalization of a free-form answer for writing it back.

    Drops ``$`` / ``\\$`` / ``\\(``, ``\\text{}`` wrappers, thousands separators and a trailing period;
    the grader, not this function, decides correctness.
    """
    a = answer.strip()
    a = re.sub(r"\\text\{([^{}]*)\}", r"\1", a)
    a = re.sub(r"\\[(),\[\]!]|\\\$|\$", "", a)
    a = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", a)
    return a.strip().rstrip(".").strip()


def _grade(teacher_answer: str | None, gold: str) -> bool:
    if teacher_answer is None:
        return False
    from mathpt.rewards import is_equivalent

    return bool(is_equivalent(teacher_answer, gold))


def extract_answer(text: str) -> str | None:
    from mathpt.rewards import extract_final_answer

    # No last-number fallback: a trace counts only if the teacher committed to an answer (a truncated
    # chain of thought whose last number happens to equal the gold must not pass rejection sampling).
    return extract_final_answer(text, last_number_fallback=False)


REASONING_SOURCES = ("content", "reasoning_content", "both")


def make_trace_row(
    row: dict,
    style: str,
    teacher: str,
    sample_index: int,
    content: str,
    reasoning_content: str | None = None,
    reasoning_source: str = "content",
    finish_reason: str = "stop",
) -> tuple[dict, Counter]:
    """A trace row (shared contract) from one completion, plus per-pattern drop counts.

    ``content`` is the final output (where the answer is read from, falling back to
    ``reasoning_content`` if the content has none). ``reasoning_source`` chooses what becomes the
    response's reasoning: the final ``content`` (default: R1's step-by-step solution, short enough
    for a small student), the ``reasoning_content`` chain of thought, or ``both`` in that order.
    ``finish_reason`` is the API's or engine's ("stop", "length", ...): "length" means truncated,
    and a truncated or empty completion is never ``correct`` (``reject_reason`` says which).
    """
    from mathpt.prompts import format_prompt, format_response

    if reasoning_source not in REASONING_SOURCES:
        raise MathptError(
            f"config key 'teacher.reasoning_source': {reasoning_source!r} is not one of {REASONING_SOURCES}"
        )
    content = content or ""
    teacher_answer = extract_answer(content) if content.strip() else None
    if teacher_answer is None and reasoning_content:
        teacher_answer = extract_answer(reasoning_content)
    if reasoning_source == "content" or not reasoning_content:
        raw = content
    elif reasoning_source == "reasoning_content":
        raw = reasoning_content
    else:
        raw = reasoning_content + "\n\n" + content
    reasoning, dropped = clean_reasoning(raw)
    if finish_reason == "length":
        reject = "truncated"
    elif not reasoning:  # nothing left to learn from but the answer
        reject = "empty"
    else:
        reject = None
    correct = reject is None and _grade(teacher_answer, row["answer"])
    answer = row["answer"] if correct else normalize_answer(teacher_answer or "")
    try:
        response = format_response(reasoning, answer, style)
    except MathptError:  # e.g. unbalanced braces in a wrong answer: keep the row, without that answer
        response = format_response(reasoning, "", style)
    trace = {
        "id": row["id"],
        "question": row["question"],
        "answer": row["answer"],
        "prompt": format_prompt(row["question"], style),
        "response": response,
        "teacher": teacher,
        "teacher_answer": teacher_answer,
        "correct": correct,
        "sample_index": sample_index,
        "finish_reason": finish_reason,
        "reject_reason": reject,
    }
    return trace, dropped
