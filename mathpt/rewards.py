"""GSM8K answer extraction, answer equivalence and the reward functions of the two prompt styles.

Reward semantics follow CS336 assignment 5's ``drgrpo_grader``:
- ``r1_zero_reward_fn``: formatted iff the response contains ``"</think> <answer>"`` and
  ``"</answer>"``; the answer is the text after the last ``<answer>`` with ``</answer>`` removed
  (the content of its ``\\boxed{}`` if it has one); unformatted responses score all zeros.
- ``qwen_boxed_reward_fn`` (CS336's ``question_only_reward_fn``): formatted iff the last ``\\boxed``
  has a non-empty, brace-balanced argument, which is the answer.
``reward == answer_reward`` in both: the format reward is reported, never paid on its own.

Grading is exact rational arithmetic (``fractions.Fraction``) on a normalized number, so
``18.00 == 18``, ``$1,000 == 1000``, ``3/4 == 0.75``, ``50% == 50``, ``50% == 0.5`` (but ``1800%``
is not 18), and an equation states its right-hand side only if it is true (``x = 18`` and
``2 + 16 = 18`` answer 18, ``20 = 18`` answers nothing). math-verify is only a fallback
for answers that are not a plain number (``\\sqrt{324}``, ``6 \\times 3``), and only for short
arithmetic expressions (``_mv_safe``: no words, exponents, factorials or deep nesting). Its own
timeouts are off (they use ``signal.alarm``, which raises in worker threads and would make a grade
depend on machine load), so that input guard is what bounds its run time.

Robustness: every function here is pure (no global state, safe in threads and processes), never
raises on any string, and runs in linear time: anchors are found with ``str.rfind``, forward scans
are capped, regexes are only run on short or capped text and have no nested quantifiers, and a
number with more than ``MAX_DIGITS`` digits is refused before it is converted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

from mathpt.prompts import check_style

MAX_SCAN_CHARS = 20_000  # regex fallbacks look only at this many trailing characters
MAX_ANSWER_CHARS = 200  # longer "answers" are not numbers we grade
MAX_BOXED_CHARS = 1_000  # a \boxed{...} argument must close within this many characters
MAX_DIGITS = 100  # refuse numbers longer than this (Fraction/int conversion is super-linear)
MV_MAX_CHARS = 60  # math-verify fallback: input length, digit and nesting caps (see _mv_safe)
MV_MAX_DIGITS = 30
MV_MAX_DEPTH = 3

RewardDict = dict[str, float]
RewardFn = Callable[[str, str], RewardDict]

# A number as written in a solution: optional sign, optional $, thousands groups, decimals, an
# optional "/denominator" and percent. Every quantifier is over a disjoint class or a fixed-width
# group, so matching is linear.
_NUM = (
    r"[-\u2212]?[ ]?\\?\$?[ ]?(?:[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?|\.[0-9]+)"
    r"(?:[ ]?/[ ]?[0-9]+(?:\.[0-9]+)?)?(?:[ ]?\\?%)?"
)
_FRAC = r"[-\u2212]?\\[dt]?frac\{[^{}]{1,50}\}\{[^{}]{1,50}\}"
_TOKEN = re.compile(f"{_FRAC}|{_NUM}")
_LEADING_TOKEN = re.compile(r"[\s:*$=]{0,10}(" + f"{_FRAC}|{_NUM}" + ")")
_ANSWER_IS = re.compile(r"answer\s{0,3}(?:is\b|:|=)", re.IGNORECASE)

# The whole normalized answer as one number: sign, digits (with optional thousands groups and
# decimals) and an optional denominator, then a unit-like remainder (letters, no digits/operators).
_NUMBER = re.compile(
    r"(?P<sign>[-+]?)[ ]?\$?[ ]?"
    r"(?:\\frac\{[ ]?(?P<fnum>[-+]?[0-9]+(?:\.[0-9]+)?)[ ]?\}\{[ ]?(?P<fden>[-+]?[0-9]+(?:\.[0-9]+)?)[ ]?\}"
    r"|(?P<int>[0-9]+(?:,[0-9]{3})*|[0-9]*)(?:\.(?P<dec>[0-9]+))?"
    r"(?:[ ]?/[ ]?(?P<den>[0-9]+(?:\.[0-9]+)?))?)"
    r"(?P<rest>.*)",
    re.DOTALL,
)
_UNIT_REST = re.compile(r"[A-Za-z\s.,'\u2019%$\u20ac\u00a3\u00a5-]*")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{([^{}]*)\}")
_LATEX_CMD = re.compile(r"\\([A-Za-z]+)")
_MV_CHARS = re.compile(r"[0-9\s+\-*/()\[\]{}.@]*")
_JUXTAPOSED = re.compile(r"[0-9.]\s+[0-9.]")
_MV_COMMANDS = frozenset({"frac", "dfrac", "tfrac", "sqrt", "cdot", "times", "div", "pi", "left", "right"})


def _result(format_reward: float, answer_reward: float) -> RewardDict:
    # reward pays the answer only; CS336 returns the same three keys.
    return {"reward": answer_reward, "format_reward": format_reward, "answer_reward": answer_reward}


def last_boxed(text: str) -> str | None:
    """The argument of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 18``) in ``text``.

    Nested braces are matched; None when there is no box, its braces do not balance within
    ``MAX_BOXED_CHARS``, or it is empty. Only the last box counts (CS336 semantics).
    """
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = i + (6 if text.startswith("\\boxed", i) else 5)
    if text.startswith(" ", j):  # "\boxed 18": up to the next space or $
        m = re.match(r"[ ]{1,5}([^\s$]{1,200})", text[j : j + 210])
        return m.group(1) if m else None
    if not text.startswith("{", j):
        return None
    depth = 0
    end = min(len(text), j + MAX_BOXED_CHARS)
    for k in range(j, end):
        c = text[k]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                inner = strip_outer_braces(text[j + 1 : k])
                return inner or None
    return None


def strip_outer_braces(s: str) -> str:
    """``{18}`` / ``{{18}}`` / `` { 18 } `` -> ``18``: drop brace pairs that wrap the whole string.

    A model that writes ``\\boxed{{18}}`` (doubled braces, e.g. copied from a Python format string)
    means 18. Only a pair whose opening brace closes at the very end is removed, so ``{1}{2}`` stays.
    """
    s = s.strip()
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _closing_brace(s) == len(s) - 1:
        s = s[1:-1].strip()
    return s


def _closing_brace(s: str) -> int:
    """Index of the brace that closes ``s[0] == "{"``, or -1 if it never closes."""
    depth = 0
    for k, c in enumerate(s):
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return k
    return -1


def _clean_token(tok: str) -> str:
    tok = tok.replace("\u2212", "-").replace("\\$", "").replace("$", "").replace("\\%", "%")
    return tok.replace(" ", "")


def _leading_token(span: str) -> str | None:
    m = _LEADING_TOKEN.match(span)
    return _clean_token(m.group(1)) if m else None


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007 - only the last match is wanted
        pass
    return last


def _line_after(text: str, start: int) -> str:
    """Up to MAX_ANSWER_CHARS characters of the line starting at ``start``."""
    piece = text[start : start + MAX_ANSWER_CHARS]
    return piece.split("\n", 1)[0]


def extract_final_answer(response: str, *, last_number_fallback: bool = True) -> str | None:
    """The final answer a response commits to, as a string, or None.

    In order: the content of the last closed ``<answer>...</answer>`` (its ``\\boxed{}`` if any),
    the last ``\\boxed{...}``, the number after the last ``####``, the number after the last
    "answer is"/"answer:", and (if ``last_number_fallback``) the last number in the text.
    """
    if not isinstance(response, str) or not response:
        return None
    i = response.rfind("<answer>")
    if i >= 0:
        j = response.find("</answer>", i)
        if j >= 0:
            content = response[i + len("<answer>") : j]
            if "\\boxed" in content or "\\fbox" in content:
                return last_boxed(content)
            content = content.strip()
            if len(content) <= MAX_ANSWER_CHARS:
                return content or None
            return extract_final_answer(content[-MAX_SCAN_CHARS:], last_number_fallback=last_number_fallback)
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    i = response.rfind("####")
    if i >= 0:
        tok = _leading_token(_line_after(response, i + 4))
        if tok is not None:
            return tok
    tail = response[-MAX_SCAN_CHARS:]
    anchor = _last_match(_ANSWER_IS, tail)
    if anchor is not None:
        tok = _leading_token(_line_after(tail, anchor.end()))
        if tok is not None:
            return tok
    if last_number_fallback:
        found = _last_match(_TOKEN, tail)
        if found is not None:
            return _clean_token(found.group(0))
    return None


def _normalize(s: str) -> str:
    """Strip LaTeX/markdown decoration that does not change an answer's value."""
    s = strip_outer_braces(s)
    if "\\boxed" in s or "\\fbox" in s:
        s = last_boxed(s) or ""
    for a, b in (
        ("\\!", ""), ("\\,", ""), ("\\;", ""), ("{,}", ","), ("\\%", "%"), ("\\$", "$"),
        ("\u2212", "-"), ("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""), ("^\\circ", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""),
    ):  # fmt: skip
        s = s.replace(a, b)
    s = _TEXT_CMD.sub(r" \1 ", s)
    if "=" in s:  # "x = 18" -> "18"; "20 = 18" -> "" (a false equation states no answer)
        *lhs, s = s.split("=")
        if not all(_side_agrees(side, s) for side in lhs):
            return ""
    s = s.strip().strip("$*").strip()  # math delimiters, markdown bold
    while s.endswith("."):
        s = s[:-1].rstrip()
    return s


_ARITH_OPS = (
    ("\\times", "*"),
    ("\\cdot", "*"),
    ("\u00d7", "*"),
    ("\u00b7", "*"),
    ("\\div", "/"),
    ("\u00f7", "/"),
)
_ARITH = re.compile(r"[0-9.+\-*/() ]{1,60}")
_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3})")


