"""Small picklable records shared by envs, algorithms, actors and the orchestrator (the lowest layer).

A ``Problem`` is what an env poses and a ``Score`` what its reward returns; an ``Example`` (SFT) and a
``Pair`` (preference training) are what the offline algorithms read. A ``Completion`` keeps the exact token
ids the generator produced, so nothing is re-tokenized between generation, scoring and training;
``policy_version`` says which weights produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One task instance: chat messages to pose and the ground truth to score against."""

    id: str
    messages: list[dict[str, str]]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Score:
    """A reward with what was read from the completion."""

    reward: float
    correct: bool
    prediction: str | None
    format_ok: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Example:
    """One supervised example: the chat messages before the response, and the response to train on.

    ``source`` names where it came from (``file:row``), for error messages.
    """

    id: str
    prompt: list[dict[str, str]]
    response: str
    source: str = ""


@dataclass(frozen=True)
class Pair:
    """One preference pair: a prompt (chat messages), a preferred and a dispreferred response.

    ``scores_chosen`` / ``scores_rejected`` (stepwise DPO) hold one score in [0, 1] per step of the response
    (steps are its non-empty lines) or per response token; None when the pair carries no step scores.
    """

    id: str
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    scores_chosen: tuple[float, ...] | None = None
    scores_rejected: tuple[float, ...] | None = None
    source: str = ""
    answer: str | None = None  # the prompt's ground truth when known: Monte Carlo step scores need it


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample; one spec per generate call."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens


@dataclass
class Completion:
    """One sampled continuation of one prompt."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]  # of each token under the distribution it was sampled from (tempered; greedy: raw)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    policy_version: int = 0
    replica: int = 0
    # Multi-turn episodes: 1 on tokens the policy wrote, 0 on tool output spliced in (None = all 1), and
    # what the episode did (tool calls, retrieved ids, turns); single-turn completions leave both unset.
    loss_mask: list[int] | None = None
    info: dict = field(default_factory=dict)


@dataclass
class TrainBatch:
    """Sequences to train on, as the generator produced them, plus per-sequence or per-token fields.

    ``loss_mask[i]`` has one 0/1 per completion token (0 for tool output in multi-turn episodes).
    ``fields`` maps a loss-function argument name to one value per sequence: a float (``advantages_B``)
    or a list aligned with the completion tokens (``old_logprobs_B_T``, ``ref_logprobs_B_T``). The trainer
    pads them into tensors and calls the loss with ``logprobs_B_T``, ``mask_B_T`` and these fields.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    loss_mask: list[list[int]]
    fields: dict[str, list] = field(default_factory=dict)
    # Group of each sequence (consecutive runs: the G samples of one prompt, the two halves of a pair). The
    # trainer keeps a group on one rank and in one micro-batch. None: every sequence is its own group.
    group_B: list[int] | None = None
    temperature: float = 1.0  # the sampling temperature: the trainer's log-probs are of logits / temperature

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, indices: list[int]) -> TrainBatch:
        return TrainBatch(
            prompt_ids=[self.prompt_ids[i] for i in indices],
            completion_ids=[self.completion_ids[i] for i in indices],
            loss_mask=[self.loss_mask[i] for i in indices],
            fields={k: [v[i] for i in indices] for k, v in self.fields.items()},
            group_B=None if self.group_B is None else [self.group_B[i] for i in indices],
            temperature=self.temperature,
        )
