"""Synthetic GSM8K-format word problems: 1 to ``max_steps`` arithmetic steps on small numbers.

A tiny model cannot learn real GSM8K, so the embedded default trains on these instead: each problem
follows one quantity (a person's objects, a person's money, a shop's stock) through a chain of
additions, subtractions, multiplications and exact divisions, phrased with varied names, objects,
verbs and question forms. The gold solution is written like GSM8K's, with ``<<a+b=c>>``
calculator annotations and a final ``#### N`` line, so the rest of the pipeline treats it exactly
like GSM8K. Every intermediate result is a non-negative integer <= ``max_value`` (default
``MAX_VALUE``) and every number in a question is <= min(100, max_value); the operand ranges shrink
with ``max_value``, and at 30 a 0.9M-parameter model learns the arithmetic in minutes. Generation
is deterministic in the seed; train and test come from separate random streams (so changing one
split's size leaves the other unchanged) and share no question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mathpt.io import MathptError

MAX_VALUE = 200  # default cap on any intermediate result, so the numbers stay small
MIN_MAX_VALUE = 20  # below this the operand ranges become degenerate

NAMES = [
    ("Ava", "she"),
    ("Liam", "he"),
    ("Maya", "she"),
    ("Noah", "he"),
    ("Zoe", "she"),
    ("Omar", "he"),
    ("Priya", "she"),
    ("Diego", "he"),
    ("Hana", "she"),
    ("Kofi", "he"),
    ("Lena", "she"),
    ("Mateo", "he"),
    ("Aisha", "she"),
    ("Ben", "he"),
    ("Chloe", "she"),
    ("Ivan", "he"),
    ("Sofia", "she"),
    ("Yusuf", "he"),
    ("Emma", "she"),
    ("Ravi", "he"),
    ("Nina", "she"),
    ("Felix", "he"),
    ("Mei", "she"),
    ("Tom", "he"),
    ("Grace", "she"),
    ("Jamal", "he"),
    ("Rosa", "she"),
    ("Leo", "he"),
    ("Keiko", "she"),
    ("Sam", "he"),
]
OBJECTS = [
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "cookies",
    "books",
    "seashells",
    "trading cards",
    "toy cars",
    "balloons",
    "crayons",
    "stamps",
    "buttons",
    "beads",
    "oranges",
    "coins",
    "rocks",
    "erasers",
    "postcards",
    "feathers",
    "puzzle pieces",
    "paper cranes",
    "comic books",
    "candies",
    "flowers",
    "bottle caps",
    "ribbons",
    "keychains",
]
CONTAINERS = ["bags", "boxes", "packs", "jars", "baskets", "bundles", "cartons", "tins"]
SHOPS = [
    ("bakery", ["muffins", "loaves of bread", "bagels", "croissants", "cupcakes"]),
    ("bookstore", ["novels", "notebooks", "maps", "cookbooks", "calendars"]),
    ("toy shop", ["kites", "yo-yos", "puzzles", "teddy bears", "board games"]),
    ("farm stand", ["pumpkins", "melons", "jars of honey", "cartons of eggs", "bunches of carrots"]),
    ("flower shop", ["roses", "tulips", "sunflowers", "potted plants", "bouquets"]),
    ("hardware store", ["hammers", "boxes of nails", "paint cans", "flashlights", "shovels"]),
]
CHORES = ["walking dogs", "mowing lawns", "washing cars", "babysitting", "selling lemonade", "raking leaves"]
PURCHASES = ["a book", "a scarf", "lunch", "a board game", "a plant", "a backpack", "a ticket", "some paint"]


@dataclass
class Scene:
    """Who and what the problem is about; fields are plugged into the templates below."""

    domain: str  # "items" | "money" | "shop"
    S: str  # subject, mid-sentence ("Ava", "the bakery")
    Sc: str  # subject at the start of a sentence
    P: str  # pronoun ("she", "it")
    Pc: str
    Poss: str  # possessive ("her", "its")
    Obj: str  # plural noun of the quantity ("apples", "dollars")
    Oth: str  # another person
    C: str  # a container noun (plural)
    chore: str
    buy: str


# Question sentence and matching solution sentence per (domain, step kind). Fields: the Scene's,
# plus n (operand), prev (value before the step), r (result), a/b (factors of a product start).
# Solution text shows the arithmetic GSM8K-style; annotations are added by _annotate.
START = {
    "items": [
        ("{Sc} has {x} {Obj}.", "{Sc} starts with {x} {Obj}."),
        ("{Sc} starts the day with {x} {Obj}.", "{Sc} begins with {x} {Obj}."),
        ("There are {x} {Obj} in {S}'s collection.", "{S}'s collection starts at {x} {Obj}."),
    ],
    "money": [
        ("{Sc} has ${x}.", "{Sc} starts with ${x}."),
        ("{Sc} has ${x} in {Poss} piggy bank.", "{Sc} begins with ${x}."),
        ("{Sc} saved ${x} last month.", "{Sc} starts with ${x}."),
    ],
    "shop": [
        ("{Sc} has {x} {Obj} in stock.", "{Sc} starts with {x} {Obj}."),
        ("In the morning, {S} has {x} {Obj} on its shelves.", "{Sc} begins with {x} {Obj}."),
    ],
}
PRODUCT_START = {
    "items": [
        ("{Sc} buys {a} {C} of {Obj} with {b} {Obj} in each.", "{Sc} has {a} x {b} = {E}{r} {Obj}."),
        ("{Sc} has {a} {C}, and each one holds {b} {Obj}.", "{Sc} has {a} x {b} = {E}{r} {Obj}."),
        ("{Sc} arranges {Poss} {Obj} in {a} rows of {b}.", "There are {a} x {b} = {E}{r} {Obj} in the rows."),
    ],
    "money": [
        ("{Sc} earns ${b} per hour {chore} and works {a} hours.", "{Sc} earns {a} x ${b} = ${E}{r}."),
        ("{Sc} gets ${b} a week for {a} weeks.", "{Sc} gets {a} x ${b} = ${E}{r}."),
    ],
    "shop": [
        ("{Sc} receives {a} crates with {b} {Obj} in each crate.", "{Sc} gets {a} x {b} = {E}{r} {Obj}."),
    ],
}
STEPS = {
    ("items", "add"): [
        ("{Sc} buys {n} more {Obj}.", "After buying {n} more, {S} has {prev} + {n} = {E}{r} {Obj}."),
        ("{Oth} gives {S} {n} {Obj}.", "With {Oth}'s gift, {S} has {prev} + {n} = {E}{r} {Obj}."),
        ("Then {P} finds {n} more {Obj}.", "After finding {n} more, {S} has {prev} + {n} = {E}{r} {Obj}."),
        (
            "{Pc} gets another {n} {Obj} as a present.",
            "The present brings {S} to {prev} + {n} = {E}{r} {Obj}.",
        ),
    ],
    ("items", "sub"): [
        ("{Sc} gives {n} {Obj} to {Oth}.", "After giving {n} away, {S} has {prev} - {n} = {E}{r} {Obj}."),
        ("{Pc} loses {n} of {Poss} {Obj}.", "After losing {n}, {S} has {prev} - {n} = {E}{r} {Obj}."),
        ("Then {P} trades away {n} {Obj}.", "After the trade, {S} has {prev} - {n} = {E}{r} {Obj}."),
        ("{Sc} sells {n} {Obj} to {Oth}.", "After selling {n}, {S} has {prev} - {n} = {E}{r} {Obj}."),
    ],
    ("items", "mul"): [
        (
            "After a big trade, {S} has {n} times as many {Obj} as before.",
            "{Sc} now has {prev} x {n} = {E}{r} {Obj}.",
        ),
        (
            "Then the number of {Obj} {S} has is multiplied by {n}.",
            "{Sc} now has {prev} x {n} = {E}{r} {Obj}.",
        ),
    ],
    ("items", "div"): [
        (
            "{Sc} splits {Poss} {Obj} into {n} equal piles and keeps only one pile.",
            "One pile has {prev} / {n} = {E}{r} {Obj}.",
        ),
        (
            "{Sc} shares {Poss} {Obj} equally among {n} {C} and keeps one of them.",
            "Each of the {n} {C} gets {prev} / {n} = {E}{r} {Obj}, so {S} keeps {r}.",
        ),
    ],
    ("money", "add"): [
        ("{Sc} earns ${n} {chore}.", "After earning ${n}, {S} has ${prev} + ${n} = ${E}{r}."),
        ("{Oth} gives {S} ${n}.", "With {Oth}'s ${n}, {S} has ${prev} + ${n} = ${E}{r}."),
        ("Then {P} finds ${n} in {Poss} coat.", "After finding ${n}, {S} has ${prev} + ${n} = ${E}{r}."),
    ],
    ("money", "sub"): [
        ("{Sc} spends ${n} on {buy}.", "After spending ${n}, {S} has ${prev} - ${n} = ${E}{r}."),
        ("{Pc} pays {Oth} back ${n}.", "After paying ${n}, {S} has ${prev} - ${n} = ${E}{r}."),
        ("Then {P} donates ${n} to charity.", "After donating ${n}, {S} has ${prev} - ${n} = ${E}{r}."),
    ],
    ("money", "mul"): [
        (
            "By the end of the year, {Poss} money has grown to {n} times as much.",
            "{Sc} now has {n} x ${prev} = ${E}{r}.",
        ),
    ],
    ("money", "div"): [
        (
            "{Sc} splits {Poss} money equally into {n} envelopes and keeps one envelope.",
            "One envelope holds ${prev} / {n} = ${E}{r}.",
        ),
    ],
    ("shop", "add"): [
        ("A delivery brings {n} more {Obj}.", "After the delivery, {S} has {prev} + {n} = {E}{r} {Obj}."),
        ("The staff make {n} more {Obj}.", "Now {S} has {prev} + {n} = {E}{r} {Obj}."),
    ],
    ("shop", "sub"): [
        ("{Sc} sells {n} {Obj} before noon.", "After selling {n}, {S} has {prev} - {n} = {E}{r} {Obj}."),
        ("{Oth} buys {n} {Obj}.", "After {Oth}'s purchase, {S} has {prev} - {n} = {E}{r} {Obj}."),
    ],
    ("shop", "mul"): [
        (
            "The owner restocks until there are {n} times as many {Obj}.",
            "{Sc} now has {prev} x {n} = {E}{r} {Obj}.",
        ),
    ],
    ("shop", "div"): [
        (
            "{Sc} sends its {Obj} equally to {n} branches, keeping one share.",
            "Each share is {prev} / {n} = {E}{r} {Obj}.",
        ),
    ],
}
QUESTIONS = {
    "items": [
        "How many {Obj} does {S} have now?",
        "How many {Obj} does {S} end up with?",
        "How many {Obj} does {S} have at the end?",
        "What is the number of {Obj} {S} has in the end?",
    ],
    "money": ["How many dollars does {S} have now?", "How much money, in dollars, does {S} have at the end?"],
    "shop": ["How many {Obj} does {S} have now?", "How many {Obj} are left at {S}?"],
}
OPS = {
    "add": ("+", lambda a, b: a + b),
    "sub": ("-", lambda a, b: a - b),
    "mul": ("*", lambda a, b: a * b),
    "div": ("/", lambda a, b: a // b),
}
OP_WEIGHTS = {"add": 3, "sub": 3, "mul": 2, "div": 2}


def _scene(rng: random.Random) -> Scene:
    domain = rng.choice(["items", "items", "money", "shop"])
    (name, pron), (other, _) = rng.sample(NAMES, 2)
    poss = {"she": "her", "he": "his"}[pron]
    common = {
        "Oth": other,
        "C": rng.choice(CONTAINERS),
        "chore": rng.choice(CHORES),
        "buy": rng.choice(PURCHASES),
    }
    if domain == "shop":
        shop, goods = rng.choice(SHOPS)
        return Scene(domain, f"the {shop}", f"The {shop}", "it", "It", "its", rng.choice(goods), **common)
    obj = "dollars" if domain == "money" else rng.choice(OBJECTS)
    return Scene(domain, name, name, pron, pron.capitalize(), poss, obj, **common)


def _operand(rng: random.Random, op: str, prev: int, max_value: int) -> int | None:
    """A small operand for ``op`` applied to ``prev`` keeping the result in [0, max_value], or None."""
    if op == "add":
        hi = min(max_value // 5, max_value - prev)
        return rng.randint(2, hi) if hi >= 2 else None
    if op == "sub":
        hi = min(prev - 1, max_value * 3 // 10)
        return rng.randint(2, hi) if hi >= 2 else None
    if op == "mul":
        ks = [k for k in range(2, 6) if prev * k <= max_value and prev <= max_value // 2]
        return rng.choice(ks) if ks else None
    ks = [k for k in range(2, 6) if prev % k == 0 and prev // k >= 2]
    return rng.choice(ks) if ks else None


def generate_problem(rng: random.Random, max_steps: int = 3, max_value: int = MAX_VALUE) -> dict:
    """One raw GSM8K-format row ``{"question", "answer"}`` with 1..max_steps arithmetic steps."""
    sc = _scene(rng)
    fields = dict(vars(sc))
    n_steps = rng.randint(1, max_steps)
    q_parts, s_parts, used = [], [], []
    if rng.random() < 0.3:  # a product opening counts as the first step
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        while a * b > max_value:  # never taken at the default max_value
            a, b = rng.randint(2, 9), rng.randint(2, 12)
        value = a * b
        q, s = rng.choice(PRODUCT_START[sc.domain])
        q_parts.append(q.format(a=a, b=b, **fields))
        s_parts.append(s.format(a=a, b=b, r=value, E=f"<<{a}*{b}={value}>>", **fields))
        n_steps -= 1
    else:
        hi = min(100, max_value // 2) if sc.domain != "items" else min(60, max_value * 3 // 10)
        value = rng.randint(10 if sc.domain != "items" else 5, hi)
        q, s = rng.choice(START[sc.domain])
        q_parts.append(q.format(x=value, **fields))
        s_parts.append(s.format(x=value, **fields))
    for _ in range(n_steps):
        ops = [op for op in OPS if _operand(rng, op, value, max_value) is not None]
        op = rng.choices(ops, weights=[OP_WEIGHTS[o] for o in ops])[0]
        n = _operand(rng, op, value, max_value)
        sym, fn = OPS[op]
        r = fn(value, n)
        options = [t for t in STEPS[(sc.domain, op)] if t not in used] or STEPS[(sc.domain, op)]
        q, s = rng.choice(options)  # prefer a sentence not used yet in this problem
        used.append((q, s))
        expr = f"{n}*{value}" if "{n} x" in s else f"{value}{sym}{n}"
        q_parts.append(q.format(n=n, **fields))
        s_parts.append(s.format(n=n, prev=value, r=r, E=f"<<{expr}={r}>>", **fields))
        value = r
    q_parts.append(rng.choice(QUESTIONS[sc.domain]).format(**fields))
    return {"question": " ".join(q_parts), "answer": "\n".join(s_parts) + f"\n#### {value}"}


def _generate(
    n: int, rng: random.Random, max_steps: int, max_value: int, taken: set[str], split: str
) -> list[dict]:
    rows, attempts = [], 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise MathptError(
                f"arith: could not generate {n} distinct {split} problems "
                f"(got {len(rows)}); lower n_{split} or raise max_steps or max_value"
            )
        row = generate_problem(rng, max_steps, max_value)
        if row["question"] not in taken:
            taken.add(row["question"])
            rows.append(row)
    return rows


def generate_arith(
    n_train: int, n_test: int, seed: int, max_steps: int = 3, max_value: int = MAX_VALUE
) -> dict[str, list[dict]]:
    """``{"train": rows, "test": rows}`` of raw GSM8K-format rows; deterministic in ``seed``.

    Test is drawn first from its own stream; train from another stream, skipping any question
    already used (in either split), so no question is shared and test does not depend on n_train.
    """
    if not isinstance(max_steps, int) or max_steps < 1:
        raise MathptError(f"arith: max_steps must be a positive integer, got {max_steps!r}")
    if not isinstance(max_value, int) or not MIN_MAX_VALUE <= max_value <= MAX_VALUE:
        raise MathptError(
            f"arith: max_value must be an integer in [{MIN_MAX_VALUE}, {MAX_VALUE}], got {max_value!r}"
        )
    taken: set[str] = set()
    test = _generate(n_test, random.Random(f"arith-test-{seed}"), max_steps, max_value, taken, "test")
    train = _generate(n_train, random.Random(f"arith-train-{seed}"), max_steps, max_value, taken, "train")
    return {"train": train, "test": test}
