"""Answer extraction, equivalence and reward functions: tables, adversarial inputs, properties."""

from __future__ import annotations

import multiprocessing
import pickle
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mathpt.io import MathptError
from mathpt.prompts import STYLES, format_prompt, format_response
from mathpt.rewards import (
    extract_final_answer,
    get_reward_fn,
    is_equivalent,
    last_boxed,
    parse_number,
    qwen_boxed_reward_fn,
    r1_zero_reward_fn,
)

# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so the total is \\boxed{18}.", "18"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last box, nested braces
        ("x = \\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 42$.", "42"),
        ("\\boxed{18", "18"),  # unbalanced box: falls through to the last number
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("#### 1,000\n", "1,000"),
        ("#### $18.50", "18.50"),
        ("The answer is 18.", "18"),
        ("So the final answer is: -7 apples", "-7"),
        ("**Answer:** 3/4", "3/4"),
        ("The answer is \u22123.", "-3"),
        ("I think 3 + 4 = 7, so 7 cookies.", "7"),
        ("He pays $1,250.75 in total.", "1,250.75"),
        ("no numbers here", None),
        ("", None),
        ("<think>12 + 6</think> <answer> 18 </answer>", "18"),
        ("<think>\\boxed{3}</think> <answer>\\boxed{18}</answer>", "18"),
        ("<think>x</think> <answer>\\boxed{18</answer>", None),
        ("<answer>5</answer> and later \\boxed{6}", "5"),  # the answer tag wins over a box
        ("The answer is clear: 5 + 7 = 12", "12"),  # anchor without a number -> last number
    ],
)
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


def test_last_number_fallback_is_configurable():
    assert extract_final_answer("3 + 4 = 7") == "7"
    assert extract_final_answer("3 + 4 = 7", last_number_fallback=False) is None
    assert extract_final_answer("#### 7", last_number_fallback=False) == "7"
    assert extract_final_answer("\\boxed{18", last_number_fallback=False) is None


def test_last_boxed_empty_and_long():
    assert last_boxed("\\boxed{}") is None
    assert last_boxed("\\boxed{ }") is None
    assert last_boxed("\\boxed{" + "1" * 5000 + "}") is None  # does not close within the cap
    assert last_boxed("\\boxed{{a}{b}}") == "{a}{b}"


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("18", "18", True),
        ("18.00", "18", True),
        ("18.", "18", True),
        ("1,000", "1000", True),
        ("$1,000", "1000", True),
        ("\\$1{,}000.00", "1000", True),
        ("1,000,000", "1000000", True),
        ("18 apples", "18", True),
        ("\\text{18 dollars}", "18", True),
        ("18 \\text{ cm}", "18", True),
        ("x = 18", "18", True),
        ("3/4", "0.75", True),
        ("\\frac{3}{4}", "0.75", True),
        ("\\dfrac{3}{4}", "3/4", True),
        ("-\\frac{3}{4}", "-0.75", True),
        ("\\frac{-3}{4}", "-3/4", True),
        ("-5", "-5", True),
        ("\u22125", "-5", True),
        ("-5", "5", False),
        ("+5", "5", True),
        (".5", "0.5", True),
        ("50%", "50", True),
        ("50\\%", "50", True),
        ("50 percent", "50", True),
        ("50%", "0.5", True),
        ("0.5", "50", False),
        ("17", "18", False),
        ("18.000001", "18", False),
        ("1/3", "0.333333", False),
        ("1/0", "0", False),
        ("\\boxed{18}", "18", True),
        ("\\sqrt{324}", "18", True),  # math-verify fallback
        ("6 \\times 3", "18", True),
        ("\\sqrt{18}", "18", False),
        ("18 or 20", "18", False),
        ("18, 20", "18", False),
        ("$18$ or $20$", "18", False),
        ("9^{9^{9}}", "18", False),  # refused before sympy can try to evaluate it
        ("100000!", "18", False),
        ("The answer is 18 or 20", "18", False),  # math-verify alone would read 18
        ("18 20", "38", False),  # ... and 38
        ("{1}" * 18, "18", False),  # ... and a sum
        ("1+1+1+1+1+1+1+1+1+9", "18", True),  # an arithmetic expression is a value
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{12}}{4}", True),
        ("Monday", "monday", True),
        ("Monday", "Tuesday", False),
        ("", "18", False),
        (None, "18", False),
        ("18", None, False),
        ("1" + "0" * 150, "1" + "0" * 150, True),  # too long to parse, but the same string
        ("1" + "0" * 150, "1" + "0" * 149 + "1", False),
    ],
)
def test_is_equivalent(pred, gold, expected):
    assert is_equivalent(pred, gold) is expected
    assert is_equivalent(gold, pred) is expected  # symmetric on these cases


