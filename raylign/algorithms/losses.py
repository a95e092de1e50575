"""Policy and value losses for PPO-family methods (PPO, GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE).

Clipped surrogate (Schulman et al. 2017, PPO eq. 7), per token t of completion i:
    L_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A) + beta KL_t,   rho_t = pi(o_t) / pi_old(o_t)
with KL_t a per-token estimate of KL(pi || ref) (GRPO eq. 3 puts it in the loss with k3). Deviations and
variants, all keyword arguments: eps_high != eps is DAPO's clip-higher (eq. 10); the token reduction is
``numerics.aggregate`` (token = DAPO, sequence = GRPO, fixed = Dr.GRPO); advantages may be per sequence (B,),
broadcast over its tokens, or per token (B, T) from GAE. One on-policy step (old = logprobs.detach())
has rho = 1 and no clipping, so the gradient is plain REINFORCE: -A grad log pi / normaliser.
The loss is minimised: a positive advantage raises the log-probability of its tokens.
Value loss: PPO2's clipped value objective 0.5 max((V - R)^2, (V_clip - R)^2) (as in TRL / OpenAI baselines).
PPO (eq. 9): ``ppo_loss`` = clipped policy loss + vf_coef * value loss - entropy_coef * entropy, entropy
aggregated like the policy term; the value term is always a token mean (PPO2 / TRL), whatever ``agg`` says.
"KL in the reward" (InstructGPT, Ouyang et al. 2022 eq. 2) is ``kl_penalized_rewards``: r - beta sum_t KL_t.
Truncated importance sampling (``tis_cap``; Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"): the generator sampled from its own kernels (vLLM's bf16 differs from the trainer's),
and asynchronously from older weights; each token's term is weighted by w_t = min(pi_old(o_t) / pi_gen(o_t), C),
detached, where pi_old is the trainer's (the proximal policy the clip works with) and pi_gen the generator's.
"""

from __future__ import annotations

import torch

from raylign.algorithms.numerics import AggMode, KLKind, aggregate, kl_estimate, masked_mean, masked_sum


def kl_term(logprobs_B_T, ref_logprobs_B_T, mask_B_T, kl_beta, kl_kind, agg, max_tokens):
    """beta * aggregated KL estimate and its unweighted token mean (0 and 0 without a reference)."""
    if ref_logprobs_B_T is None:
        if kl_beta != 0.0:
            raise ValueError("kl_beta != 0 needs ref_logprobs_B_T")
        return torch.zeros((), dtype=logprobs_B_T.dtype, device=logprobs_B_T.device), 0.0
    kl_B_T = kl_estimate(logprobs_B_T, ref_logprobs_B_T.detach(), kl_kind)
    return kl_beta * aggregate(kl_B_T, mask_B_T, agg, max_tokens), masked_mean(kl_B_T.detach(), mask_B_T).item()


@torch.no_grad()
def tis_ratio(old_logprobs_B_T: torch.Tensor, gen_logprobs_B_T: torch.Tensor) -> torch.Tensor:
    """pi_old / pi_gen per token (detached); the truncated importance weight is its ``clamp(max=cap)``."""
    return torch.exp(old_logprobs_B_T - gen_logprobs_B_T)


def tis_metrics(ratio_B_T: torch.Tensor, mask_B_T: torch.Tensor, cap: float) -> dict[str, float]:
    """The untruncated ratio's mean and max over the loss tokens, and the share the cap binds."""
    on = mask_B_T > 0
    return {"tis/ratio_mean": masked_mean(ratio_B_T, mask_B_T).item(),
            "tis/ratio_max": ratio_B_T[on].max().item() if on.any() else 1.0,
            "tis/capped_fraction": masked_mean((ratio_B_T > cap).to(ratio_B_T.dtype), mask_B_T).item()}