def _arith_value(s: str) -> Fraction | None:
    """The exact value of a short arithmetic expression of decimals (+ - * / parentheses), else None."""
    import ast

    for a, b in _ARITH_OPS:
        s = s.replace(a, b)
    s = _THOUSANDS.sub("", s.replace("$", "").replace("\\", "")).strip()
    if not s or not _ARITH.fullmatch(s) or sum(c.isdigit() for c in s) > MV_MAX_DIGITS:
        return None
    try:
        tree = ast.parse(s, mode="eval").body
    except (SyntaxError, ValueError):
        return None

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(ast.get_source_segment(s, node) or str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            return a * b if isinstance(node.op, ast.Mult) else a / b
        raise ValueError("not arithmetic")

    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError, TypeError):
        return None


def _side_agrees(side: str, rhs: str) -> bool:
    """Whether the left side ``side`` of ``side = rhs`` is consistent with it: a label ("x", "total")
    or an expression that is not plain arithmetic always is; arithmetic must have rhs's value."""
    left = _arith_value(side)
    if left is None:
        return True
    right = _arith_value(rhs)
    if right is None:
        parsed = parse_number(rhs)
        right = parsed[0] if parsed is not None and not parsed[1] else None
    return right is not None and left == right


def _decimal(int_part: str, dec_part: str | None) -> Fraction:
    if dec_part:
        return Fraction(int(int_part or "0") * 10 ** len(dec_part) + int(dec_part), 10 ** len(dec_part))
    return Fraction(int(int_part))