def test_parse_number_refuses_huge_numbers():
    assert parse_number("9" * 100) == (Fraction(10**100 - 1), False)
    assert parse_number("9" * 101) is None
    assert parse_number("9" * 10_000) is None


# ---------------------------------------------------------------- reward dicts


def _r(fmt, ans):
    return {"reward": ans, "format_reward": fmt, "answer_reward": ans}


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("2 + 16 = 18 </think> <answer>18</answer>", "18", _r(1.0, 1.0)),
        ("2 + 16 = 18 </think> <answer> $18.00 </answer>", "18", _r(1.0, 1.0)),
        ("... </think> <answer>\\boxed{18}</answer>", "18", _r(1.0, 1.0)),
        ("... </think> <answer>17</answer>", "18", _r(1.0, 0.0)),
        ("... </think> <answer>\\boxed{18</answer>", "18", _r(1.0, 0.0)),
        ("... </think> <answer>The answer is 18</answer>", "18", _r(1.0, 0.0)),  # CS336: strict content
        ("... </think>\n<answer>18</answer>", "18", _r(0.0, 0.0)),  # needs exactly "</think> <answer>"
        ("... </think> <answer>18", "18", _r(0.0, 0.0)),  # truncated before </answer>
        ("\\boxed{18}", "18", _r(0.0, 0.0)),
        ("", "18", _r(0.0, 0.0)),
    ],
)
def test_r1_zero_reward(response, gold, expected):
    assert r1_zero_reward_fn(response, gold) == expected
    assert get_reward_fn("r1_zero")(response, gold) == expected


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("16 + 2 = 18.\nThe final answer is \\boxed{18}.", "18", _r(1.0, 1.0)),
        ("\\boxed{17} no wait \\boxed{1,000}", "1000", _r(1.0, 1.0)),
        ("The final answer is \\boxed{17}.", "18", _r(1.0, 0.0)),
        ("The final answer is \\boxed{}.", "18", _r(0.0, 0.0)),
        ("The final answer is \\boxed{18", "18", _r(0.0, 0.0)),
        ("The final answer is 18.", "18", _r(0.0, 0.0)),
        ("</think> <answer>18</answer>", "18", _r(0.0, 0.0)),
    ],
)
def test_qwen_boxed_reward(response, gold, expected):
    assert qwen_boxed_reward_fn(response, gold) == expected
    assert get_reward_fn("qwen_boxed")(response, gold) == expected


def test_get_reward_fn_unknown_style():
    with pytest.raises(MathptError, match="r1_zero, qwen_boxed"):
        get_reward_fn("boxed")


def test_gold_solutions_score_one(gsm8k_train_rows):
    """Real GSM8K: the '#### N' line extracts, and gold solutions in either style earn reward 1."""
    for row in gsm8k_train_rows[:300]:
        solution, _, tail = row["answer"].rpartition("####")
        gold = tail.strip().replace(",", "")
        assert is_equivalent(extract_final_answer(row["answer"]), gold), row["answer"]
        for style in STYLES:
            fn = get_reward_fn(style)
            response = format_response(solution.strip(), gold, style)
            assert fn(response, gold)["reward"] == 1.0
            assert fn(response, str(int(gold) + 1))["answer_reward"] == 0.0


# ---------------------------------------------------------------- adversarial inputs

