"""Arith difficulty 6, "chain": a start number and 3 to 5 operations applied left to right.

"Start with 7. Add 5, multiply by 3, then subtract 4. What is the result?" (or the same chain as a word
problem). Every step is one a model can do alone: add or subtract 1-20, multiply by 2-5, and every
intermediate value stays in 1..MAX_VALUE, so the outcome depends on getting each of several steps right.

A chain's op is its steps joined by "_" ("add_mul_sub"), the naming levels 1-5 use for "add_sub" and
"mul_add", with operands (start, n1, n2, ...). Its canonical form sorts the start and n1 when the first
step commutes ("Start with 5. Add 7" is the fact "Start with 7. Add 5"), so ``arith.fact_split`` puts a
chain and its commuted twin in the same split.
"""

from __future__ import annotations

import operator
import random
from typing import Callable, NamedTuple

MIN_STEPS, MAX_STEPS, MAX_VALUE = 3, 5, 200


class Step(NamedTuple):
    apply: Callable[[int, int], int]
    symbol: str  # as written in a worked solution: "12 * 3 = 36"
    bare: str  # clause of the bare question
    word: str  # clause of the word problem
    commutes: bool


STEPS: dict[str, Step] = {
    "add": Step(operator.add, "+", "add {n}", "gets {n} more", True),
    "sub": Step(operator.sub, "-", "subtract {n}", "gives away {n}", False),
    "mul": Step(operator.mul, "*", "multiply by {n}", "grows the pile to {n} times its size", True),
}

_NAMES = ("Mia", "Leo", "Ava", "Sam", "Noah", "Zoe", "Omar", "Lena")
_ITEMS = ("stickers", "apples", "marbles", "books", "pencils", "cookies", "shells", "cards")
_BARE = ("Start with {start}. {steps}. What is the result?", "Take {start}. {steps}. What number do you get?")
_WORD = "{name} starts with {start} {item}. {name} {steps}. How many {item} does {name} have now?"


def chain_steps(op: str) -> list[str] | None:
    """The step names of a chain op ("add_mul_sub" -> ["add", "mul", "sub"]); None for any other op."""
    names = op.split("_")
    return names if MIN_STEPS <= len(names) <= MAX_STEPS and all(n in STEPS for n in names) else None


def chain_values(op: str, operands: tuple[int, ...]) -> list[int]:
    """The value after each step (the last one is the answer)."""
    values, value = [], operands[0]
    for name, n in zip(chain_steps(op), operands[1:], strict=True):
        value = STEPS[name].apply(value, n)
        values.append(value)
    return values


def canonical(op: str, operands: tuple[int, ...]) -> str:
    """The chain's fact, the same for a chain whose first step swaps its two numbers."""
    head = sorted(operands[:2]) if STEPS[chain_steps(op)[0]].commutes else list(operands[:2])
    return f"{op}:{head + list(operands[2:])}"


def _options(value: int, rng: random.Random) -> list[tuple[str, int]]:
    """The steps that keep ``value`` in 1..MAX_VALUE, each with its number."""
    out = []
    if value + 1 <= MAX_VALUE:
        out.append(("add", rng.randint(1, min(20, MAX_VALUE - value))))
    if value >= 2:
        out.append(("sub", rng.randint(1, min(20, value - 1))))
    if 2 * value <= MAX_VALUE:
        out.append(("mul", rng.randint(2, min(5, MAX_VALUE // value))))
    return out


def draw_chain(rng: random.Random) -> tuple[str, tuple[int, ...]]:
    """A random chain: its op and operands."""
    value = start = rng.randint(2, 20)
    names, numbers = [], []
    for _ in range(rng.randint(MIN_STEPS, MAX_STEPS)):
        name, n = rng.choice(_options(value, rng))
        value = STEPS[name].apply(value, n)
        names.append(name)
        numbers.append(n)
    return "_".join(names), (start, *numbers)


def _join(clauses: list[str]) -> str:
    return ", ".join(clauses[:-1]) + ", then " + clauses[-1]


def chain_question(op: str, operands: tuple[int, ...], rng: random.Random) -> tuple[str, str]:
    """(question, phrasing): half bare, half word problems."""
    pairs = list(zip(chain_steps(op), operands[1:], strict=True))
    if rng.random() < 0.5:
        steps = _join([STEPS[name].bare.format(n=n) for name, n in pairs])
        return rng.choice(_BARE).format(start=operands[0], steps=steps[0].upper() + steps[1:]), "bare"
    steps = _join([STEPS[name].word.format(n=n) for name, n in pairs])
    return _WORD.format(name=rng.choice(_NAMES), item=rng.choice(_ITEMS), start=operands[0], steps=steps), "word"
