"""N generator replicas behind one call: prompts are load-balanced, results come back in prompt order.

All n samples of one prompt go to the same replica (so its prefix cache serves them). Work is handed out
in chunks to whichever replica is free first.
"""

from __future__ import annotations

from collections.abc import Callable

import ray

from raylign.actors.generator import GeneratorActor, Prompt
from raylign.config import GeneratorConfig, ModelConfig
from raylign.types import Completion, SamplingSpec


class GeneratorPool:
    def __init__(self, model_path: str, model_cfg: ModelConfig, gen_cfg: GeneratorConfig):
        self.cfg = gen_cfg
        self.actors = [
            GeneratorActor.options(num_cpus=gen_cfg.num_cpus, num_gpus=gen_cfg.num_gpus).remote(
                model_path, model_cfg, gen_cfg, replica=i)
            for i in range(gen_cfg.num_replicas)
        ]
        ray.get([a.ready.remote() for a in self.actors])

    def spec(self, **changes) -> SamplingSpec:
        base = dict(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                    max_new_tokens=self.cfg.max_new_tokens, n=self.cfg.n)
        return SamplingSpec(**{**base, **changes})

    def generate(self, prompts: list[Prompt], spec: SamplingSpec,
                 on_done: Callable[[int], None] | None = None) -> list[list[Completion]]:
        chunk = max(1, min(self.cfg.batch_size, -(-len(prompts) // len(self.actors))))
        pending = [(s, prompts[s:s + chunk]) for s in range(0, len(prompts), chunk)]
        results: list[list[Completion] | None] = [None] * len(prompts)
        free = list(self.actors)
        running: dict = {}
        while pending or running:
            while pending and free:
                start, part = pending.pop(0)
                actor = free.pop(0)
                running[actor.generate.remote(part, spec)] = (start, len(part), actor)
            ready, _ = ray.wait(list(running), num_returns=1)
            start, size, actor = running.pop(ready[0])
            results[start:start + size] = ray.get(ready[0])
            free.append(actor)
            if on_done:
                on_done(size)
        return results  # type: ignore[return-value]

    def load_weights(self, path: str, version: int) -> list[float]:
        return ray.get([a.load_weights.remote(path, version) for a in self.actors])

    def reseed(self, seed: int) -> None:
        ray.get([a.reseed.remote(seed + 7919 * i) for i, a in enumerate(self.actors)])

    def policy_versions(self) -> list[int]:
        return ray.get([a.policy_version.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
