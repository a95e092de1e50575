"""A pool of reward actors. Samples are spread over the actors; an actor that dies is replaced and its
samples score 0, counted as ``reward/actor_failures``."""

from __future__ import annotations

from collections import Counter

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from raylign.actors.reward import RewardActor, RewardFn, failed_score
from raylign.config import DatasetConfig, EnvConfig, RagConfig, RewardConfig
from raylign.envs.base import Problem, Score


class RewardPool:
    def __init__(self, env_cfg: EnvConfig, dataset_cfg: DatasetConfig, cfg: RewardConfig,
                 reward_fn: RewardFn | None = None, rag_cfg: RagConfig | None = None):
        self.args = (env_cfg, dataset_cfg, cfg.timeout_s, reward_fn, rag_cfg)
        self.cfg = cfg
        self.actors = [self._start() for _ in range(cfg.num_actors)]
        self.failures: Counter[str] = Counter()

    def _start(self):
        return RewardActor.options(num_cpus=self.cfg.num_cpus).remote(*self.args)

    def score(self, items: list[tuple[Problem, str]]) -> list[Score]:
        n = len(self.actors)
        parts = [items[i::n] for i in range(n)]
        refs = [a.score.remote(p) for a, p in zip(self.actors, parts, strict=True)]
        scored: list[list[Score]] = []
        for i, (ref, part) in enumerate(zip(refs, parts, strict=True)):
            # Backstop beyond the per-sample timeout: a wedged actor must not stall the run.
            try:
                scored.append(ray.get(ref, timeout=self.cfg.timeout_s * (len(part) + 2) + 30))
            except (GetTimeoutError, RayActorError) as e:
                self.failures["actor_failures"] += 1
                ray.kill(self.actors[i])
                self.actors[i] = self._start()
                scored.append([failed_score("actor_failure", type(e).__name__) for _ in part])
        out: list[Score] = [None] * len(items)  # type: ignore[list-item]
        for i, part_scores in enumerate(scored):
            out[i::n] = part_scores
        return out

    def counters(self) -> dict[str, int]:
        total = Counter(self.failures)
        for counts in ray.get([a.counters.remote() for a in self.actors]):
            total.update(counts)
        return dict(total)
