"""Question answering with a search tool over a document store (the multi-turn RAG agent env).

Each QA record (question, answer, doc_id) becomes a Problem whose system prompt explains the two tools;
the episode itself runs in ``episode.run_episodes`` and the reward reads the finished trajectory text
(``rewards.score_trajectory``): components in ``Score.info["components"]``, ``reward`` their uniform
mean, and ``rewards.combine_batch`` for the configured batch combination. Records come from a mapping
split -> records or a callable ``records(split)``, so this module never imports the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Protocol

from raylign.config import RagConfig
from raylign.types import Problem, Score
from raylign.envs.rag.rewards import COMPONENTS, Embed, minilm_embed, score_trajectory

SYSTEM_PROMPT = (
    "Answer with the help of a search tool. Write <search>keywords</search> to search; results come back in "
    "<result></result>. Finish with <answer>short answer</answer>. You have at most {max_turns} turns."
)
# One worked exchange before the question. Measured on SmolLM2-135M-Instruct (4 questions x 4 samples, T=1):
# with the instructions alone (system or user message) it never writes a tagged search (0/16); after this
# example it does in 6/16, which gives GRPO something to reinforce. The example's facts are invented and
# appear in no corpus.
EXAMPLE = [
    {"role": "user", "content": "Who founded the Dravik Society?"},
    {"role": "assistant", "content": "<search>Dravik Society founder</search>"},
    {"role": "user", "content": "<result>\n[example] The Dravik Society was founded in 1901 by Ona Pell.\n</result>"},
    {"role": "assistant", "content": "<answer>Ona Pell</answer>"},
]


class QARecordLike(Protocol):
    question: str
    answer: str
    doc_id: str


def build_messages(question: str, max_turns: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT.format(max_turns=max_turns)}, *EXAMPLE,
            {"role": "user", "content": question}]


class RagEnv:
    """Env protocol for QA records; ``reward(problem, text)`` scores a finished episode's text."""

    name = "rag"

    def __init__(self, records: Mapping[str, Sequence[QARecordLike]] | Callable[[str], Sequence[QARecordLike]],
                 cfg: RagConfig, embed: Embed | None = None):
        unknown = [n for n in cfg.rewards if n not in COMPONENTS]
        if unknown or not cfg.rewards:
            raise ValueError(f"rag.rewards {cfg.rewards}: unknown {unknown}; known: {', '.join(COMPONENTS)}")
        self.records = records
        self.cfg = cfg
        self.embed = embed or minilm_embed  # loaded on first use, never for problems()

    def _records(self, split: str) -> Sequence[Any]:
        if callable(self.records):
            return self.records(split)
        if split not in self.records:
            raise ValueError(f"rag env has splits {sorted(self.records)}, not {split!r}")
        return self.records[split]

    def problems(self, split: str) -> list[Problem]:
        return [Problem(f"rag-{split}-{i}", build_messages(r.question, self.cfg.max_turns), str(r.answer),
                        {"gold_doc": str(r.doc_id)})
                for i, r in enumerate(self._records(split))]

    def warmup(self) -> None:
        """Load the similarity embedder now, so the first reward does not spend its timeout loading it."""
        if "similarity" in self.cfg.rewards:
            self.embed(["warm up"])

    def reward(self, problem: Problem, completion: str) -> Score:
        return score_trajectory(problem, completion, list(self.cfg.rewards), self.embed, self.cfg.max_query_chars)
