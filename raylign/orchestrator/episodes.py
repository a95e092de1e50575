"""Multi-turn tool-use rollouts behind the single-turn interfaces the loop already uses.

``ToolEpisodes`` has GeneratorPool's ``spec``/``generate`` signature but runs whole search-agent episodes
(``envs.rag.episode.run_episodes``): each turn is one batched call to the generator replicas and one to the
retriever actors. ``CombinedRewards`` has RewardPool's ``score``/``counters`` signature and turns the
per-sample reward components of a batch into one reward each (``rag.combine``: uniform, std, PCA, L2).
``rollout_stack`` picks the plain or the tool-use pair from the config, so the training loop, the evals and
``raylign eval`` never branch on the env.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from raylign.config import Config
from raylign.types import Problem, Score
from raylign.envs.rag.episode import run_episodes
from raylign.envs.rag.rewards import combine_batch
from raylign.orchestrator.generator_pool import GeneratorPool
from raylign.orchestrator.retriever_pool import RetrieverPool
from raylign.orchestrator.reward_pool import RewardPool
from raylign.types import Completion, SamplingSpec


class ToolEpisodes:
    def __init__(self, generators: GeneratorPool, retrievers: RetrieverPool, tokenizer, cfg: Config):
        self.generators, self.retrievers, self.tokenizer, self.cfg = generators, retrievers, tokenizer, cfg
        self.search_calls = 0
        self.search_s = 0.0

    def spec(self, **changes) -> SamplingSpec:
        return self.generators.spec(**changes)

    def _generate(self, contexts: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                  stop: tuple[str, ...]) -> list[list[Completion]]:
        spec = self.generators.spec(n=n, temperature=temperature, max_new_tokens=max_new_tokens, stop=tuple(stop))
        return self.generators.generate(contexts, spec)

    def _search(self, queries: list[str], k: int):
        self.search_calls += 1
        start = time.perf_counter()
        try:
            return self.retrievers.search(queries, k)
        finally:
            self.search_s += time.perf_counter() - start

    def generate(self, prompts_ids: list[list[int]], spec: SamplingSpec,
                 on_done: Callable[[int], None] | None = None) -> list[list[Completion]]:
        groups = run_episodes(prompts_ids, spec.n, spec.temperature, self._generate, self._search, self.tokenizer,
                              self.cfg.rag, self.cfg.model.max_model_len)
        if on_done:
            on_done(len(prompts_ids))
        return groups

    def fault_counters(self) -> dict[str, int]:
        return self.retrievers.fault_counters()  # the generators report their own

    def shutdown(self) -> None:
        self.retrievers.shutdown()


class CombinedRewards:
    def __init__(self, pool: RewardPool, method: str):
        self.pool, self.method = pool, method

    def score(self, items: list[tuple[Problem, str]]) -> list[Score]:
        scores = self.pool.score(items)
        rewards = combine_batch(scores, self.method)
        return [replace(s, reward=r, info={**s.info, "reward_uniform": s.reward}) for s, r in zip(scores, rewards, strict=True)]

    def counters(self) -> dict[str, int]:
        return self.pool.counters()

    def fault_counters(self) -> dict[str, int]:
        return self.pool.fault_counters()

    def shutdown(self) -> None:
        self.pool.shutdown()


def rollout_stack(cfg: Config, generators: GeneratorPool, rewards: RewardPool, tokenizer):
    """(rollouts, rewards): the pools themselves, or their tool-use wrappers for env.name=rag."""
    if cfg.env.name != "rag":
        return generators, rewards
    retrievers = RetrieverPool(cfg, fault_cfg=cfg.fault)
    return ToolEpisodes(generators, retrievers, tokenizer, cfg), CombinedRewards(rewards, cfg.rag.combine)
