"""mathpt.arith: synthetic GSM8K-format problems, checked by re-doing their arithmetic independently."""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

import pytest

from mathpt.arith import generate_arith
from mathpt.data import parse_gsm8k_answer
from mathpt.io import MathptError

ANNOTATION = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>")


@pytest.fixture(scope="module")
def problems():
    return generate_arith(n_train=1500, n_test=300, seed=7, max_steps=3)


def _check(row: dict, max_steps: int) -> int:
    """Re-evaluate every annotated step exactly; return the number of steps."""
    steps = ANNOTATION.findall(row["answer"])
    assert 1 <= len(steps) <= max_steps
    assert row["answer"].count("<<") == len(steps), row["answer"]
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    results, operands = [], []
    for a, op, b, c in steps:
        value = ops[op](Fraction(int(a)), Fraction(int(b)))
        assert value == int(c) and value >= 0, (a, op, b, c)
        results.append(int(c))
        operands += [int(a), int(b)]
    # The steps form a chain over the question's numbers: every number of the question is used once
    # and each intermediate result feeds exactly one later step.
    question_numbers = [int(x) for x in re.findall(r"\d+", row["question"])]
    assert Counter(operands) == Counter(question_numbers) + Counter(results[:-1]), row
    assert max(question_numbers) <= 100
    _, gold = parse_gsm8k_answer(row["answer"])
    assert int(gold) == results[-1]
    return len(steps)


def test_answers_are_correct(problems):
    lengths = Counter(_check(r, 3) for split in ("train", "test") for r in problems[split])
    assert set(lengths) == {1, 2, 3}


def test_deterministic_and_seeded(problems):
    assert generate_arith(n_train=1500, n_test=300, seed=7) == problems
    other = generate_arith(n_train=1500, n_test=300, seed=8)
    assert other["train"][:50] != problems["train"][:50]
    # Test does not depend on the train size.
    assert generate_arith(n_train=10, n_test=300, seed=7)["test"] == problems["test"]


def test_no_shared_questions(problems):
    train = [r["question"] for r in problems["train"]]
    test = [r["question"] for r in problems["test"]]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_templates_varied(problems):
    rows = problems["train"]
    # Replace numbers and the leading word (a name or "The") to get the sentence skeleton.
    first = Counter(re.sub(r"\d+", "N", r["question"].split(". ")[0].split(" ", 1)[1]) for r in rows)
    names = Counter(r["question"].split(" ", 1)[0] for r in rows)
    last = Counter(r["question"].rsplit(". ", 1)[-1] for r in rows)
    assert len(names) >= 20 and len(first) >= 50 and len(last) >= 50
    assert max(first.values()) < 0.1 * len(rows)
    ops = Counter(op for r in rows for _, op, _, _ in ANNOTATION.findall(r["answer"]))
    assert set(ops) == set("+-*/") and min(ops.values()) > 0.1 * sum(ops.values())


def test_max_steps(problems):
    rows = generate_arith(n_train=200, n_test=1, seed=1, max_steps=1)["train"]
    assert all(_check(r, 1) == 1 for r in rows)
    with pytest.raises(MathptError, match="max_steps"):
        generate_arith(1, 1, seed=0, max_steps=0)


@pytest.mark.parametrize("max_value", [20, 30, 57])
def test_max_value_caps_every_number(max_value):
    rows = generate_arith(n_train=400, n_test=100, seed=3, max_steps=3, max_value=max_value)
    for row in rows["train"] + rows["test"]:
        _check(row, 3)  # still exact, chained and parseable
        numbers = [int(x) for x in re.findall(r"\d+", row["question"] + row["answer"])]
        assert max(numbers) <= max_value, row


@pytest.mark.parametrize("bad", [19, 201, 30.0, None])
def test_max_value_rejects_bad_values(bad):
    with pytest.raises(MathptError, match="max_value"):
        generate_arith(1, 1, seed=0, max_value=bad)
