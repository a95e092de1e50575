"""MATH competition problems (Hendrycks et al. 2021), by default the MATH-500 subset, answered in \\boxed{}.

Ground truth is the record's answer field when present (MATH-500 has ``answer``), else the last
\\boxed{} of its ``solution``. Equivalence is symbolic (``math_equal``: math-verify, then sympy,
then strings), so ``\\frac{1}{2}`` matches ``0.5``. Reward: 1.0 right, 0.1 boxed but wrong, 0.0 no
box. ``env.lenient`` also accepts the last number of a reply with no box (1.0 right, else 0.0).
Records use ``problem`` for the question; the default ``question_key`` ("question") falls back to it.
"""

from __future__ import annotations

from raylign.config import DatasetConfig, EnvConfig
from raylign.envs.answers import extract_boxed, math_equal, score_reply
from raylign.types import Problem, Score
from raylign.envs.data import DataError, field, load_records, question_text

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Solve the math problem step by step.\n"
    "Put your final answer within \\boxed{}."
)
HUB_ID = "HuggingFaceH4/MATH-500"
LOCAL_HINT = "../shared/data/math500/test.jsonl"
_META_KEYS = ("subject", "level", "unique_id", "type")


def score_boxed(completion: str, truth: str, lenient: bool = False) -> Score:
    """Score a reply by its last \\boxed{} answer (or, when lenient and unboxed, its last number)."""
    return score_reply(completion, truth, extract_boxed, math_equal, "boxed", lenient)


def _ground_truth(record: dict, answer_key: str, source: str, row: int) -> str:
    if record.get(answer_key) is not None:
        return field(record, answer_key, source, row).strip()
    if record.get("solution") is None:
        field(record, answer_key, source, row)  # raises: neither an answer nor a solution
    boxed = extract_boxed(str(record["solution"]))
    if not boxed:
        raise DataError(f"{source}: row {row}: no field '{answer_key}' and no \\boxed{{}} in field 'solution'")
    return boxed


class MathEnv:
    """MATH / MATH-500 from a local json/jsonl/parquet file (``dataset.path``) or the hub."""

    name = "math"

    def __init__(self, env_cfg: EnvConfig, dataset_cfg: DatasetConfig):
        self.env_cfg = env_cfg
        self.dataset_cfg = dataset_cfg

    def problems(self, split: str) -> list[Problem]:
        records, source = load_records(self.dataset_cfg, HUB_ID, None, split=split, local_hint=LOCAL_HINT)
        return [self._problem(record, source, split, row) for row, record in enumerate(records)]

    def _question_cfg(self, record: dict) -> DatasetConfig:
        cfg = self.dataset_cfg
        if cfg.question_key == "question" and record.get("question") is None and record.get("problem") is not None:
            return cfg.model_copy(update={"question_key": "problem"})
        return cfg

    def _problem(self, record: dict, source: str, split: str, row: int) -> Problem:
        truth = _ground_truth(record, self.dataset_cfg.answer_key, source, row)
        messages = [
            {"role": "system", "content": self.env_cfg.system_prompt or DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": question_text(record, self._question_cfg(record), source, row)},
        ]
        meta = {"source": source, "row": row, **{k: record[k] for k in _META_KEYS if record.get(k) is not None}}
        return Problem(f"math-{split}-{row}", messages, truth, meta)

    def reward(self, problem: Problem, completion: str) -> Score:
        return score_boxed(completion, problem.answer, lenient=self.env_cfg.lenient)
