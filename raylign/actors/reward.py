"""RewardActor: scores completions with the env's reward function, never letting one sample kill the run.

Samples run in worker threads (``reward.concurrency`` at once), each with a timeout. A reward function that
raises, hangs past the timeout or returns NaN scores 0 for that sample, and the event is counted. A hung
thread cannot be killed in Python, so the executor is replaced and the stuck thread is abandoned.

Models the env calls while scoring (the AutoDSPy task model, the judge) are ``LMService`` actors handed in
as ``services`` by role; each becomes a plain function for the env. With a judge and an env that does not
judge itself, a sample the env marked wrong gets the judge's verdict (``envs.judge.judged_score``).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import ray

from raylign.config import Config, DatasetConfig, EnvConfig, JudgeConfig, RagConfig
from raylign.envs import make_env
from raylign.envs.judge import judged_score
from raylign.types import Problem, Score

RewardFn = Callable[[Problem, str], Score]


def failed_score(event: str, detail: str = "") -> Score:
    return Score(reward=0.0, correct=False, prediction=None, format_ok=False, info={"reward_event": event, "detail": detail})


def service_complete(service) -> Callable[[list[list[dict[str, str]]], float, int], list[str]]:
    """An ``LMService`` actor as the function envs call: conversations, temperature, token cap -> replies."""
    return lambda conversations, temperature, max_tokens: ray.get(
        service.complete.remote(conversations, temperature, max_tokens))


def with_judge(reward_fn: RewardFn, judge, judge_cfg: JudgeConfig) -> RewardFn:
    """``reward_fn`` followed by the judge stage for envs whose reward has none of its own (math envs)."""
    def ask(messages: list[dict[str, str]]) -> str:
        return judge([messages], 0.0, judge_cfg.max_new_tokens)[0]

    def judged(problem: Problem, text: str) -> Score:
        return judged_score(reward_fn(problem, text), ask, problem.messages[-1]["content"], problem.answer, text,
                            judge_cfg.template)
    return judged


@ray.remote
class RewardActor:
    def __init__(self, env_cfg: EnvConfig, dataset_cfg: DatasetConfig, timeout_s: float, reward_fn: RewardFn | None = None,
                 rag_cfg: RagConfig | None = None, cfg: Config | None = None, services: dict | None = None,
                 concurrency: int = 4):
        models = {role: service_complete(s) for role, s in (services or {}).items()}
        if reward_fn is None:
            env = make_env(env_cfg, dataset_cfg, rag_cfg, cfg=cfg, models=models)
            getattr(env, "warmup", lambda: None)()
            reward_fn = env.reward
            if "judge" in models and env.name != "dspy":  # the dspy env runs its judge on the pipeline's answer
                reward_fn = with_judge(reward_fn, models["judge"], (cfg or Config()).reward.judge)
        self.reward_fn = reward_fn
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.events: Counter[str] = Counter()
        self.pool = ThreadPoolExecutor(max_workers=concurrency)

    def score(self, items: list[tuple[Problem, str]]) -> list[Score]:
        """All items at once on the pool's threads; each gets ``timeout_s`` from when its thread starts it."""
        started: dict[int, float] = {}

        def run(i: int, problem: Problem, text: str):
            started[i] = time.monotonic()
            return self.reward_fn(problem, text)

        # A sample still queued this long after the call began is behind stuck threads: it times out too
        # (the bound of running the samples one after another, which the pool's own deadline also allows).
        backstop = time.monotonic() + self.timeout_s * (len(items) + 1)
        futures = [self.pool.submit(run, i, p, t) for i, (p, t) in enumerate(items)]
        out = [self._settle(i, problem, future, started, backstop) for i, ((problem, _), future) in enumerate(zip(items, futures))]
        if any(s.info.get("reward_event") == "timeout" for s in out):  # abandon the stuck threads with their pool
            self.pool.shutdown(wait=False)
            self.pool = ThreadPoolExecutor(max_workers=self.concurrency)
        return out

    def counters(self) -> dict[str, int]:
        return dict(self.events)

    def pid(self) -> int:
        """Test hook: the fault tests SIGKILL this process."""
        return os.getpid()

    def _settle(self, i: int, problem: Problem, future, started: dict[int, float], backstop: float) -> Score:
        while True:
            begun = started.get(i)
            deadline = backstop if begun is None else begun + self.timeout_s
            try:
                score = future.result(timeout=max(0.0, deadline - time.monotonic()))
                break
            except FutureTimeout:
                now = time.monotonic()
                if (started.get(i) is None and now < backstop) or (started.get(i) is not None
                                                                     and now < started[i] + self.timeout_s):
                    continue  # still queued behind other samples, or started while this wait ran
                self.events["timeout"] += 1
                return failed_score("timeout", f"{problem.id}: reward took over {self.timeout_s}s")
            except Exception as e:  # noqa: BLE001 - any reward bug must cost one sample, not the run
                self.events["error"] += 1
                return failed_score("error", f"{problem.id}: {type(e).__name__}: {e}")
        if not isinstance(score, Score) or not math.isfinite(score.reward):
            self.events["nan"] += 1
            return failed_score("nan", f"{problem.id}: reward returned {getattr(score, 'reward', score)!r}")
        return score
