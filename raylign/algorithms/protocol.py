"""The narrow surface algorithms use to reach the cluster.

The orchestrator implements it over Ray actors (generator replicas, reward actors, Ray Train workers);
unit tests implement it in-process. Algorithms never see a Ray handle.
"""

from __future__ import annotations

from typing import Protocol

from raylign.envs.base import Problem, Score
from raylign.types import Completion, TrainBatch


class Cluster(Protocol):
    def generate(self, problems: list[Problem], n: int, temperature: float) -> list[list[Completion]]:
        """n samples per problem from the current policy, in problem order."""

    def score(self, problems: list[Problem], groups: list[list[Completion]]) -> list[list[Score]]:
        """Rewards for every completion, same nesting as ``groups``."""

    def logprobs(self, batch: TrainBatch, which: str = "policy") -> list[list[float]]:
        """Per-token log-probs of each completion under the policy or the frozen reference ("ref")."""

    def train_step(self, batch: TrainBatch, loss_name: str, loss_kwargs: dict, minibatches: int = 1) -> dict[str, float]:
        """One pass of optimizer steps over ``batch`` with a registered loss; returns metrics."""

    def sync_weights(self) -> dict[str, float]:
        """Push the trainer's weights to every generator; the policy version goes up by one."""


def completions_batch(groups: list[list[Completion]]) -> TrainBatch:
    """Flatten P groups of G completions into a P*G-sequence batch (row-major: prompt, then sample)."""
    flat = [c for group in groups for c in group]
    return TrainBatch(
        prompt_ids=[c.prompt_ids for c in flat],
        completion_ids=[c.token_ids for c in flat],
        loss_mask=[getattr(c, "loss_mask", None) or [1] * len(c.token_ids) for c in flat],
    )
