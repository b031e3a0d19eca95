"""The gold teacher: reference solutions rewritten into a prompt style's response format.

It needs no model, so SFT on gold traces is the baseline every sampled teacher is compared with
(and the only teacher the offline default can always run).
"""

from __future__ import annotations

from collections.abc import Iterable

from mathpt.io import DataError
from mathpt.prompts import check_style, format_prompt, format_response

ROW_KEYS = ("id", "question", "solution", "answer")


def gold_trace(row: dict, style: str) -> dict:
    """One data row -> one trace row (shared contract); teacher "gold", always correct."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise DataError(f"data row {row.get('id', '?')}: missing key(s) {missing}")
    return {
        "id": row["id"],
        "question": row["question"],
        "answer": row["answer"],
        "prompt": format_prompt(row["question"], style),
        "response": format_response(row["solution"], row["answer"], style),
        "teacher": "gold",
        "teacher_answer": row["answer"],
        "correct": True,
        "sample_index": 0,
    }


def gold_traces(rows: Iterable[dict], style: str) -> list[dict]:
    """Trace rows for every data row, in order."""
    check_style(style)
    return [gold_trace(row, style) for row in rows]
