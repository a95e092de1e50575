"""vLLM worker extension: reload weights in place, from a safetensors file the trainer wrote or from tensors.

Loaded by name inside vLLM's engine process (``LLM(worker_extension_cls=...)``). The method name must not be
``update_weights``: vLLM's CPU worker already defines one.

Tied embeddings need care. The checkpoint loader skips ``lm_head.weight`` when it is tied, so vLLM's
layerwise reload sees an LM head that received no weights and puts its *old* tensors back; on CPU the head
also holds a prepacked (oneDNN) copy of the matrix. After a reload we re-tie the head to the new embedding
and re-run its post-load processing, or the logits keep coming from the old weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from raylign.actors.backends.weights import iter_safetensors

_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _ExpectedReloadGaps(logging.Filter):
    """Drops vLLM's "<layer>: Failed to load weights" for layers a checkpoint never holds: rotary embeddings
    (buffers computed from the config) and a tied LM head (re-tied below). Every other layer still warns."""

    def __init__(self, tied: bool):
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "%s: Failed to load weights" or not record.args:
            return True
        layer = str(record.args[0])
        return not (layer.endswith("RotaryEmbedding") or (self.tied and layer == "ParallelLMHead"))


class WeightReloadExtension:
    def raylign_reload_weights(self, path: str) -> int:
        return self.raylign_load_weights(iter_safetensors(path))

    def raylign_load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Reload from (HF name, tensor) pairs, streamed: the caller's iterator may fetch them as it goes."""
        hf_config = self.model_runner.model_config.hf_config
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        skip = frozenset({"lm_head.weight"}) if tied else frozenset()
        reload_logger = logging.getLogger(_RELOAD_LOGGER)
        if not any(isinstance(f, _ExpectedReloadGaps) for f in reload_logger.filters):
            reload_logger.addFilter(_ExpectedReloadGaps(tied))
        count = 0

        def weights():
            nonlocal count
            for item in tensors:
                if item[0] not in skip:
                    count += 1
                    yield item

        self.model_runner.reload_weights(weights_iterator=weights())
        if tied:
            self._retie_lm_head()
        return count

    def raylign_reseed(self, seed: int) -> None:
        # Requests without their own seed draw sampling noise from the global torch RNG; reseeding it per step
        # makes a step's samples a function of (seed, step, weights), which exact resume needs.
        import torch

        torch.manual_seed(seed)

    def _retie_lm_head(self) -> None:
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.model.embed_tokens
        if lm_head is None or not hasattr(embed, "weight"):
            return
        lm_head.weight = embed.weight
        process = getattr(lm_head.quant_method, "process_weights_after_loading", None)
        if process is not None:
            process(lm_head)
