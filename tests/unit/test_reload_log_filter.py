"""vLLM's reload warnings: the expected gaps (rotary buffers, a tied LM head) are dropped, real ones kept."""

import logging

from raylign.actors.backends.vllm_ext import _ExpectedReloadGaps


def _record(layer: str, msg: str = "%s: Failed to load weights") -> logging.LogRecord:
    return logging.LogRecord("vllm", logging.WARNING, __file__, 1, msg, (layer,), None)


def test_expected_gaps_are_dropped_and_real_ones_kept():
    tied, untied = _ExpectedReloadGaps(tied=True), _ExpectedReloadGaps(tied=False)
    assert not tied.filter(_record("RotaryEmbedding")) and not untied.filter(_record("Llama3RotaryEmbedding"))
    assert not tied.filter(_record("ParallelLMHead"))
    assert untied.filter(_record("ParallelLMHead"))  # an untied head must receive its weights
    assert tied.filter(_record("QKVParallelLinear"))
    assert tied.filter(_record("RotaryEmbedding", "%s: Delayed processing"))
