"""What every environment provides: problems to pose and a reward for a completion.

Envs are plain Python (no Ray, no vLLM): actors wrap them. Single-turn math envs implement
``problems`` and ``reward``; multi-turn envs (tool use) add ``step``, which returns the next
observation to append to the trajectory or ``None`` when the episode is over.
"""

from __future__ import annotations

from typing import Protocol

from raylign.types import Problem, Score


class Env(Protocol):
    name: str

    def problems(self, split: str) -> list[Problem]: ...

    def reward(self, problem: Problem, completion: str) -> Score: ...

    # Optional: ``warmup(self) -> None`` loads what ``reward`` needs (models, indexes) before the first timed
    # call; reward actors run it when they start.
