"""Arith difficulty 6 ("chain"): right values, disjoint splits, seeded, its own prompt, the strict Final reward,
and worked solutions that reach the answer."""

from __future__ import annotations

import random

import pytest

from raylign.config import DatasetConfig, EnvConfig
from raylign.envs.arith import ANSWER_INSTRUCTION, STEPS_INSTRUCTION, ArithEnv, fact_split
from raylign.envs.arith_chain import MAX_VALUE, chain_question, chain_steps, draw_chain
from raylign.envs.pairs import arith_examples, arith_pairs

_BY_HAND = {"add": lambda v, n: v + n, "sub": lambda v, n: v - n, "mul": lambda v, n: v * n}


def _problems(split: str, seed: int = 1234, n: int = 300):
    return ArithEnv(EnvConfig(difficulty=6, num_problems=n, seed=seed), DatasetConfig()).problems(split)


def _trace(op: str, operands: list[int]) -> list[int]:
    values = [operands[0]]
    for name, n in zip(op.split("_"), operands[1:], strict=True):
        values.append(_BY_HAND[name](values[-1], n))
    return values


def test_values_steps_and_ranges():
    problems = _problems("train") + _problems("test")
    assert {len(p.meta["operands"]) - 1 for p in problems} == {3, 4, 5}
    assert {name for p in problems for name in p.meta["op"].split("_")} == {"add", "sub", "mul"}
    for p in problems:
        op, operands = p.meta["op"], p.meta["operands"]
        values = _trace(op, operands)
        assert p.meta["level"] == 6 and p.answer == str(values[-1])
        assert all(1 <= v <= MAX_VALUE for v in values), (op, operands)
        for name, n in zip(op.split("_"), operands[1:]):
            assert 2 <= n <= 5 if name == "mul" else 1 <= n <= 20
        assert all(str(x) in p.messages[1]["content"] for x in operands)


def test_the_example_in_the_brief():
    question, phrasing = chain_question("add_mul_sub", (7, 5, 3, 4), random.Random(0))
    assert phrasing in ("bare", "word") and all(s in question for s in ("7", "5", "3", "4"))
    assert _trace("add_mul_sub", [7, 5, 3, 4])[-1] == 32
    assert chain_steps("add_mul_sub") == ["add", "mul", "sub"]
    assert chain_steps("add_sub") is None and chain_steps("mul_add") is None  # level 5's ops stay theirs


def test_splits_disjoint_across_seeds_and_commuted_first_step():
    train, test = _problems("train", seed=7), _problems("test", seed=8)
    facts = lambda ps: {(p.meta["op"], tuple(p.meta["operands"])) for p in ps}  # noqa: E731
    assert not facts(train) & facts(test)
    assert not {p.messages[1]["content"] for p in train} & {p.messages[1]["content"] for p in test}
    # "Start with 5. Add 7, ..." is the fact "Start with 7. Add 5, ...": same split, always
    assert fact_split("add_mul_sub", (5, 7, 3, 4)) == fact_split("add_mul_sub", (7, 5, 3, 4))
    assert fact_split("mul_add_add", (4, 3, 1, 2)) == fact_split("mul_add_add", (3, 4, 1, 2))
    swapped = {(p.meta["op"], p.meta["operands"][1], p.meta["operands"][0], *p.meta["operands"][2:])
               for p in train if p.meta["op"].split("_")[0] in ("add", "mul")}
    assert not swapped & facts(test)
    assert {fact_split(op, ops) for op, ops in facts(train)} == {"train"}


def test_deterministic_per_seed():
    assert _problems("train", seed=3) == _problems("train", seed=3)
    assert [p.messages for p in _problems("train", seed=3)] != [p.messages for p in _problems("train", seed=4)]
    assert draw_chain(random.Random("x")) == draw_chain(random.Random("x"))
    assert _problems("test", n=20) == _problems("test", n=300)[:20]  # prefix-stable, like the other levels


