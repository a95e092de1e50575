"""GeneratorActor: one generation engine replica (vLLM or transformers) behind a Ray actor.

``pid`` and ``inject_hang`` are test hooks: the fault tests SIGKILL the process, or make the next generate
call stall as a wedged engine would; GeneratorPool must recover from both.
"""

from __future__ import annotations

import os
import time

import ray

from raylign.actors.backends import GENERATORS
from raylign.chat import encode_chat
from raylign.config import GeneratorConfig, ModelConfig
from raylign.types import Completion, SamplingSpec

Prompt = list[int] | list[dict[str, str]]  # token ids, or chat messages rendered with the model's template


@ray.remote
class GeneratorActor:
    def __init__(self, model_path: str, model_cfg: ModelConfig, gen_cfg: GeneratorConfig, replica: int = 0,
                 lora_rank: int | None = None):
        import torch
        from transformers import AutoTokenizer

        # Ray sets OMP_NUM_THREADS to the actor's logical CPUs (often 1); in synchronous RL nothing else computes
        # while the replicas generate, so they share the machine's cores.
        torch.set_num_threads(gen_cfg.torch_threads or max(1, (os.cpu_count() or 1) // gen_cfg.num_replicas))
        self.replica = replica
        self.version = 0
        self.hang_s = 0.0
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=model_cfg.trust_remote_code)
        self.backend = GENERATORS[gen_cfg.backend](model_path, model_cfg, gen_cfg, lora_rank=lora_rank)

    def ready(self) -> int:
        return self.replica

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[list[Completion]]:
        if self.hang_s:
            hang, self.hang_s = self.hang_s, 0.0
            time.sleep(hang)
        prompts_ids = [self._ids(p) for p in prompts]
        groups = self.backend.generate(prompts_ids, spec)
        for group in groups:
            for c in group:
                c.policy_version, c.replica = self.version, self.replica
        return groups

    def load_weights(self, path: str, version: int) -> float:
        """Serve the trainer's weights for ``version``: a safetensors file of full weights, or a peft LoRA adapter
        folder (needs ``lora_rank`` on vLLM); returns seconds taken. A bad folder raises ``AdapterError`` and the
        previous weights and version stay."""
        start = time.perf_counter()
        self.backend.load_weights(path, version)
        self.version = version
        return time.perf_counter() - start

    def reseed(self, seed: int) -> None:
        self.backend.reseed(seed)

    def policy_version(self) -> int:
        return self.version

    def pid(self) -> int:
        return os.getpid()

    def inject_hang(self, seconds: float) -> None:
        """Test hook: the next generate call sleeps this long before working."""
        self.hang_s = seconds

    def _ids(self, prompt: Prompt) -> list[int]:
        if prompt and isinstance(prompt[0], dict):
            return encode_chat(self.tokenizer, prompt)
        return list(prompt)
