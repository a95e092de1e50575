"""GeneratorActor: one generation engine replica (vLLM or transformers) behind a Ray actor."""

from __future__ import annotations

import time

import ray

from raylign.actors.backends import GENERATORS
from raylign.chat import encode_chat
from raylign.config import GeneratorConfig, ModelConfig
from raylign.types import Completion, SamplingSpec

Prompt = list[int] | list[dict[str, str]]  # token ids, or chat messages rendered with the model's template


@ray.remote
class GeneratorActor:
    def __init__(self, model_path: str, model_cfg: ModelConfig, gen_cfg: GeneratorConfig, replica: int = 0):
        from transformers import AutoTokenizer

        self.replica = replica
        self.version = 0
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
        self.backend = GENERATORS[gen_cfg.backend](model_path, model_cfg, gen_cfg)

    def ready(self) -> int:
        return self.replica

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[list[Completion]]:
        prompts_ids = [self._ids(p) for p in prompts]
        groups = self.backend.generate(prompts_ids, spec)
        for group in groups:
            for c in group:
                c.policy_version, c.replica = self.version, self.replica
        return groups

    def load_weights(self, path: str, version: int) -> float:
        """Load a safetensors file written by the trainer; returns seconds taken."""
        start = time.perf_counter()
        self.backend.load_weights(path)
        self.version = version
        return time.perf_counter() - start

    def reseed(self, seed: int) -> None:
        self.backend.reseed(seed)

    def policy_version(self) -> int:
        return self.version

    def _ids(self, prompt: Prompt) -> list[int]:
        if prompt and isinstance(prompt[0], dict):
            return encode_chat(self.tokenizer, prompt)
        return list(prompt)
