"""vLLM worker extension: reload weights in place from a safetensors file the trainer wrote.

Loaded by name inside vLLM's engine process (``LLM(worker_extension_cls=...)``). The method name must not be
``update_weights``: vLLM's CPU worker already defines one.
"""

from __future__ import annotations

from raylign.actors.backends.weights import iter_safetensors


class WeightReloadExtension:
    def raylign_reload_weights(self, path: str) -> int:
        hf_config = self.model_runner.model_config.hf_config
        # A tied lm_head shares the embedding; loading it separately would fail or double-count.
        skip = frozenset({"lm_head.weight"}) if getattr(hf_config, "tie_word_embeddings", False) else frozenset()
        count = 0

        def weights():
            nonlocal count
            for item in iter_safetensors(path, skip):
                count += 1
                yield item

        self.model_runner.reload_weights(weights_iterator=weights())
        return count