def _plain_decimal(s: str) -> Fraction | None:
    m = re.fullmatch(r"([-+]?)([0-9]*)(?:\.([0-9]+))?", s)
    if not m or not (m.group(2) or m.group(3)):
        return None
    v = _decimal(m.group(2), m.group(3))
    return -v if m.group(1) == "-" else v


def parse_number(answer: str) -> tuple[Fraction, bool] | None:
    """``(value, has_percent)`` if ``answer`` is one number (units and decoration allowed), else None.

    Refuses (None) answers longer than MAX_ANSWER_CHARS and numbers with more than MAX_DIGITS digits.
    """
    if not isinstance(answer, str) or len(answer) > MAX_ANSWER_CHARS:
        return None
    s = _normalize(answer)
    m = _NUMBER.match(s)
    if m is None:
        return None
    rest = m.group("rest")
    if not _UNIT_REST.fullmatch(rest):
        return None
    percent = "%" in rest or "percent" in rest.lower()
    if sum(c.isdigit() for c in s) > MAX_DIGITS:
        return None
    if m.group("fnum") is not None:
        num, den = _plain_decimal(m.group("fnum")), _plain_decimal(m.group("fden"))
    else:
        int_part, dec = m.group("int"), m.group("dec")
        if not int_part and not dec:
            return None
        num = _decimal(int_part.replace(",", ""), dec)
        den = _plain_decimal(m.group("den")) if m.group("den") else Fraction(1)
    if num is None or den is None or den == 0:
        return None
    value = num / den
    return (-value if m.group("sign") == "-" else value), percent


def _numbers_equal(pred: tuple[Fraction, bool], gold: tuple[Fraction, bool]) -> bool:
    """Same value; or one side in percent and the other the same number without the sign (GSM8K
    writes percentages so) or the same proportion (50% = 0.5, only for |proportion| <= 1: 1800% is
    not 18, the change of unit is read as a wrong answer)."""
    (pv, pp), (gv, gp) = pred, gold
    if pv == gv:
        return True
    if pp != gp:
        pct, other = (pv, gv) if pp else (gv, pv)
        return abs(other) <= 1 and pct / 100 == other
    return False


