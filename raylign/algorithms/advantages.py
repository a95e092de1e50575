"""Advantage estimators: group-relative (GRPO, Dr.GRPO), leave-one-out (RLOO), EMA baseline, GAE (PPO).

- GRPO (Shao et al. 2024, DeepSeekMath eq. 3 outcome supervision): A_i = (r_i - mean(r)) / std(r) over the
  G samples of one prompt. std is unbiased (torch.std, as TRL). Deviation: a group whose rewards are all
  equal gets exactly 0 (no signal) rather than 0/eps noise. Dr.GRPO (Liu et al. 2025) drops the std.
- RLOO (Ahmadian et al. 2024, eq. 6): A_i = r_i - 1/(G-1) sum_{j != i} r_j.
- REINFORCE++ (Hu 2025, eq. 8-9): A_i = (r_i - mean_batch(r)) / std_batch(r), one normalisation over the
  whole batch instead of per group. REINFORCE++-baseline subtracts the group mean first, then divides by the
  batch std of those centred rewards (their batch mean is 0 by construction, so it is not subtracted again
  and a tied group keeps exactly 0). Deviations: the statistics are over sequences, not tokens (OpenRLHF
  whitens over tokens, which weights a sequence by its length), and an all-equal batch gives exactly 0.
- EMA baseline (AutoDSPy's REINFORCE): A_i = r_i - b, then b <- decay * b + (1 - decay) * r_i, one sample at
  a time. Deviation from the AutoDSPy seed, which updates b first: the seed's advantage is decay * (r - b)
  and includes the sample's own reward in its baseline; ours uses only earlier samples (unbiased) and differs
  by the constant factor decay, which the learning rate absorbs.
- GAE (Schulman et al. 2016, eq. 16): delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1},
  returns R_t = A_t + V_t. Completions end at their last valid token (mask zeros are trailing padding), so
  V after it is 0: the episode terminates there. With an action mask (multi-turn tool use: tool-output tokens
  spliced between the policy's own), only action tokens are time steps: t+1 is the next action token, so
  gamma and lam apply once per action, not once per tool token. Non-action tokens get A = R = 0, and a reward
  on one counts for the action before it (the tool output answers that action).
All estimators are targets, not differentiated: they run under no_grad.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def group_advantages(rewards_P_G: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages for P prompts x G samples; normalize_std=False is Dr.GRPO. Returns adv_P_G."""
    if rewards_P_G.shape[-1] < 2:
        raise ValueError(f"group advantages need G >= 2 samples per prompt, got G={rewards_P_G.shape[-1]}")
    adv_P_G = rewards_P_G - rewards_P_G.mean(-1, keepdim=True)
    if normalize_std:
        adv_P_G = adv_P_G / (rewards_P_G.std(-1, keepdim=True) + eps)
    # mean() of equal floats can be off by an ulp; a tied group must give exactly 0, not ulp/eps
    tied_P_1 = (rewards_P_G == rewards_P_G[..., :1]).all(-1, keepdim=True)
    return torch.where(tied_P_1, torch.zeros_like(adv_P_G), adv_P_G)


