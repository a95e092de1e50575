"""Shared numerics for the RL losses: masked reductions, whitening, KL estimators, loss aggregation.

Every reduction takes a 0/1 (or bool) ``mask_B_T``: 1 marks a completion token the policy produced, 0 marks
prompt or padding. Variances are unbiased (Bessel, as torch.std and TRL's masked_var).

KL(pi || ref) per token is estimated from tokens sampled from pi, with r = ref(x) / pi(x) (Schulman 2020,
"Approximating KL Divergence"): k1 = -log r (unbiased, high variance, can be negative), k2 = (log r)^2 / 2
(biased, low variance), k3 = (r - 1) - log r (unbiased, always >= 0; GRPO eq. 4). Deviation: for k3 the
log-ratio is clamped to +-K3_LOG_RATIO_CLAMP so exp() can't overflow when the policy drifts far from the
reference (verl clamps too); beyond the clamp the estimate is flat and passes no gradient.

Loss aggregation over tokens changes the gradient weighting, so it is an explicit choice (see ``aggregate``).
"""

from __future__ import annotations

from typing import Literal

import torch

K3_LOG_RATIO_CLAMP = 10.0  # e^10 ~ 2.2e4: large enough to be inactive in healthy runs, safe in bf16/fp32

KLKind = Literal["k1", "k2", "k3"]
AggMode = Literal["token", "sequence", "fixed"]


def masked_sum(x_B_T: torch.Tensor, mask_B_T: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask_B_T.to(x_B_T.dtype)
    return (x_B_T * m).sum() if dim is None else (x_B_T * m).sum(dim)


def masked_mean(x_B_T: torch.Tensor, mask_B_T: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over masked-in entries; an all-masked slice gives 0 instead of NaN."""
    count = masked_sum(torch.ones_like(x_B_T), mask_B_T, dim)
    # clamp, not where(): where() would still back-propagate the NaN of 0/0
    return masked_sum(x_B_T, mask_B_T, dim) / count.clamp_min(1e-8)


def masked_var(x_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over all masked-in entries."""
    mean = masked_mean(x_B_T, mask_B_T)
    n = masked_sum(torch.ones_like(x_B_T), mask_B_T)
    return masked_sum((x_B_T - mean) ** 2, mask_B_T) / (n - 1).clamp_min(1.0)


def masked_whiten(x_B_T: torch.Tensor, mask_B_T: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked-in entries; padding comes back as 0.

    shift_mean=False adds the mean back (rescale only): PPO whitens rewards this way so their sign survives.
    """
    mean = masked_mean(x_B_T, mask_B_T)
    whitened = (x_B_T - mean) * torch.rsqrt(masked_var(x_B_T, mask_B_T) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask_B_T.to(x_B_T.dtype)


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio**2


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    neg = (-log_ratio).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)  # log(ref / pi)
    return torch.exp(neg) - neg - 1.0


_KL_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logprobs_B_T: torch.Tensor, ref_logprobs_B_T: torch.Tensor, kind: KLKind = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi; returns (B, T), padding not masked."""
    if kind not in _KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(_KL_ESTIMATORS)}")
    return _KL_ESTIMATORS[kind](logprobs_B_T - ref_logprobs_B_T)


def entropy_from_logits(logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) at each position: (B, T, V) -> (B, T)."""
    logp_B_T_V = torch.log_softmax(logits_B_T_V, dim=-1)
    return -(logp_B_T_V.exp() * logp_B_T_V).sum(-1)


def _token_mean(loss_B_T, mask_B_T, max_tokens):
    # DAPO eq. 8: every token weighs the same, so long completions are not down-weighted
    return masked_mean(loss_B_T, mask_B_T)


def _sequence_mean(loss_B_T, mask_B_T, max_tokens):
    # original GRPO eq. 3: 1/G sum_i 1/|o_i| sum_t; empty rows (no completion tokens) are not counted
    per_seq_B = masked_mean(loss_B_T, mask_B_T, dim=-1)
    nonempty_B = (mask_B_T.to(loss_B_T.dtype).sum(-1) > 0).to(loss_B_T.dtype)
    return (per_seq_B * nonempty_B).sum() / nonempty_B.sum().clamp_min(1.0)


def _fixed_constant(loss_B_T, mask_B_T, max_tokens):
    # Dr.GRPO: a constant normaliser removes the length bias of 1/|o_i| without DAPO's batch-dependent count
    if max_tokens is None:  # the padded width would make each token's weight depend on its micro-batch
        raise ValueError("agg='fixed' needs max_tokens (the generation budget, generator.max_new_tokens)")
    return masked_sum(loss_B_T, mask_B_T) / (loss_B_T.shape[0] * max_tokens)


_AGGREGATORS = {"token": _token_mean, "sequence": _sequence_mean, "fixed": _fixed_constant}


def aggregate(loss_B_T: torch.Tensor, mask_B_T: torch.Tensor, mode: AggMode = "token",
              max_tokens: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    "token":    sum over valid tokens / number of valid tokens (DAPO).
    "sequence": mean over each sequence's valid tokens, then mean over non-empty sequences (GRPO).
    "fixed":    sum over valid tokens / (B * max_tokens) (Dr.GRPO). Pass the generation budget
                (max_new_tokens) as max_tokens so the scale doesn't move with batch padding or with how the
                trainer cuts the batch into micro-batches; required.
    """
    if mode not in _AGGREGATORS:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {sorted(_AGGREGATORS)}")
    return _AGGREGATORS[mode](loss_B_T, mask_B_T, max_tokens)