def _mv_safe(s: str) -> bool:
    """Whether ``s`` is one small arithmetic expression, safe for an un-timed math-verify call.

    Only digits, + - * / ( ) [ ] { } . and the LaTeX commands in _MV_COMMANDS; every brace group
    is a command argument; brackets nest at most MV_MAX_DEPTH deep. This keeps out what hangs or
    fools sympy/latex2sympy: exponent towers and factorials (9^{9^{9}}), deeply nested braces
    (parse time grows exponentially), words and juxtaposed numbers or groups, which math-verify
    reads leniently ("The answer is 18 or 20" -> 18, "18 20" -> 38, "{1}{1}...{1}" -> a sum).
    """
    if len(s) > MV_MAX_CHARS or sum(c.isdigit() for c in s) > MV_MAX_DIGITS:
        return False
    cmds = _LATEX_CMD.findall(s)
    if not all(c in _MV_COMMANDS for c in cmds):
        return False
    if s.count("{") != sum(2 if c.endswith("frac") else c == "sqrt" for c in cmds):
        return False
    depth = 0
    for c in s:
        depth += (c in "([{") - (c in ")]}")
        if not 0 <= depth <= MV_MAX_DEPTH:
            return False
    bare = _LATEX_CMD.sub("@", s)
    return depth == 0 and bool(_MV_CHARS.fullmatch(bare)) and not _JUXTAPOSED.search(bare)


def _math_verify_equal(pred: str, gold: str) -> bool:
    if not (_mv_safe(pred) and _mv_safe(gold)):
        return False
    try:
        from math_verify import parse, verify

        def _parse(s: str):
            # Wrapped in $...$ so the whole string is read as one LaTeX expression, not searched
            # for its first number ("18 or 20" must not grade as 18).
            return parse(s if "$" in s else f"${s}$", parsing_timeout=None)

        g, p = _parse(gold), _parse(pred)
        return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))
    except Exception:  # a grader must never take down a training step
        return False


def is_equivalent(pred: str | None, gold: str | None) -> bool:
    """Whether ``pred`` states the same answer as ``gold``.

    Both numeric: exact rational comparison after normalization (thousands separators, ``$``,
    units, trailing periods, fractions, ``\\frac``, percent, ``x = ...``). Otherwise: equal after
    normalization and case folding, or (short, safe inputs only) math-verify's ``verify(gold, pred)``.
    """
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    p, g = parse_number(pred), parse_number(gold)
    if p is not None and g is not None:
        return _numbers_equal(p, g)
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return pred.strip() == gold.strip() and bool(pred.strip())
    pn, gn = _normalize(pred), _normalize(gold)
    if not pn or not gn:
        return False
    if " ".join(pn.casefold().split()) == " ".join(gn.casefold().split()):
        return True
    return _math_verify_equal(pn, gn)


def r1_zero_reward_fn(response: str, ground_truth: str) -> RewardDict:
    """CS336's r1_zero reward: strict ``</think> <answer>...</answer>`` format, then the answer."""
    if not isinstance(response, str):
        return _result(0.0, 0.0)
    if "</think> <answer>" in response and "</answer>" in response:
        model_answer = response.rpartition("<answer>")[2].replace("</answer>", "")
        if "\\boxed" in model_answer:
            model_answer = last_boxed(model_answer)
            if model_answer is None:
                return _result(1.0, 0.0)
        return _result(1.0, float(is_equivalent(model_answer, str(ground_truth))))
    return _result(0.0, 0.0)


def qwen_boxed_reward_fn(response: str, ground_truth: str) -> RewardDict:
    """Qwen ``\\boxed{}`` CoT reward (CS336 ``question_only_reward_fn``): the last box is the answer."""
    if not isinstance(response, str):
        return _result(0.0, 0.0)
    answer = last_boxed(response)
    if answer is None:
        return _result(0.0, 0.0)
    return _result(1.0, float(is_equivalent(answer, str(ground_truth))))


def answer_correct_any_format(response: str, ground_truth: str) -> bool:
    """Whether the response's final answer is right, whatever its format (the format rate's complement).

    The answer is ``extract_final_answer`` with its last-number fallback (an answer tag, the last box,
    ``####``, "the answer is", else the last number), so a model that learned the arithmetic but not
    the style's answer format still scores here; comparing this with the reward's ``answer_reward``
    shows how much of a gain is only format.
    """
    if not isinstance(response, str):
        return False
    return is_equivalent(extract_final_answer(response), str(ground_truth))


_REWARD_FNS: dict[str, RewardFn] = {"r1_zero": r1_zero_reward_fn, "qwen_boxed": qwen_boxed_reward_fn}


def get_reward_fn(style: str) -> RewardFn:
    """The reward function of a prompt style (a module-level function, so it pickles)."""
    return _REWARD_FNS[check_style(style)]
