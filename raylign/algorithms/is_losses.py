"""GSPO and CISPO: two policy losses that change what the importance ratio of the clipped surrogate does.

GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7): one ratio per sequence, the
length-normalised likelihood ratio s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) = exp(mean_t log r_{i,t}), clipped
at sequence level: J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps, 1 + eps_high) A_i). The paper's ranges are
tiny (eps = 3e-4, eps_high = 4e-4) because s_i is a geometric mean. Deviations: the mean over a sequence's
tokens runs over its loss-mask tokens only (tool output of a multi-turn episode is not the policy's, and a
fully masked sequence, e.g. an overlong-filtered one, is left out of the 1/G mean); the optional KL term is
a per-sequence token mean, as GRPO's. The loss is a mean over sequences, so the trainer weights micro-batches
by non-empty sequences (registry: units="sequence"). Needs per-sequence advantages (GSPO's Â_i).
CISPO (MiniMax-M1, Chen et al. 2025, eq. 4-5): J = 1/sum|o_i| sum_i sum_t sg(r^_{i,t}) A_i log pi(o_{i,t}),
r^ = clip(r, 1 - eps_low, 1 + eps_high): the clip bounds the weight but never drops a token's gradient.
MiniMax-M1 sets no lower bound (eps_low large: clip_eps=1 puts it at 0) and tunes only eps_high.
Deviation in the reported value only: the loss is -sg(r^) A exp(log pi - sg(log pi)), whose value is
-r^ A (comparable with the clipped surrogate's loss/policy) and whose gradient is the paper's -r^ A grad log pi.
The token reduction is ``agg`` (the paper's 1/sum|o_i| is "token"). One on-policy update (old = current)
gives ratio 1 in both, so each reduces to plain REINFORCE; they differ from GRPO with epochs or minibatches > 1.
"""

from __future__ import annotations

import torch

from raylign.algorithms.losses import kl_term
from raylign.algorithms.numerics import AggMode, KLKind, aggregate, masked_mean


def gspo_loss(
    logprobs_B_T: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor | None = None,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    ref_logprobs_B_T: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    kl_kind: KLKind = "k3",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequence-level clipped surrogate (GSPO). old_logprobs_B_T=None: the on-policy update (s_i = 1).

    Metrics (means over non-empty sequences): loss/policy, loss/kl, kl/mean (token mean), clip/fraction
    (sequences whose clip binds), ratio/mean (s_i).
    """
    if advantages_B.dim() != 1:
        raise ValueError(f"gspo needs one advantage per sequence, got shape {tuple(advantages_B.shape)}")
    old_B_T = logprobs_B_T.detach() if old_logprobs_B_T is None else old_logprobs_B_T.detach()
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    adv_B = advantages_B.detach().to(logprobs_B_T.dtype)
    nonempty_B = (mask_B_T.to(logprobs_B_T.dtype).sum(-1) > 0).to(logprobs_B_T.dtype)
    n_seq = nonempty_B.sum().clamp_min(1.0)

    ratio_B = torch.exp(masked_mean(logprobs_B_T - old_B_T, mask_B_T, dim=-1))  # s_i; 1 on empty rows
    unclipped_B = -ratio_B * adv_B
    clipped_B = -torch.clamp(ratio_B, 1.0 - clip_eps, 1.0 + eps_high) * adv_B
    pg_B = torch.maximum(unclipped_B, clipped_B)
    policy_loss = (pg_B * nonempty_B).sum() / n_seq
    kl_loss, kl_mean = kl_term(logprobs_B_T, ref_logprobs_B_T, mask_B_T, kl_beta, kl_kind, "sequence", None)
    metrics = {
        "loss/policy": policy_loss.item(),
        "loss/kl": kl_loss.item(),
        "kl/mean": kl_mean,
        "clip/fraction": (((clipped_B > unclipped_B).to(pg_B.dtype) * nonempty_B).sum() / n_seq).item(),
        "ratio/mean": ((ratio_B.detach() * nonempty_B).sum() / n_seq).item(),
    }
    return policy_loss + kl_loss, metrics


def cispo_loss(
    logprobs_B_T: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor | None = None,
    clip_eps: float = 1.0,
    clip_eps_high: float | None = 0.28,
    agg: AggMode = "token",
    ref_logprobs_B_T: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    kl_kind: KLKind = "k3",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped, detached IS weight times A times grad log pi (CISPO). advantages_B may also be (B, T).

    old_logprobs_B_T=None: the on-policy update (weight 1). Metrics: loss/policy, loss/kl, kl/mean,
    clip/fraction (valid tokens whose weight is truncated; they keep their gradient), ratio/mean.
    """
    old_B_T = logprobs_B_T.detach() if old_logprobs_B_T is None else old_logprobs_B_T.detach()
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    adv_B_T = advantages_B.unsqueeze(-1) if advantages_B.dim() == 1 else advantages_B
    adv_B_T = adv_B_T.detach().to(logprobs_B_T.dtype)

    ratio_B_T = torch.exp(logprobs_B_T.detach() - old_B_T)
    weight_B_T = torch.clamp(ratio_B_T, 1.0 - clip_eps, 1.0 + eps_high)
    grad_log_pi_B_T = torch.exp(logprobs_B_T - logprobs_B_T.detach())  # value 1, gradient grad log pi
    policy_loss = aggregate(-weight_B_T * adv_B_T * grad_log_pi_B_T, mask_B_T, agg, max_tokens)
    kl_loss, kl_mean = kl_term(logprobs_B_T, ref_logprobs_B_T, mask_B_T, kl_beta, kl_kind, agg, max_tokens)
    metrics = {
        "loss/policy": policy_loss.item(),
        "loss/kl": kl_loss.item(),
        "kl/mean": kl_mean,
        "clip/fraction": masked_mean((weight_B_T != ratio_B_T).to(ratio_B_T.dtype), mask_B_T).item(),
        "ratio/mean": masked_mean(ratio_B_T, mask_B_T).item(),
    }
    return policy_loss + kl_loss, metrics
