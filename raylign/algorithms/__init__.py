"""RL algorithms as pure torch functions: advantages, losses and the numerics they share.

Plain Python + torch only (no Ray, vLLM, DeepSpeed, actors or orchestrator): see tests/unit/test_layering.py.
"""

from raylign.algorithms.advantages import ema_baseline_advantages, gae, group_advantages, rloo_advantages
from raylign.algorithms.losses import kl_penalized_rewards, policy_gradient_loss, value_loss
from raylign.algorithms.numerics import (
    aggregate,
    entropy_from_logits,
    kl_estimate,
    masked_mean,
    masked_sum,
    masked_whiten,
)

__all__ = [
    "aggregate", "ema_baseline_advantages", "entropy_from_logits", "gae", "group_advantages", "kl_estimate",
    "kl_penalized_rewards", "masked_mean", "masked_sum", "masked_whiten", "policy_gradient_loss",
    "rloo_advantages", "value_loss",
]
