"""Generation backends behind one interface; the generator actor picks one by name.

Each is built as ``GENERATORS[name](model_path, model_cfg, gen_cfg, lora_rank=None)``; ``lora_rank`` (the
trainer's LoRA rank, None without LoRA) lets the engine serve adapter folders.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from raylign.types import Completion, SamplingSpec

if TYPE_CHECKING:
    import torch


class GenerationBackend(Protocol):
    def generate(self, prompts_ids: list[list[int]], spec: SamplingSpec) -> list[list[Completion]]: ...

    def load_weights(self, path: str, version: int) -> None:
        """Serve ``path``: a safetensors file of full weights, or a peft LoRA adapter folder."""

    def load_state(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Serve full weights given as (HF name, tensor) pairs, consumed once in order (the ray transport)."""

    def reseed(self, seed: int) -> None: ...


def _vllm(*args, **kwargs) -> GenerationBackend:
    from raylign.actors.backends.vllm_backend import VLLMBackend  # imports vllm only when chosen

    return VLLMBackend(*args, **kwargs)


def _hf(*args, **kwargs) -> GenerationBackend:
    from raylign.actors.backends.hf_backend import HFBackend

    return HFBackend(*args, **kwargs)


GENERATORS = {"vllm": _vllm, "hf": _hf}
