"""Worked arith solutions for SFT examples and preference pairs, generated from the arith env's own problems
(a correct one, and one with an arithmetic slip in a random step), so SFT and DPO run offline with no files.
Every level writes one "a op b = c" line per step and then "Final: N"; a level-6 chain has one step per
operation, the format its prompt asks for."""

from __future__ import annotations

import operator
import random
from typing import NamedTuple

from raylign.config import DatasetConfig, EnvConfig
from raylign.envs.arith import ArithEnv
from raylign.envs.arith_chain import STEPS, chain_steps
from raylign.types import Example, Pair, Problem


class _Ref(NamedTuple):
    step: int  # the result of an earlier step


_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _plan(op: str, operands: list[int]) -> list[tuple[int | _Ref, str, int | _Ref]]:
    """The worked steps of an arith fact: two-digit operands are split into tens and ones; a chain is one
    step per operation, each on the previous result."""
    if names := chain_steps(op):
        first, *later = [STEPS[name].symbol for name in names]
        return [(operands[0], first, operands[1]),
                *((_Ref(i), sym, n) for i, (sym, n) in enumerate(zip(later, operands[2:], strict=True)))]
    a, b, *rest = operands
    if op == "add" and a >= 10 and b >= 10:
        return [(a - a % 10, "+", b - b % 10), (a % 10, "+", b % 10), (_Ref(0), "+", _Ref(1))]
    if op == "sub" and b >= 10 and b % 10:
        return [(a, "-", b - b % 10), (_Ref(0), "-", b % 10)]
    if op == "mul" and a >= 10 and a % 10:
        return [(a - a % 10, "*", b), (a % 10, "*", b), (_Ref(0), "+", _Ref(1))]
    if op in ("add_sub", "mul_add"):
        return [(a, "+" if op == "add_sub" else "*", b), (_Ref(0), "-" if op == "add_sub" else "+", rest[0])]
    return [(a, {"add": "+", "sub": "-", "mul": "*"}[op], b)]


def _solve(plan: list, slip: tuple[int, int] | None = None) -> list[str]:
    """Solution lines, one step each, then ``Final: N``; ``slip = (step, delta)`` puts an error in one step."""
    values, lines = [], []
    for i, (x, sym, y) in enumerate(plan):
        a, b = (values[v.step] if isinstance(v, _Ref) else v for v in (x, y))
        values.append(_OPERATORS[sym](a, b) + (slip[1] if slip and slip[0] == i else 0))
        lines.append(f"{a} {sym} {b} = {values[-1]}")
    return [*lines, f"Final: {values[-1]}"]


def _arith_problems(env_cfg: EnvConfig, dataset_cfg: DatasetConfig, split: str, n: int) -> list[Problem]:
    if dataset_cfg.path is not None:
        raise ValueError("arith worked solutions need generated problems; leave dataset.path unset")
    # Generation is prefix-stable: these are the env's first n problems of the split (at most dataset.limit).
    return ArithEnv(env_cfg.model_copy(update={"num_problems": n}), dataset_cfg).problems(split)


def _checked_solution(problem: Problem) -> tuple[list, list[str]]:
    plan = _plan(problem.meta["op"], problem.meta["operands"])
    lines = _solve(plan)
    if lines[-1] != f"Final: {problem.answer}":  # the worked steps must reach the env's own answer
        raise AssertionError(f"{problem.id}: worked solution ends {lines[-1]!r}, answer {problem.answer}")
    return plan, lines


def arith_examples(env_cfg: EnvConfig, dataset_cfg: DatasetConfig, split: str, n: int) -> list[Example]:
    """SFT examples: the arith env's first ``n`` problems of ``split`` with correct worked solutions."""
    return [Example(p.id, p.messages, "\n".join(_checked_solution(p)[1]), f"arith:{p.id}")
            for p in _arith_problems(env_cfg, dataset_cfg, split, n)]


def arith_pairs(env_cfg: EnvConfig, dataset_cfg: DatasetConfig, split: str, n: int, seed: int) -> list[Pair]:
    """Pairs: a correct worked solution (step scores all 1.0) against one with an arithmetic slip.

    The slip (a result off by 1, 2 or 10) is in a random step; later steps compute correctly from it, so
    the final answer is wrong. Rejected step scores are 1.0 before the slip and 0.0 from it on. The slip
    depends only on ``seed`` and the problem id, so pair i is the same whatever ``n``.
    """
    out = []
    for p in _arith_problems(env_cfg, dataset_cfg, split, n):
        plan, chosen = _checked_solution(p)
        rng = random.Random(f"raylign-arith-pairs|{seed}|{p.id}")
        step, delta = rng.randrange(len(plan)), rng.choice((1, 2, 10, -1, -2, -10))
        if int(chosen[step].rsplit("= ", 1)[1]) + delta < 0:
            delta = -delta
        rejected = _solve(plan, (step, delta))
        out.append(Pair(p.id, p.messages, "\n".join(chosen), "\n".join(rejected), (1.0,) * len(chosen),
                        tuple(1.0 if i < step else 0.0 for i in range(len(rejected))), f"arith:{p.id}", p.answer))
    return out
