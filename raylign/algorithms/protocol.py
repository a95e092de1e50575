"""The narrow surface algorithms use to reach the cluster.

The orchestrator implements it over Ray actors (generator replicas, reward actors, Ray Train workers);
unit tests implement it in-process. Algorithms never see a Ray handle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from raylign.types import Completion, Problem, Score, TrainBatch


class Cluster(Protocol):
    max_new_tokens: int  # the generation budget per response (Dr.GRPO's fixed-length normaliser)

    def generate(self, problems: list[Problem], n: int, temperature: float) -> list[list[Completion]]:
        """n samples per problem from the current policy, in problem order."""

    def next_prompts(self, n: int) -> list[Problem]:
        """n more training prompts from the run's prompt stream, consumed like the step's own (DAPO's dynamic
        sampling asks for them when it drops groups)."""

    def score(self, problems: list[Problem], groups: list[list[Completion]]) -> list[list[Score]]:
        """Rewards for every completion, same nesting as ``groups``."""

    def logprobs(self, batch: TrainBatch, which: str = "policy") -> list[list[float]]:
        """Per-token log-probs of each completion under the policy or the frozen reference ("ref")."""

    def train_step(self, batch: TrainBatch, loss_name: str, loss_kwargs: dict, minibatches: int = 1) -> dict[str, float]:
        """One pass of optimizer steps over ``batch`` with a registered loss; returns metrics."""

    def continue_from(self, prefixes: list[list[int]], n: int, temperature: float,
                      max_new_tokens: int | None = None) -> list[list[Completion]]:
        """n continuations of each token-id prefix (prompt + partial response) from the current policy.

        All n continuations of one prefix go to one replica (its prefix cache serves them); token_ids hold only
        the new tokens. Used for Monte Carlo value estimates; never trained on.
        """

    def token_pieces(self, token_ids: list[list[int]]) -> list[list[str]]:
        """The text each token adds, decoded in context: ''.join(pieces) == tokenizer.decode(ids)."""

    def values(self, batch: TrainBatch) -> list[list[float]]:
        """The critic's V(s_t) for each completion token t (the state before token t is emitted)."""

    def sync_weights(self, lazy: bool = False) -> dict[str, float]:
        """Push the trainer's weights to every generator; the policy version goes up by one. ``lazy``: the
        weights travel before the next generate or eval instead (steps that never sample)."""

    def encode(self, prompts: list[list[dict[str, str]]], responses: list[str]) -> list[tuple[list[int], list[int]]]:
        """Token ids of (chat prompt, response + end of turn), exactly as the generator would produce them."""

    def judge(self, requests: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        """Greedy answers of the frozen judge model to chat requests (built for algorithms that ask for one)."""

    def reset_policy(self) -> None:
        """Put the trainer back to the initial weights with a fresh optimizer (RestEM's restart from base)."""


@dataclass
class StepOutput:
    """What one step returns: metrics, and the rows it adds to rollouts.jsonl (the loop adds ``step``).

    Rollout algorithms also keep what they sampled (``groups``, ``scores``, ``advantages_P_G``) for callers
    that inspect a step; offline algorithms leave them None.
    """

    metrics: dict[str, float]
    records: list[dict] = field(default_factory=list)
    groups: list[list[Completion]] | None = None
    scores: list[list[Score]] | None = None
    advantages_P_G: torch.Tensor | None = None


# step(cluster, items, algorithm config section, algorithm state) -> StepOutput; ``items`` are the step's
# Problems, Examples or Pairs (the registry entry's data source), ``state`` survives checkpoints.
StepFn = Callable[[Cluster, list, Any, dict], StepOutput]


def completions_batch(groups: list[list[Completion]], temperature: float = 1.0) -> TrainBatch:
    """Flatten P groups of G completions into a P*G-sequence batch (row-major: prompt, then sample).

    Each prompt's samples form one group (kept on one trainer rank and in one micro-batch); ``temperature``
    is the one they were sampled at, so the trainer's log-probs are of the same distribution.
    """
    flat = [c for group in groups for c in group]
    return TrainBatch(
        prompt_ids=[c.prompt_ids for c in flat],
        completion_ids=[c.token_ids for c in flat],
        loss_mask=[c.loss_mask if c.loss_mask is not None else [1] * len(c.token_ids) for c in flat],
        group_B=[i for i, group in enumerate(groups) for _ in group],
        temperature=temperature,
    )


def add_tis(batch: TrainBatch, groups: list[list[Completion]], loss_kwargs: dict, tis_cap: float | None) -> None:
    """Truncated importance sampling (``losses.tis_ratio``), when ``tis_cap`` is set: the generator's log-probs
    of every sampled token become a batch field and the cap a loss knob."""
    if tis_cap is not None:
        batch.fields["gen_logprobs_B_T"] = [c.logprobs for group in groups for c in group]
        loss_kwargs["tis_cap"] = tis_cap