@torch.no_grad()
def reinforce_pp_advantages(rewards_P_G: torch.Tensor, group_baseline: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++ (group_baseline=False) or REINFORCE++-baseline: globally normalised advantages. Returns adv_P_G."""
    if group_baseline:
        centred_P_G = group_advantages(rewards_P_G, normalize_std=False)  # tied groups: exactly 0
    else:
        centred_P_G = rewards_P_G - rewards_P_G.mean()
        if (rewards_P_G == rewards_P_G.flatten()[0]).all():
            return torch.zeros_like(rewards_P_G)
    std = centred_P_G.std() if centred_P_G.numel() > 1 else torch.zeros((), dtype=rewards_P_G.dtype)
    return centred_P_G / (std + eps)


@torch.no_grad()
def rloo_advantages(rewards_P_G: torch.Tensor) -> torch.Tensor:
    """RLOO: each sample's baseline is the mean of the other G - 1 samples of its prompt. Returns adv_P_G."""
    G = rewards_P_G.shape[-1]
    if G < 2:
        raise ValueError(f"RLOO needs G >= 2 samples per prompt, got G={G}")
    others_P_G = (rewards_P_G.sum(-1, keepdim=True) - rewards_P_G) / (G - 1)
    return rewards_P_G - others_P_G


@torch.no_grad()
def ema_baseline_advantages(rewards_B: torch.Tensor, baseline: float,
                            decay: float = 0.9) -> tuple[torch.Tensor, float]:
    """REINFORCE with a running baseline, consumed in batch order. Returns (adv_B, baseline after the batch)."""
    adv = []
    for r in rewards_B.tolist():
        adv.append(r - baseline)  # baseline from earlier samples only: see module docstring
        baseline = decay * baseline + (1.0 - decay) * r
    return torch.tensor(adv, dtype=rewards_B.dtype, device=rewards_B.device), baseline


@torch.no_grad()
def gae(rewards_B_T: torch.Tensor, values_B_T: torch.Tensor, mask_B_T: torch.Tensor,
        gamma: float, lam: float, action_mask_B_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation per token. Returns (advantages_B_T, returns_B_T), 0 on padding.

    rewards_B_T holds each token's reward (typically 0 everywhere except the last valid token, plus any
    per-token KL penalty); values_B_T is V(s_t) before token t is emitted. action_mask_B_T (1 = the policy's
    own token, 0 = tool output) makes only action tokens time steps, and gives advantage 0 and return 0 on the
    others (their value loss is masked out anyway); the caller puts the terminal reward on the last action
    token. None (or all ones) is the plain per-token recursion, bit for bit.
    """
    if action_mask_B_T is not None:
        return _gae_over_actions(rewards_B_T, values_B_T, mask_B_T * action_mask_B_T, gamma, lam,
                                 mask_B_T.to(values_B_T.dtype))
    m_B_T = mask_B_T.to(values_B_T.dtype)
    T = rewards_B_T.shape[-1]
    adv_B_T = torch.zeros_like(values_B_T)
    next_adv_B = torch.zeros_like(values_B_T[:, 0])
    next_value_B = torch.zeros_like(values_B_T[:, 0])
    for t in reversed(range(T)):
        # next_mask = 0 after the last valid token: terminal, so V_{t+1} and A_{t+1} drop out
        next_mask_B = m_B_T[:, t + 1] if t + 1 < T else torch.zeros_like(next_value_B)
        delta_B = rewards_B_T[:, t] + gamma * next_value_B * next_mask_B - values_B_T[:, t]
        next_adv_B = delta_B + gamma * lam * next_mask_B * next_adv_B
        adv_B_T[:, t] = next_adv_B
        next_value_B = values_B_T[:, t]
    adv_B_T = adv_B_T * m_B_T
    return adv_B_T, (adv_B_T + values_B_T) * m_B_T


def _gae_over_actions(rewards_B_T: torch.Tensor, values_B_T: torch.Tensor, step_B_T: torch.Tensor,
                      gamma: float, lam: float, valid_B_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE whose time steps are the tokens with step_B_T = 1; the state carries over the others unchanged."""
    s_B_T = step_B_T.to(values_B_T.dtype)
    adv_B_T = torch.zeros_like(values_B_T)
    next_adv_B = torch.zeros_like(values_B_T[:, 0])
    next_value_B = torch.zeros_like(values_B_T[:, 0])
    has_next_B = torch.zeros_like(values_B_T[:, 0])  # 0 until an action step is seen: terminal
    pending_B = torch.zeros_like(values_B_T[:, 0])  # rewards on valid non-action tokens after this step
    for t in reversed(range(rewards_B_T.shape[-1])):
        s_B = s_B_T[:, t]
        reward_B = rewards_B_T[:, t] + pending_B
        delta_B = reward_B + gamma * next_value_B * has_next_B - values_B_T[:, t]
        a_B = delta_B + gamma * lam * has_next_B * next_adv_B
        adv_B_T[:, t] = a_B * s_B
        is_step_B = s_B > 0
        next_adv_B = torch.where(is_step_B, a_B, next_adv_B)
        next_value_B = torch.where(is_step_B, values_B_T[:, t], next_value_B)
        has_next_B = torch.maximum(has_next_B, s_B)
        pending_B = torch.where(is_step_B, torch.zeros_like(pending_B),
                                pending_B + rewards_B_T[:, t] * valid_B_T[:, t])
    return adv_B_T, (adv_B_T + values_B_T) * s_B_T
