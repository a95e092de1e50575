"""The generated arithmetic env: deterministic, train/test disjoint, correct answers, documented rewards."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from raylign.config import DatasetConfig, EnvConfig
from raylign.envs import ENVS, make_env
from raylign.envs.arith import ArithEnv, fact_split

_RECOMPUTE = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "add_sub": lambda a, b, c: a + b - c,
    "mul_add": lambda a, b, c: a * b + c,
}


def _env(**env_kwargs) -> ArithEnv:
    return ArithEnv(EnvConfig(**env_kwargs), DatasetConfig())


def test_registry():
    assert set(ENVS) == {"arith", "gsm8k", "math", "rag", "dspy"}
    assert isinstance(make_env(EnvConfig(name="arith"), DatasetConfig()), ArithEnv)
    with pytest.raises(ValueError, match="env.name"):
        make_env(EnvConfig.model_construct(name="chess"), DatasetConfig())


def test_same_seed_same_problems_different_seed_different():
    a, b, c = _env(seed=1).problems("train"), _env(seed=1).problems("train"), _env(seed=2).problems("train")
    assert a == b
    assert [p.messages for p in a] != [p.messages for p in c]


def test_deterministic_across_processes():
    # Python's hash() is salted per process; the generator must not depend on it.
    code = ("from raylign.config import *; from raylign.envs.arith import ArithEnv; "
            "env = ArithEnv(EnvConfig(difficulty=3), DatasetConfig()); "
            "print([p.messages[1]['content'] for p in env.problems('test')][:5])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2], env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    here = [p.messages[1]["content"] for p in _env(difficulty=3).problems("test")][:5]
    assert out.strip() == repr(here)


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_train_test_disjoint_and_answers_correct(level):
    train = _env(difficulty=level, seed=7).problems("train")
    test = _env(difficulty=level, seed=8).problems("test")  # a different seed must not leak either
    assert len(train) == len(test) == 200
    assert len({p.id for p in train}) == 200 and len({p.messages[1]["content"] for p in train}) == 200
    facts = lambda ps: {(p.meta["op"], tuple(p.meta["operands"])) for p in ps}  # noqa: E731
    # 5 + 7 in train and 7 + 5 in test would be the same fact.
    commuted = lambda ps: {(op, *sorted(ops[:2]), *ops[2:]) for op, ops in facts(ps) if op != "sub"}  # noqa: E731
    assert not facts(train) & facts(test)
    assert not commuted(train) & commuted(test)
    assert not {p.messages[1]["content"] for p in train} & {p.messages[1]["content"] for p in test}
    for p in train + test:
        assert p.meta["level"] == level
        assert p.answer == str(_RECOMPUTE[p.meta["op"]](*p.meta["operands"]))
        assert int(p.answer) >= 0
        assert all(str(x) in p.messages[1]["content"] for x in p.meta["operands"])


def test_level_operand_ranges():
    for p in _env(difficulty=1).problems("train"):
        assert p.meta["op"] == "add" and all(1 <= x <= 9 for x in p.meta["operands"])
    for p in _env(difficulty=3).problems("train"):
        assert all(10 <= x <= 99 for x in p.meta["operands"])
    for p in _env(difficulty=4).problems("train"):
        assert p.meta["op"] == "mul" and 2 <= p.meta["operands"][1] <= 9
    assert {p.meta["op"] for p in _env(difficulty=5).problems("train")} == {"add_sub", "mul_add"}


def test_fact_split_is_commutative_for_sums_and_products():
    assert fact_split("add", (5, 7)) == fact_split("add", (7, 5))
    assert fact_split("mul_add", (3, 4, 9)) == fact_split("mul_add", (4, 3, 9))


def test_prompt_limit_and_pickling():
    env = ArithEnv(EnvConfig(num_problems=50), DatasetConfig(limit=10))
    problems = env.problems("test")
    assert len(problems) == 10
    system = "You are a helpful assistant that solves arithmetic problems."
    assert problems[0].messages[0] == {"role": "system", "content": system}
    assert problems[0].messages[1]["content"].endswith("\nAnswer with just the number.")
    custom = ArithEnv(EnvConfig(system_prompt="Be terse."), DatasetConfig()).problems("test")[0]
    assert custom.messages[0]["content"] == "Be terse."
    assert pickle.loads(pickle.dumps(problems)) == problems
    assert pickle.loads(pickle.dumps(env.reward(problems[0], "12"))).format_ok
    with pytest.raises(ValueError, match="splits"):
        env.problems("validation")


@pytest.mark.parametrize("completion, reward, correct, fmt", [
    ("The answer is 12.", 1.0, True, True),
    ("12", 1.0, True, True),
    ("7 + 5 = 12", 1.0, True, True),
    ("Final: 12\nthough some say 13", 1.0, True, True),  # a Final line wins over the last number
    ("11", 0.1, False, True),
    ("eleven", 0.0, False, False),
    ("", 0.0, False, False),
])
def test_reward(completion, reward, correct, fmt):
    env = _env()
    problem = env.problems("test")[0]
    problem = type(problem)(problem.id, problem.messages, "12", problem.meta)
    score = env.reward(problem, completion)
    assert (score.reward, score.correct, score.format_ok) == (reward, correct, fmt)
    assert score.info["length"] == len(completion)


def test_bring_your_own_file(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text('{"q": "What is 2 + 2?", "a": 4}\n{"q": "What is 10 - 1?", "a": "Ten minus one.\\n#### 9"}\n')
    env = ArithEnv(EnvConfig(), DatasetConfig(path=str(path), question_key="q", answer_key="a"))
    problems = env.problems("test")
    assert [p.answer for p in problems] == ["4", "9"]
    assert problems[1].id == "arith-test-1"
    assert problems[0].messages[1]["content"] == "What is 2 + 2?\nAnswer with just the number."
