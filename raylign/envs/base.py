"""What every environment provides: problems to pose and a reward for a completion.

Envs are plain Python (no Ray, no vLLM): actors wrap them. Single-turn math envs implement
``problems`` and ``reward``; multi-turn envs (tool use) add ``step``, which returns the next
observation to append to the trajectory or ``None`` when the episode is over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


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


class Env(Protocol):
    name: str

    def problems(self, split: str) -> list[Problem]: ...

    def reward(self, problem: Problem, completion: str) -> Score: ...

    # Optional: ``warmup(self) -> None`` loads what ``reward`` needs (models, indexes) before the first timed
    # call; reward actors run it when they start.
