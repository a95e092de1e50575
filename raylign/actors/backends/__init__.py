"""Generation backends behind one interface; the generator actor picks one by name.

Each is built as ``GENERATORS[name](model_path, model_cfg, gen_cfg, lora_rank=None)``; ``lora_rank`` (the
trainer's LoRA rank, None without LoRA) lets the engine serve adapter folders.
"""

from __future__ import annotations

from typing import Protocol

from raylign.types import Completion, SamplingSpec


class GenerationBackend(Protocol):
    def generate(self, prompts_ids: list[list[int]], spec: SamplingSpec) -> list[list[Completion]]: ...

    def load_weights(self, path: str, version: int) -> None:
        """Serve ``path``: a safetensors file of full weights, or a peft LoRA adapter folder."""

    def reseed(self, seed: int) -> None: ...


def _vllm(*args, **kwargs) -> GenerationBackend:
    from raylign.actors.backends.vllm_backend import VLLMBackend  # imports vllm only when chosen

    return VLLMBackend(*args, **kwargs)


def _hf(*args, **kwargs) -> GenerationBackend:
    from raylign.actors.backends.hf_backend import HFBackend

    return HFBackend(*args, **kwargs)


GENERATORS = {"vllm": _vllm, "hf": _hf}
