"""Losses the trainer can run by name: ``loss_fn(logprobs_B_T=, mask_B_T=, **fields, **loss_kwargs) -> (loss, metrics)``.

The trainer workers resolve ``train_step(loss_name=...)`` here. A new loss is a pure function with that
signature plus one entry below; its batch fields (``advantages_B``, ``old_logprobs_B_T``, ...) arrive as
tensors named like the TrainBatch fields, and an ``agg`` keyword (token | sequence | fixed) tells the
trainer how to weight gradient-accumulation micro-batches. A loss whose signature names ``values_B_T`` (the
critic's V(s_t), with grad) or ``entropy_B_T`` (the policy's per-token entropy, with grad) gets them from the
trainer's forward: "ppo" needs both, "value" needs values_B_T, "policy_entropy" needs entropy_B_T.
"""

from __future__ import annotations

from collections.abc import Callable

from raylign.algorithms.losses import policy_entropy_loss, policy_gradient_loss, ppo_loss, value_only_loss



def policy_gradient_on_policy_loss(logprobs_B_T, **kwargs):
    """One update per batch: the sampling policy is the current one, so old log-probs are the detached
    current ones (ratio exactly 1) and no separate forward pass is spent computing them."""
    return policy_gradient_loss(logprobs_B_T=logprobs_B_T, old_logprobs_B_T=logprobs_B_T.detach(), **kwargs)


LOSSES: dict[str, Callable] = {
    "policy_gradient": policy_gradient_loss,
    "policy_gradient_on_policy": policy_gradient_on_policy_loss,
    "policy_entropy": policy_entropy_loss,
    "ppo": ppo_loss,
    "value": value_only_loss,
}
