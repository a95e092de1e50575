"""Small picklable records that cross actor boundaries.

A ``Completion`` keeps the exact token ids the generator produced, so nothing is re-tokenized between
generation, scoring and training; ``policy_version`` says which weights produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    policy_version: int = 0
    replica: int = 0


@dataclass
class Rollout:
    """A scored completion of one problem, as logged and later trained on."""

    problem_id: str
    sample_index: int
    completion: Completion
    reward: float
    correct: bool
    prediction: str | None
    info: dict = field(default_factory=dict)