_M = 1_000_000
ADVERSARIAL = {
    "empty": "",
    "open_boxes": "\\boxed{" * (_M // 7),
    "open_braces": "</think> <answer>\\boxed{" + "{" * _M + "</answer>",
    "close_braces": "}" * _M,
    "digits": "9" * _M,
    "digits_10k_answer": "</think> <answer>" + "9" * 10_000 + "</answer>",
    "digits_10k_boxed": "\\boxed{" + "9" * 10_000 + "}",
    "comma_groups": "1," * (_M // 2),
    "thousand_groups": "1" + ",000" * (_M // 4) + ",0",
    "dots": "1." * (_M // 2),
    "space_then_slash": "1" + " " * _M + "x/",
    "answer_tags": "<answer>" * (_M // 8) + "</think> <answer>" + "5" * 5000 + "</answer>",
    "answer_is": "The answer is " * (_M // 14),
    "hashes": "#### " * (_M // 5),
    "text_cmds": "\\text{" * (_M // 6),
    "fracs": "\\frac{1}{" * (_M // 9),
    "dollars": "$" * _M,
    "minus": "-" * _M,
    "percent": "1 %" * (_M // 3),
    "mixed": ("</think> <answer>1,000.5/2 \\boxed{{} answer is " * (_M // 50)),
    "unicode": "\u0661\u0662\u00bd\u2212" * (_M // 4),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_inputs_are_fast_and_safe(name):
    s = ADVERSARIAL[name]
    t0 = time.perf_counter()
    extracted = extract_final_answer(s)
    for fn in (r1_zero_reward_fn, qwen_boxed_reward_fn):
        for gold in ("18", s[:64], "\\sqrt{2}"):
            out = fn(s, gold)
            assert set(out) == {"reward", "format_reward", "answer_reward"}
            assert all(v in (0.0, 1.0) for v in out.values())
    is_equivalent(extracted, "18")
    is_equivalent(s, s[:64])
    is_equivalent(s[-100:], "\\frac{1}{2}")
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "expr",
    [
        "{" * 20 + "1" + "}" * 20,  # latex2sympy parse time is exponential in brace depth
        "(" * 30 + "1" + ")" * 30,
        "\\sqrt{" * 12 + "2" + "}" * 12,
        "{{{" + "{1}" * 18 + "}}}",
        "\\frac{\\frac{\\frac{1}{2}}{3}}{4}" * 2,
        "[[[1]]]" * 8,
        "9^{9^{9}}",
        "10!!",
        "\\sqrt{2}+\\sqrt{3}+\\sqrt{5}+\\sqrt{7}+\\sqrt{11}",
    ],
)
def test_math_verify_fallback_is_bounded(expr):
    is_equivalent("\\sqrt{4}", "2")  # import math-verify/sympy outside the timed part
    t0 = time.perf_counter()
    for gold in ("18", "\\sqrt{2}", expr):
        r1_zero_reward_fn(f"x</think> <answer>{expr}</answer>", gold)
    assert time.perf_counter() - t0 < 1.0


def test_non_string_inputs():
    assert r1_zero_reward_fn(None, "18") == _r(0.0, 0.0)  # type: ignore[arg-type]
    assert qwen_boxed_reward_fn(b"\\boxed{18}", "18") == _r(0.0, 0.0)  # type: ignore[arg-type]
    assert qwen_boxed_reward_fn("\\boxed{18}", 18)["reward"] == 1.0  # type: ignore[arg-type]
    assert extract_final_answer(None) is None  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("0123456789.,/-+$%{}\\ boxedfrac<>answer:thinkis#=\n")), max_size=300
    )
)
def test_fuzz_never_raises(s):
    for fn in (r1_zero_reward_fn, qwen_boxed_reward_fn):
        out = fn(s, "18")
        assert out["reward"] == out["answer_reward"] and out["format_reward"] in (0.0, 1.0)
        assert out["answer_reward"] <= out["format_reward"]
    is_equivalent(extract_final_answer(s), "18")


# ---------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(10**40), max_value=10**40))
def test_thousands_separators(x):
    assert is_equivalent(str(x), f"{x:,}")
    assert is_equivalent(f"{x:,}", str(x))
    assert not is_equivalent(f"{x + 1:,}", str(x))


def _decimal_str(n: int, k: int) -> str:
    return f"{Decimal(n).scaleb(-k):f}"


_decimals = st.tuples(st.integers(-(10**9), 10**9), st.integers(0, 6))


@settings(max_examples=300, deadline=None)
@given(a=_decimals, b=_decimals, same=st.booleans(), decor=st.integers(0, 4))
def test_equivalence_matches_float64_reference(a, b, same, decor):
    """Decimals with <= 15 significant digits: exact equality <=> float64 equality."""
    sa = _decimal_str(*a)
    sb = _decimal_str(*a) if same else _decimal_str(*b)
    d = Decimal(sb)
    shown = [sb, sb + "000" if "." in sb else sb + ".000", f"{d:,f}", f"${d:,f}" if d >= 0 else f"-${-d:,f}",
             sb + " dollars."][decor]  # fmt: skip
    assert is_equivalent(shown, sa) == (float(sb) == float(sa))


@settings(max_examples=200, deadline=None)
@given(p=st.integers(-(10**6), 10**6), q=st.integers(1, 10**6))
def test_fractions_match_float64_reference(p, q):
    """p/q against its decimal value when that terminates (float64 division is correctly rounded)."""
    x = Fraction(p, q)
    den = x.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den == 1:  # terminating decimal: write it out exactly
        k = 0
        while (x * 10**k).denominator != 1:
            k += 1
        dec = _decimal_str(int(x * 10**k), k)
        assert is_equivalent(f"{p}/{q}", dec) == (float(p) / float(q) == float(dec))
    assert is_equivalent(f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}")
    assert not is_equivalent(f"{p}/{q}", f"{p + 1}/{q}")


_reasoning = st.text(alphabet=st.sampled_from(list("abcxyz 0123456789+-*/=.,\n")), max_size=120)


def _answer_forms(draw) -> tuple[str, str, str]:
    """(answer as the model writes it, gold as GSM8K would, a wrong gold)."""
    kind = draw(st.sampled_from(["int", "comma", "decimal", "fraction", "latex_fraction"]))
    if kind in ("int", "comma"):
        x = draw(st.integers(-(10**12), 10**12))
        return (f"{x:,}" if kind == "comma" else str(x)), str(x), str(x + 1)
    if kind == "decimal":
        n, k = draw(_decimals)
        return _decimal_str(n, k), _decimal_str(n, k), _decimal_str(n + 1, k)
    x = Fraction(draw(st.integers(-1000, 1000)), draw(st.integers(1, 1000)))
    sign = "-" if x < 0 else ""
    ans = f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}" if kind == "latex_fraction" else str(x)
    return ans, str(x), str(x + 1)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), reasoning=_reasoning, style=st.sampled_from(STYLES))
def test_format_then_extract_round_trips(data, reasoning, style):
    ans, gold, wrong = _answer_forms(data.draw)
    response = format_response(reasoning, ans, style)
    fn = get_reward_fn(style)
    assert fn(response, gold) == _r(1.0, 1.0)
    assert fn(response, wrong) == _r(1.0, 0.0)
    assert is_equivalent(extract_final_answer(response), gold)
    assert is_equivalent(extract_final_answer(format_prompt("q?", style) + response), gold)


# ---------------------------------------------------------------- concurrency

_CONCURRENT_CASES = [
    ("x</think> <answer>\\sqrt{324}</answer>", "18"),  # math-verify path
    ("x</think> <answer>6 \\times 3</answer>", "18"),
    ("x</think> <answer>18.0</answer>", "18"),
    ("x</think> <answer>19</answer>", "18"),
    ("x</think> <answer>\\frac{1}{2}</answer>", "0.5"),
] * 8


def test_rewards_in_worker_threads():
    """math-verify's signal-based timeouts would raise off the main thread; ours are disabled."""
    serial = [r1_zero_reward_fn(r, g) for r, g in _CONCURRENT_CASES]
    assert [s["reward"] for s in serial[:5]] == [1.0, 1.0, 1.0, 0.0, 1.0]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda rg: r1_zero_reward_fn(*rg), _CONCURRENT_CASES))
    assert threaded == serial


def test_rewards_pickle_and_run_in_a_process():
    for style in STYLES:
        assert pickle.loads(pickle.dumps(get_reward_fn(style))) is get_reward_fn(style)
    responses, golds = zip(*_CONCURRENT_CASES[:5], strict=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        out = list(pool.map(r1_zero_reward_fn, responses, golds))
    assert out == [r1_zero_reward_fn(r, g) for r, g in zip(responses, golds, strict=True)]


# ---------------------------------------------------------------- brace variants (issue 14 item 9)


@pytest.mark.parametrize(
    "response, extracted",
    [
        ("The final answer is \\boxed{{18}}.", "18"),  # doubled braces (a Python format string leaked)
        ("\\boxed{{{18}}}", "18"),
        ("\\boxed{ {18} }", "18"),
        ("\\boxed{{ 18 }}", "18"),
        ("\\boxed{{\\frac{3}{4}}}", "\\frac{3}{4}"),
        ("\\boxed{{1}{2}}", "{1}{2}"),  # two groups side by side: not one wrapping pair
        ("\\boxed{{}}", None),  # empty once the wrapping pair is gone
    ],
)
def test_last_boxed_strips_wrapping_braces(response, extracted):
    assert last_boxed(response) == extracted


@pytest.mark.parametrize(
    "answer, gold, same",
    [
        ("{18}", "18", True),
        ("{{18}}", "18", True),
        ("{\\$18.00}", "18", True),
        ("{{1,000}}", "1000", True),
        ("{\\frac{3}{4}}", "0.75", True),
        ("{1}{8}", "18", False),  # juxtaposed groups are not the number 18
        ("{17}", "18", False),
    ],
)
def test_equivalent_with_wrapping_braces(answer, gold, same):
    assert is_equivalent(answer, gold) is same


@pytest.mark.parametrize(
    "style, response",
    [
        ("qwen_boxed", "2 + 16 = 18.\nThe final answer is \\boxed{{18}}."),
        ("qwen_boxed", "The final answer is $\\boxed{{{18}}}$."),
        ("r1_zero", "16 + 2 = 18 </think> <answer>\\boxed{{18}}</answer>"),
        ("r1_zero", "16 + 2 = 18 </think> <answer>{18}</answer>"),
        ("r1_zero", "16 + 2 = 18 </think> <answer> {{18}} </answer>"),
    ],
)
def test_doubled_braces_graded_right(style, response):
    assert get_reward_fn(style)(response, "18") == _r(1.0, 1.0)
    assert get_reward_fn(style)(response, "17") == _r(1.0, 0.0)


@pytest.mark.parametrize(
    "response, gold, right",
    [
        ("16 + 2 = 18. The final answer is 18.", "18", True),  # no box: the reward says 0, this says 1
        ("16 + 2 = 18", "18", True),  # last number
        ("The final answer is \\boxed{18}.", "18", True),
        ("... </think> <answer>18</answer>", "18", True),
        ("The final answer is 17.", "18", False),
        ("", "18", False),
    ],
)
def test_answer_correct_any_format(response, gold, right):
    from mathpt.rewards import answer_correct_any_format

    assert answer_correct_any_format(response, gold) is right
    if right:  # never stricter than the reward
        assert (
            answer_correct_any_format(response, gold) >= get_reward_fn("qwen_boxed")(response, gold)["reward"]
        )


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("20 = 18", "18", False),  # a false equation states no answer (issue 27.8)
        ("18 = 20", "20", False),
        ("20 - 3 = 18", "18", False),
        ("6 \\times 3 = 19", "19", False),
        ("x = 18", "18", True),  # a label on the left
        ("total = $18", "18", True),
        ("2 + 16 = 18", "18", True),  # a true equation
        ("6 \\times 3 = 18", "18", True),
        ("36 / 2 = 18", "18", True),
        ("$1,800 = 1800", "1800", True),
        ("0.5 = 1/2", "0.5", True),
        ("-3 = -3", "-3", True),
        ("1800%", "18", False),  # a change of unit is not the answer
        ("1800%", "1800", True),  # GSM8K writes percentages without the sign
        ("50%", "0.5", True),  # a proportion
        ("25%", "0.25", True),
        ("0.18", "18%", True),
        ("18", "1800%", False),
        ("$18", "18", True),  # currency
        ("$1,000", "1000", True),  # thousands separators
        ("1,000", "1", False),
        ("-5", "-5", True),  # negative numbers
        ("-5", "5", False),
        ("3/4", "0.75", True),  # fractions and decimals equal in value
        ("\\frac{3}{4}", "0.75", True),
        ("18.00", "18", True),
        ("18 cm", "18", True),
    ],
)
def test_false_equations_and_changes_of_unit_are_not_right(pred, gold, expected):
    assert is_equivalent(pred, gold) is expected
    assert r1_zero_reward_fn(f"x </think> <answer>{pred}</answer>", gold)["answer_reward"] == float(expected)
