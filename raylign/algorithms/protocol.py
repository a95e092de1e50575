"""The narrow surface algorithms use to reach the cluster.

The orchestrator implements it over Ray actors (generator replicas, reward actors, Ray Train workers);
unit tests implement it in-process. Algorithms never see a Ray handle.
"""

from __future__ import annotations

from typing import Protocol

from raylign.types import Problem, Score
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

    def sync_weights(self) -> dict[str, float]:
        """Push the trainer's weights to every generator; the policy version goes up by one."""


def completions_batch(groups: list[list[Completion]]) -> TrainBatch:
    """Flatten P groups of G completions into a P*G-sequence batch (row-major: prompt, then sample)."""
    flat = [c for group in groups for c in group]
    return TrainBatch(
        prompt_ids=[c.prompt_ids for c in flat],
        completion_ids=[c.token_ids for c in flat],
        loss_mask=[c.loss_mask if c.loss_mask is not None else [1] * len(c.token_ids) for c in flat],
    )
