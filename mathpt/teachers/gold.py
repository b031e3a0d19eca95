"""The gold teacher: reference solutions rewritten into a prompt style's response format.

It needs no model, so SFT on gold traces is the baseline every sampled teacher is compared with
(and the only teacher the offline default can always run).

``unformatted_fraction`` imitates a teacher that follows the requested answer format only part of
the time (API teachers drift like this): about that share of traces ends with ``The final answer is
N.`` instead of the style's answer format. The reasoning and the number are right, but the reward
scores such a response 0, so SFT learns a habit that only the reward can correct: the quick start
(config/config.yaml) and config/arith.yaml use it to show policy-gradient training learning from the
reward.

Which traces: all those of a set of answers (distinct answers in the order of a hash, taken until
they cover the fraction of rows), so the habit is tied to the problem and a model can learn it
exactly. Picking rows by a hash of their id instead gave every answer both endings about equally
often: SFT then learned a coin flip, and greedy decoding followed whichever ending tiny numeric
differences favoured (format rates of 0.06 to 0.96 for the same config across runs, issue 20).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable

from mathpt.io import DataError, MathptError
from mathpt.prompts import check_style, format_prompt, format_response

ROW_KEYS = ("id", "question", "solution", "answer")


def _unit_hash(key: str) -> float:
    """A uniform number in [0, 1) fixed by ``key`` (the same choice on every run)."""
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "big") / 2**64


def unformatted_answers(rows: list[dict], fraction: float) -> set[str]:
    """The answers whose traces drop the format: distinct answers in hash order, each taken while
    the rows covered stay nearest to ``fraction`` of all rows."""
    counts = Counter(str(r["answer"]) for r in rows)
    chosen: set[str] = set()
    covered = 0
    for answer in sorted(counts, key=_unit_hash):
        if covered + counts[answer] / 2 > fraction * len(rows):
            break
        chosen.add(answer)
        covered += counts[answer]
    return chosen


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
    rows = list(rows)
    missing = next((r.get("id", "?") for r in rows if "answer" not in r), None)
    if missing is not None:
        raise DataError(f"data row {missing}: missing key(s) ['answer']")
    plain = unformatted_answers(rows, unformatted_fraction) if unformatted_fraction > 0 else set()
    return [gold_trace(row, style, str(row["answer"]) in plain) for row in rows]
