"""GSM8K grade-school math word problems (Cobbe et al. 2021), answered on a strict "Final: <number>" line.

Ground truth is the number after "####" in the dataset's answer field. Reward (the simple_grpo
seed's shaping): 1.0 for the right number on the last Final line, 0.1 for a well-formed Final line
with the wrong number (a format reward that gets a small model writing the line at all), 0.0 with
no Final line. ``env.lenient`` additionally accepts the last number of a reply without a Final line:
right -> 1.0 with ``format_ok=False``, wrong -> 0.0 (no format credit to give).
"""

from __future__ import annotations

from raylign.config import DatasetConfig, EnvConfig
from raylign.envs.answers import extract_final, extract_gsm8k_truth, numbers_equal, score_reply
from raylign.types import Problem, Score
from raylign.envs.data import DataError, field, load_records, question_text

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Solve the problem.\n"
    "Show your reasoning briefly.\n"
    "At the end, output exactly one line in this format:\n"
    "Final: <number>\n"
    "Do not write anything after the Final line."
)
HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"
LOCAL_HINT = "../shared/data/gsm8k/test.jsonl"


def score_final(completion: str, truth: str, lenient: bool = False) -> Score:
    """Score a reply against a numeric ground truth read from its last "Final:" line."""
    return score_reply(completion, truth, extract_final, numbers_equal, "final", lenient)


class Gsm8kEnv:
    """GSM8K from a local json/jsonl/parquet file (``dataset.path``) or the hub."""

    name = "gsm8k"

    def __init__(self, env_cfg: EnvConfig, dataset_cfg: DatasetConfig):
        self.env_cfg = env_cfg
        self.dataset_cfg = dataset_cfg

    def problems(self, split: str) -> list[Problem]:
        records, source = load_records(self.dataset_cfg, HUB_ID, HUB_CONFIG, split=split, local_hint=LOCAL_HINT)
        return [self._problem(record, source, split, row) for row, record in enumerate(records)]

    def _problem(self, record: dict, source: str, split: str, row: int) -> Problem:
        key = self.dataset_cfg.answer_key
        solution = field(record, key, source, row)
        if "#### " not in solution:
            raise DataError(f"{source}: row {row}: field '{key}' has no '#### <answer>' line")
        truth = extract_gsm8k_truth(solution)
        if truth is None:
            tail = solution.rpartition("####")[2].strip()
            raise DataError(f"{source}: row {row}: field '{key}': '#### {tail}' is not a number")
        messages = [
            {"role": "system", "content": self.env_cfg.system_prompt or DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": question_text(record, self.dataset_cfg, source, row)},
        ]
        return Problem(f"gsm8k-{split}-{row}", messages, truth, {"source": source, "row": row, "solution": solution})

    def reward(self, problem: Problem, completion: str) -> Score:
        return score_final(completion, problem.answer, lenient=self.env_cfg.lenient)
