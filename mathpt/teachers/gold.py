"""The gold teacher: reference solutions rewritten into a prompt style's response format.

It needs no model, so SFT on gold traces is the baseline every sampled teacher is compared with
(and the only teacher the offline default can always run).

``unformatted_fraction`` imitates a teacher that follows the requested answer format only part of
the time (API teachers drift like this): that share of traces, picked by a hash of the row id, ends
with ``The final answer is N.`` instead of the style's answer format. The reasoning and the number
are right, but the reward scores such a response 0, so SFT learns a habit that only the reward can
correct: the quick start (config/config.yaml) and config/arith.yaml use it to show policy-gradient
training learning from the reward.

Near 0.5 SFT learns a coin flip between the two endings, and greedy decoding then follows whichever
one tiny numeric differences favour: the same config gave SFT format rates from 0.06 to 0.96 across
runs (issue 20). The shipped configs use 0.7, so greedy SFT reliably ends in plain words.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from mathpt.io import DataError, MathptError
from mathpt.prompts import check_style, format_prompt, format_response

ROW_KEYS = ("id", "question", "solution", "answer")


def _unit_hash(row_id: str) -> float:
    """A uniform number in [0, 1) fixed by the row id (the same rows are picked on every run)."""
    return int.from_bytes(hashlib.sha256(str(row_id).encode()).digest()[:8], "big") / 2**64


def gold_trace(row: dict, style: str, unformatted: bool = False) -> dict:
    """One data row -> one trace row (shared contract); teacher "gold", always right in substance.

    ``unformatted``: state the answer in plain words instead of the style's format (scored 0).
    """
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise DataError(f"data row {row.get('id', '?')}: missing key(s) {missing}")
    trace = {
        "id": row["id"],
        "question": row["question"],
        "answer": row["answer"],
        "prompt": format_prompt(row["question"], style),
        "response": format_response(row["solution"], row["answer"], style),
        "teacher": "gold",
        "teacher_answer": row["answer"],
        "correct": True,
        "sample_index": 0,
        "finish_reason": "stop",  # the same keys as a sampled teacher's rows (mathpt.teachers.cleaning)
        "reject_reason": None,
    }
    if unformatted:
        trace.update(
            response=f"{row['solution']}\nThe final answer is {row['answer']}.",
            teacher_answer=None,
            correct=False,
        )
    return trace


def gold_traces(rows: Iterable[dict], style: str, unformatted_fraction: float = 0.0) -> list[dict]:
    """Trace rows for every data row, in order; ``unformatted_fraction`` of them without the format."""
    check_style(style)
    if (
        isinstance(unformatted_fraction, bool)
        or not isinstance(unformatted_fraction, int | float)
        or not 0.0 <= unformatted_fraction <= 1.0
    ):
        raise MathptError(
            f"config key 'teacher.unformatted_fraction': must be a number in [0, 1], "
            f"got {unformatted_fraction!r}"
        )
    return [gold_trace(row, style, _unit_hash(row.get("id", "")) < unformatted_fraction) for row in rows]
