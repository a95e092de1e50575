"""Procedurally generated arithmetic word problems: the offline default env, needing no files.

Levels: 1 one-digit sums; 2 two-digit +/- one-digit (results >= 0); 3 two-digit +/- two-digit;
4 products (one-digit x one-digit up to two-digit x one-digit); 5 two steps (a + b - c, a * b + c);
6 "chain": a start number and 3-5 small steps, intermediate values 1..200 (``arith_chain``).
Half the questions are bare ("What is 7 + 5?"), half short word problems.

Train and test never share an arithmetic fact: each fact's canonical form (operands of + and *
sorted, so "5 + 7" is "7 + 5") is assigned to a split by a SHA-256 hash that ignores the seed, so
a model trained on any seed's train split is never tested on a fact it saw. The seed only drives
``random.Random`` (string seeds hash with SHA-512), so problems are identical in every process.

The policy this targets (SmolLM2-135M-Instruct) rarely writes "Final:" lines, so the prompt asks
for just the number and the reward reads a Final line if there is one, else the LAST number.
Reward: 1.0 right, 0.1 a number but wrong (format credit), 0.0 no number.
Level 6 asks for the working one step per line and a last line "Final: <number>", and its reward is
the strict final-answer reward (``gsm8k.score_final``): 1.0 right on the Final line, 0.1 a Final line
with a wrong number, 0.0 no Final line (``env.lenient`` adds the last-number fallback, as for GSM8K).
With ``dataset.path`` set, records come from that file (question_key / answer_key; an answer
may be a plain number or a GSM8K-style "... #### 42").
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

from raylign.config import DatasetConfig, EnvConfig
from raylign.envs.arith_chain import canonical as chain_canonical
from raylign.envs.arith_chain import chain_question, chain_steps, chain_values, draw_chain
from raylign.envs.answers import (
    extract_final,
    extract_gsm8k_truth,
    extract_last_number,
    normalize_number,
    numbers_equal,
)
from raylign.envs.data import DataError, field, load_records, question_text
from raylign.envs.gsm8k import score_final
from raylign.types import Problem, Score

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant that solves arithmetic problems."
ANSWER_INSTRUCTION = "Answer with just the number."
CHAIN_LEVEL = 6
STEPS_INSTRUCTION = ('Work it out one step per line, like "12 * 3 = 36". '
                     'The last line must be "Final: <number>".')
CORRECT, FORMAT_ONLY = 1.0, 0.1
SPLITS = ("train", "test")

_NAMES = ("Mia", "Leo", "Ava", "Sam", "Noah", "Zoe", "Omar", "Lena")
_ITEMS = ("stickers", "apples", "marbles", "books", "pencils", "cookies", "shells", "cards")
_BARE = ("What is {expr}?", "Compute {expr}.", "Calculate {expr}.")

# op -> (value of the operands, expression, word-problem template, which leading operands commute)
_OPS: dict[str, tuple[Callable[..., int], str, str, int]] = {
    "add": (lambda a, b: a + b, "{a} + {b}",
            "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", 2),
    "sub": (lambda a, b: a - b, "{a} - {b}",
            "{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", 0),
    "mul": (lambda a, b: a * b, "{a} * {b}",
            "{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} have in total?", 2),
    "add_sub": (lambda a, b, c: a + b - c, "{a} + {b} - {c}",
                "{name} has {a} {item}, gets {b} more and then gives away {c}. "
                "How many {item} does {name} have now?", 2),
    "mul_add": (lambda a, b, c: a * b + c, "{a} * {b} + {c}",
                "{name} has {a} boxes with {b} {item} in each box and {c} loose {item}. "
                "How many {item} does {name} have in total?", 2),
}


def _draw(level: int, rng: random.Random) -> tuple[str, tuple[int, ...]]:
    """An operation and its operands for a difficulty level."""
    if level == CHAIN_LEVEL:
        return draw_chain(rng)
    coin = rng.random() < 0.5
    if level == 1:
        return "add", (rng.randint(1, 9), rng.randint(1, 9))
    if level == 2:
        return ("add" if coin else "sub"), (rng.randint(10, 99), rng.randint(1, 9))
    if level == 3:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return ("add", (a, b)) if coin else ("sub", (max(a, b), min(a, b)))
    if level == 4:
        return "mul", (rng.randint(2, 9) if coin else rng.randint(10, 99), rng.randint(2, 9))
    if coin:
        a, b = rng.randint(10, 50), rng.randint(2, 30)
        return "add_sub", (a, b, rng.randint(1, a + b))
    return "mul_add", (rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20))


def fact_split(op: str, operands: tuple[int, ...]) -> str:
    """"train" or "test" for an arithmetic fact, the same for every seed, process and phrasing."""
    if chain_steps(op):
        canonical = chain_canonical(op, operands)
    else:
        commuting = _OPS[op][3]
        canonical = f"{op}:{sorted(operands[:commuting]) + list(operands[commuting:])}"
    return SPLITS[hashlib.sha256(canonical.encode()).digest()[0] % 2]


def answer(op: str, operands: tuple[int, ...]) -> int:
    """The value of an arithmetic fact (a chain's last value)."""
    return chain_values(op, operands)[-1] if chain_steps(op) else _OPS[op][0](*operands)


def _question(op: str, operands: tuple[int, ...], rng: random.Random) -> tuple[str, str]:
    if chain_steps(op):
        return chain_question(op, operands, rng)
    values = dict(zip("abc", operands))
    _, expr, story, _ = _OPS[op]
    # Word problems need every operand >= 2 ("has 1 apples" reads badly); the draw stays deterministic.
    if rng.random() < 0.5 or min(operands) < 2:
        return rng.choice(_BARE).format(expr=expr.format(**values)), "bare"
    return story.format(name=rng.choice(_NAMES), item=rng.choice(_ITEMS), **values), "word"


def generate(level: int, split: str, count: int, seed: int) -> list[tuple[str, str, tuple[int, ...], int, str]]:
    """``count`` distinct (question, op, operands, answer, phrasing) of one split, deterministic in ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"arith has splits {SPLITS}, not {split!r} (or set dataset.path to read a file)")
    rng = random.Random(f"raylign-arith|{seed}|{level}")
    out, seen = [], set()
    for _ in range(2000 + 50 * count):
        op, operands = _draw(level, rng)
        question, phrasing = _question(op, operands, rng)
        if fact_split(op, operands) == split and question not in seen:
            seen.add(question)
            out.append((question, op, operands, answer(op, operands), phrasing))
            if len(out) == count:
                return out
    raise ValueError(f"arith level {level}: only {len(out)} distinct {split} problems; lower env.num_problems")


def score_number(completion: str, truth: str) -> Score:
    """Reward a reply by its Final line if it has one, else by its last number."""
    prediction = extract_final(completion) or extract_last_number(completion)
    correct = numbers_equal(prediction, truth)
    reward = CORRECT if correct else FORMAT_ONLY if prediction is not None else 0.0
    return Score(reward, correct, prediction, prediction is not None, {"length": len(completion or "")})


class ArithEnv:
    """Generated arithmetic (no files, no network), or numeric Q/A records from ``dataset.path``."""

    name = "arith"

    def __init__(self, env_cfg: EnvConfig, dataset_cfg: DatasetConfig):
        self.env_cfg = env_cfg
        self.dataset_cfg = dataset_cfg

    def _chain(self) -> bool:
        """Generated level-6 problems: worked steps and a Final line (a dataset file keeps the number prompt)."""
        return self.env_cfg.difficulty == CHAIN_LEVEL and self.dataset_cfg.path is None

    def _messages(self, question: str) -> list[dict[str, str]]:
        instruction = STEPS_INSTRUCTION if self._chain() else ANSWER_INSTRUCTION
        return [
            {"role": "system", "content": self.env_cfg.system_prompt or DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": f"{question}\n{instruction}"},
        ]

    def problems(self, split: str) -> list[Problem]:
        if self.dataset_cfg.path is not None:
            return self._file_problems(split)
        level = self.env_cfg.difficulty
        count = min(self.env_cfg.num_problems, self.dataset_cfg.limit or self.env_cfg.num_problems)
        generated = generate(level, split, count, self.env_cfg.seed)
        return [
            Problem(f"arith-l{level}-{split}-{i}", self._messages(question), str(answer),
                    {"level": level, "op": op, "operands": list(operands), "phrasing": phrasing})
            for i, (question, op, operands, answer, phrasing) in enumerate(generated)
        ]

    def _file_problems(self, split: str) -> list[Problem]:
        records, source = load_records(self.dataset_cfg, split=split)
        out = []
        key = self.dataset_cfg.answer_key
        for row, record in enumerate(records):
            raw = field(record, key, source, row)
            truth = extract_gsm8k_truth(raw) if "####" in raw else normalize_number(raw)
            if truth is None:
                raise DataError(f"{source}: row {row}: field '{key}' is not a number: {raw[:80]!r}")
            question = question_text(record, self.dataset_cfg, source, row)
            out.append(Problem(f"arith-{split}-{row}", self._messages(question), truth, {"source": source, "row": row}))
        return out

    def reward(self, problem: Problem, completion: str) -> Score:
        if problem.meta.get("level") == CHAIN_LEVEL:  # the problem's own prompt asked for a Final line
            return score_final(completion, problem.answer, lenient=self.env_cfg.lenient)
        return score_number(completion, problem.answer)
