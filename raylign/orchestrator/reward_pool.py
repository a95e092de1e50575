"""A pool of reward actors. Samples are spread over the actors; an actor that dies (or misses the pool's
backstop deadline) is replaced and its samples score 0, counted as ``reward/actor_failures``. A sample that
killed its actor would likely kill the next one too, so its part is not re-scored. Replacements are counted
as ``fault/reward_restarts``; past ``fault.max_actor_restarts`` the pool raises ``RewardPoolError``."""

from __future__ import annotations

from collections import Counter

import ray

from raylign.actors.reward import RewardActor, RewardFn, failed_score
from raylign.config import Config, DatasetConfig, EnvConfig, FaultConfig, RagConfig, RewardConfig
from raylign.types import Problem, Score
from raylign.orchestrator.faults import ACTOR_FAULTS, RestartBudget, RestartLimitError, fault_cause


class RewardPoolError(RestartLimitError):
    """Reward actors failed more often than ``fault.max_actor_restarts`` allows."""


class RewardPool:
    def __init__(self, env_cfg: EnvConfig, dataset_cfg: DatasetConfig, cfg: RewardConfig,
                 reward_fn: RewardFn | None = None, rag_cfg: RagConfig | None = None,
                 fault_cfg: FaultConfig | None = None, full_cfg: Config | None = None, services: dict | None = None):
        self.args = (env_cfg, dataset_cfg, cfg.timeout_s, reward_fn, rag_cfg, full_cfg, services, cfg.concurrency)
        self.cfg = cfg
        self.fault = fault_cfg or FaultConfig()
        self.restarts = RestartBudget("reward", self.fault.max_actor_restarts, "fault.max_actor_restarts",
                                      RewardPoolError)
        self.actors = [self._start() for _ in range(cfg.num_actors)]
        self.failures: Counter[str] = Counter()

    def _start(self):
        return RewardActor.options(num_cpus=self.cfg.num_cpus, resources=self.cfg.resources or None).remote(*self.args)

    def _replace(self, i: int, cause: str) -> None:
        self.restarts.spend(f"reward actor {i}", cause)
        ray.kill(self.actors[i])
        self.actors[i] = self._start()

    def score(self, items: list[tuple[Problem, str]]) -> list[Score]:
        n = len(self.actors)
        parts = [items[i::n] for i in range(n)]
        refs = [a.score.remote(p) for a, p in zip(self.actors, parts, strict=True)]
        scored: list[list[Score]] = []
        for i, (ref, part) in enumerate(zip(refs, parts, strict=True)):
            # Backstop beyond the per-sample timeout: a wedged actor must not stall the run.
            deadline_s = self.cfg.timeout_s * (len(part) + 2) + 30
            try:
                scored.append(ray.get(ref, timeout=deadline_s))
            except ACTOR_FAULTS as e:
                self.failures["actor_failures"] += 1
                self._replace(i, fault_cause(e, deadline_s))
                scored.append([failed_score("actor_failure", type(e).__name__) for _ in part])
        out: list[Score] = [None] * len(items)  # type: ignore[list-item]
        for i, part_scores in enumerate(scored):
            out[i::n] = part_scores
        return out

    def counters(self) -> dict[str, int]:
        """Reward events summed over the actors; a dead actor's events die with it (it is replaced)."""
        total = Counter(self.failures)
        refs = [a.counters.remote() for a in self.actors]
        for i, ref in enumerate(refs):
            try:
                total.update(ray.get(ref, timeout=self.fault.call_timeout_s))
            except ACTOR_FAULTS as e:
                self._replace(i, f"counters: {fault_cause(e, self.fault.call_timeout_s)}")
        return dict(total)

    def fault_counters(self) -> dict[str, int]:
        return self.restarts.counters()

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