def policy_gradient_loss(
    logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_B_T: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    agg: AggMode = "token",
    ref_logprobs_B_T: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    kl_kind: KLKind = "k3",
    max_tokens: int | None = None,
    gen_logprobs_B_T: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss (+ optional KL to the reference). advantages_B may also be (B, T).

    max_tokens is the constant for agg="fixed" (see ``aggregate``). Metrics: loss/policy and loss/kl
    (the two terms of the returned loss; loss/kl includes beta), kl/mean (unweighted token-mean of the
    estimator), clip/fraction (share of valid tokens where the clip is binding, i.e. the gradient is cut),
    ratio/mean. Without a reference, loss/kl and kl/mean are 0. With ``tis_cap`` (and the generator's
    ``gen_logprobs_B_T``) each token's term is weighted by ``tis_ratio`` clamped at the cap and ``tis_metrics`` are added.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    adv_B_T = advantages_B.unsqueeze(-1) if advantages_B.dim() == 1 else advantages_B
    adv_B_T = adv_B_T.detach().to(logprobs_B_T.dtype)

    ratio_B_T = torch.exp(logprobs_B_T - old_logprobs_B_T.detach())
    unclipped_B_T = -ratio_B_T * adv_B_T
    clipped_B_T = -torch.clamp(ratio_B_T, 1.0 - clip_eps, 1.0 + eps_high) * adv_B_T
    pg_B_T = torch.maximum(unclipped_B_T, clipped_B_T)  # max of negatives = -min of the objectives
    if tis_cap is not None:
        if gen_logprobs_B_T is None:
            raise ValueError("tis_cap needs gen_logprobs_B_T (the generator's log-probs)")
        tis_B_T = tis_ratio(old_logprobs_B_T.detach(), gen_logprobs_B_T)
        pg_B_T = pg_B_T * tis_B_T.clamp(max=tis_cap).to(pg_B_T.dtype)
    policy_loss = aggregate(pg_B_T, mask_B_T, agg, max_tokens)

    kl_loss, kl_mean = kl_term(logprobs_B_T, ref_logprobs_B_T, mask_B_T, kl_beta, kl_kind, agg, max_tokens)

    metrics = {
        "loss/policy": policy_loss.item(),
        "loss/kl": kl_loss.item(),
        "kl/mean": kl_mean,
        "clip/fraction": masked_mean((clipped_B_T > unclipped_B_T).to(pg_B_T.dtype), mask_B_T).item(),
        "ratio/mean": masked_mean(ratio_B_T.detach(), mask_B_T).item(),
    }
    if tis_cap is not None:
        metrics.update(tis_metrics(tis_B_T, mask_B_T, tis_cap))
    return policy_loss + kl_loss, metrics


def value_loss(
    values_B_T: torch.Tensor,
    old_values_B_T: torch.Tensor,
    returns_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped value loss, token mean. Metrics: loss/value, value/clip_fraction, value/mean."""
    returns_B_T = returns_B_T.detach()
    old_values_B_T = old_values_B_T.detach()
    # the value may move at most clip_eps from the value that produced the returns, like the policy ratio
    clipped_values_B_T = old_values_B_T + torch.clamp(values_B_T - old_values_B_T, -clip_eps, clip_eps)
    unclipped_B_T = (values_B_T - returns_B_T) ** 2
    clipped_B_T = (clipped_values_B_T - returns_B_T) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_B_T, clipped_B_T), mask_B_T)
    metrics = {
        "loss/value": loss.item(),
        "value/clip_fraction": masked_mean((clipped_B_T > unclipped_B_T).to(values_B_T.dtype), mask_B_T).item(),
        "value/mean": masked_mean(values_B_T.detach(), mask_B_T).item(),
    }
    return loss, metrics


def entropy_bonus(entropy_B_T: torch.Tensor, mask_B_T: torch.Tensor, agg: AggMode = "token",
                  max_tokens: int | None = None) -> torch.Tensor:
    """Policy entropy aggregated like the policy loss; subtracted (times a coefficient) to keep exploring."""
    return aggregate(entropy_B_T, mask_B_T, agg, max_tokens)


def ppo_loss(
    logprobs_B_T: torch.Tensor,
    values_B_T: torch.Tensor,
    entropy_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    old_values_B_T: torch.Tensor,
    returns_B_T: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_B_T: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    vf_coef: float = 0.5,
    vf_clip: float = 0.2,
    entropy_coef: float = 0.0,
    agg: AggMode = "token",
    ref_logprobs_B_T: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    kl_kind: KLKind = "k3",
    max_tokens: int | None = None,
    gen_logprobs_B_T: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO with a critic: loss/policy + loss/kl + vf_coef * loss/value - entropy_coef * loss/entropy.

    values_B_T (critic, with grad) and entropy_B_T (policy, with grad) come from the trainer's forward;
    advantages_B is per token (B, T) from GAE. loss/value and loss/entropy are the unweighted terms.
    """
    policy, metrics = policy_entropy_loss(
        logprobs_B_T=logprobs_B_T, entropy_B_T=entropy_B_T, advantages_B=advantages_B, mask_B_T=mask_B_T,
        old_logprobs_B_T=old_logprobs_B_T, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
        entropy_coef=entropy_coef, agg=agg, ref_logprobs_B_T=ref_logprobs_B_T, kl_beta=kl_beta, kl_kind=kl_kind,
        max_tokens=max_tokens, gen_logprobs_B_T=gen_logprobs_B_T, tis_cap=tis_cap)
    value, value_metrics = value_loss(values_B_T, old_values_B_T, returns_B_T, mask_B_T, vf_clip)
    return policy + vf_coef * value, {**metrics, **value_metrics}


def policy_entropy_loss(
    logprobs_B_T: torch.Tensor,
    entropy_B_T: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    entropy_coef: float = 0.0,
    agg: AggMode = "token",
    ref_logprobs_B_T: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    kl_kind: KLKind = "k3",
    max_tokens: int | None = None,
    gen_logprobs_B_T: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Critic-free clipped policy loss with an entropy bonus (VinePPO with entropy_coef > 0).

    old_logprobs_B_T=None is the on-policy single update: the detached current log-probs (ratio 1).
    """
    old_B_T = logprobs_B_T.detach() if old_logprobs_B_T is None else old_logprobs_B_T
    policy, metrics = policy_gradient_loss(
        logprobs_B_T=logprobs_B_T, old_logprobs_B_T=old_B_T, advantages_B=advantages_B, mask_B_T=mask_B_T,
        clip_eps=clip_eps, clip_eps_high=clip_eps_high, agg=agg, ref_logprobs_B_T=ref_logprobs_B_T,
        kl_beta=kl_beta, kl_kind=kl_kind, max_tokens=max_tokens, gen_logprobs_B_T=gen_logprobs_B_T, tis_cap=tis_cap)
    entropy = entropy_bonus(entropy_B_T, mask_B_T, agg, max_tokens)
    metrics["loss/entropy"] = entropy.item()
    return policy - entropy_coef * entropy, metrics


def value_only_loss(
    values_B_T: torch.Tensor,
    old_values_B_T: torch.Tensor,
    returns_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    vf_clip: float = 0.2,
    logprobs_B_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped value loss alone, for a separate critic trained in its own step.

    logprobs_B_T is accepted and ignored: the trainer passes it to every loss.
    """
    return value_loss(values_B_T, old_values_B_T, returns_B_T, mask_B_T, vf_clip)


@torch.no_grad()
def kl_penalized_rewards(
    rewards_B: torch.Tensor,
    logprobs_B_T: torch.Tensor,
    ref_logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    beta: float,
    kind: KLKind = "k1",
) -> torch.Tensor:
    """Sequence reward minus beta times the summed per-token KL estimate over its valid tokens. Returns (B,).

    k1 is the default as in InstructGPT: summed over a sampled sequence it is the unbiased sequence KL.
    """
    kl_B = masked_sum(kl_estimate(logprobs_B_T, ref_logprobs_B_T, kind), mask_B_T, dim=-1)
    return rewards_B - beta * kl_B
