"""Supervised fine-tuning: maximise log pi(response | prompt) on the response tokens only.

Loss: the token mean of -log pi(y_t | x, y_<t) over the response tokens of the batch (``sft_loss``), the
chat template applied to the prompt as at generation time, and the response followed by the end-of-turn
token, so a fine-tuned model stops where the data does. Packing: each example becomes one sequence whose
"prompt" is the prefix all the batch's prompts share (the chat template's system turn and the user header;
at least the first token) and whose completion is the rest of its prompt (loss mask 0) plus the response
(loss mask 1). The trainer then packs many examples into one row behind one copy of that prefix with a
block-diagonal mask, as it packs the samples of one prompt: the prefix is computed once per row, and short
examples don't pay for a long one's padding. Every example's tokens see exactly what they see unpacked (the
prefix is each example's own first tokens, at the same positions).
The weights reach the generators lazily: before the next eval or generate, not after every step.
"""

from __future__ import annotations

from raylign.algorithms.protocol import Cluster, StepOutput
from raylign.types import Example, TrainBatch


def shared_prefix(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix of ``sequences``, at most the shortest one's length minus one."""
    n = min(len(s) for s in sequences) - 1
    for k in range(max(n, 0)):
        if any(s[k] != sequences[0][k] for s in sequences):
            return k
    return max(n, 0)


def supervised_batch(encoded: list[tuple[list[int], list[int]]]) -> TrainBatch:
    """(prompt ids, response ids) pairs as packable sequences: shared prompt prefix | rest of prompt + response."""
    k = max(shared_prefix([p for p, _ in encoded]), 1)
    return TrainBatch(
        prompt_ids=[p[:k] for p, _ in encoded],
        completion_ids=[p[k:] + r for p, r in encoded],
        loss_mask=[[0] * (len(p) - k) + [1] * len(r) for p, r in encoded],
    )


def sft_step(cluster: Cluster, examples: list[Example], cfg, state: dict) -> StepOutput:
    """encode -> one optimizer step on the response tokens -> mark the weights for the next sync."""
    encoded = cluster.encode([e.prompt for e in examples], [e.response for e in examples])
    metrics = cluster.train_step(supervised_batch(encoded), "sft", {}, 1)
    metrics.update(cluster.sync_weights(lazy=True))
    records = [{"example_id": e.id, "source": e.source, "response": e.response, "tokens": len(r)}
               for e, (_, r) in zip(examples, encoded, strict=True)]
    return StepOutput(metrics, records)