def test_prompt_asks_for_steps_and_level_1_keeps_its_own():
    chain = _problems("test", n=1)[0]
    assert chain.messages[1]["content"].endswith("\n" + STEPS_INSTRUCTION)
    assert '"12 * 3 = 36"' in STEPS_INSTRUCTION and '"Final: <number>"' in STEPS_INSTRUCTION
    # the first test problems of levels 1 and 5, exactly as before level 6 existed
    level_1 = ArithEnv(EnvConfig(difficulty=1), DatasetConfig()).problems("test")[0]
    assert level_1.messages[1]["content"] == f"Calculate 1 + 2.\n{ANSWER_INSTRUCTION}" and level_1.answer == "3"
    level_5 = ArithEnv(EnvConfig(difficulty=5), DatasetConfig()).problems("test")[0]
    assert level_5.messages[1]["content"] == ("Ava has 4 boxes with 7 shells in each box and 7 loose shells. How many "
                                              f"shells does Ava have in total?\n{ANSWER_INSTRUCTION}")


@pytest.mark.parametrize("completion, reward, correct, fmt", [
    ("7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 32\nFinal: 32", 1.0, True, True),
    ("Final: 32", 1.0, True, True),
    ("7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 31\nFinal: 31", 0.1, False, True),
    ("7 + 5 = 12\n12 * 3 = 36\n36 - 4 = 32", 0.0, False, False),  # right number, no Final line: no credit
    ("The answer is 32.", 0.0, False, False),
    ("", 0.0, False, False),
])
def test_strict_final_reward(completion, reward, correct, fmt):
    env = ArithEnv(EnvConfig(difficulty=6), DatasetConfig())
    problem = env.problems("test")[0]
    problem = type(problem)(problem.id, problem.messages, "32", problem.meta)
    score = env.reward(problem, completion)
    assert (score.reward, score.correct, score.format_ok) == (reward, correct, fmt)


def test_level_1_reward_keeps_the_last_number_fallback():
    env = ArithEnv(EnvConfig(difficulty=1), DatasetConfig())
    problem = env.problems("test")[0]
    assert env.reward(problem, f"the sum is {problem.answer}").reward == 1.0


def test_worked_solutions_reach_the_answer_one_line_per_step():
    env_cfg = EnvConfig(difficulty=6, num_problems=200)
    problems = {p.id: p for p in ArithEnv(env_cfg, DatasetConfig()).problems("train")}
    examples = arith_examples(env_cfg, DatasetConfig(), "train", 200)
    assert len(examples) == 200
    env = ArithEnv(env_cfg, DatasetConfig())
    for e in examples:
        p = problems[e.id]
        lines = e.response.split("\n")
        values = _trace(p.meta["op"], p.meta["operands"])
        assert lines[-1] == f"Final: {p.answer}" and len(lines) == len(p.meta["operands"])
        for line, a, (name, n), c in zip(lines, values, zip(p.meta["op"].split("_"), p.meta["operands"][1:]),
                                         values[1:]):
            assert line == f"{a} {'+-*'['add sub mul'.split().index(name)]} {n} = {c}"
        assert env.reward(p, e.response).reward == 1.0


def test_chain_pairs_slip_one_step_and_miss_the_answer():
    env_cfg = EnvConfig(difficulty=6)
    pairs = arith_pairs(env_cfg, DatasetConfig(), "train", 50, seed=1)
    env = ArithEnv(env_cfg, DatasetConfig())
    problems = {p.id: p for p in env.problems("train")}
    for pair in pairs:
        assert env.reward(problems[pair.id], pair.chosen).reward == 1.0
        assert env.reward(problems[pair.id], pair.rejected).reward == 0.1
        first_bad = pair.scores_rejected.index(0.0)
        chosen, rejected = pair.chosen.split("\n"), pair.rejected.split("\n")
        assert chosen[:first_bad] == rejected[:first_bad] and chosen[first_bad] != rejected[first_bad]
