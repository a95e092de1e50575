"""RewardActor: scores completions with the env's reward function, never letting one sample kill the run.

Each sample runs in a worker thread with a timeout. A reward function that raises, hangs past the timeout or
returns NaN scores 0 for that sample, and the event is counted. A hung thread cannot be killed in Python, so
the executor is replaced and the stuck thread is abandoned.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import ray

from raylign.config import DatasetConfig, EnvConfig, RagConfig
from raylign.envs import make_env
from raylign.types import Problem, Score

RewardFn = Callable[[Problem, str], Score]


def failed_score(event: str, detail: str = "") -> Score:
    return Score(reward=0.0, correct=False, prediction=None, format_ok=False, info={"reward_event": event, "detail": detail})


@ray.remote
class RewardActor:
    def __init__(self, env_cfg: EnvConfig, dataset_cfg: DatasetConfig, timeout_s: float, reward_fn: RewardFn | None = None,
                 rag_cfg: RagConfig | None = None):
        if reward_fn is None:
            env = make_env(env_cfg, dataset_cfg, rag_cfg)
            getattr(env, "warmup", lambda: None)()
            reward_fn = env.reward
        self.reward_fn = reward_fn
        self.timeout_s = timeout_s
        self.events: Counter[str] = Counter()
        self.pool = ThreadPoolExecutor(max_workers=4)

    def score(self, items: list[tuple[Problem, str]]) -> list[Score]:
        return [self._score_one(problem, text) for problem, text in items]

    def counters(self) -> dict[str, int]:
        return dict(self.events)

    def pid(self) -> int:
        """Test hook: the fault tests SIGKILL this process."""
        return os.getpid()

    def _score_one(self, problem: Problem, text: str) -> Score:
        future = self.pool.submit(self.reward_fn, problem, text)
        try:
            score = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self.events["timeout"] += 1
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = ThreadPoolExecutor(max_workers=4)
            return failed_score("timeout", f"{problem.id}: reward took over {self.timeout_s}s")
        except Exception as e:  # noqa: BLE001 - any reward bug must cost one sample, not the run
            self.events["error"] += 1
            return failed_score("error", f"{problem.id}: {type(e).__name__}: {e}")
        if not isinstance(score, Score) or not math.isfinite(score.reward):
            self.events["nan"] += 1
            return failed_score("nan", f"{problem.id}: reward returned {getattr(score, 'reward', score)!r}")
        return score


