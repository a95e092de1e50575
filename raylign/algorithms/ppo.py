"""PPO with a learned critic (Schulman et al. 2017) and GAE (Schulman et al. 2016, eq. 16) for LLM responses.

Each completion token is one action; V(s_t) is the critic's value before token t. The reward is 0 on every
token but the last, which gets the env's reward R(x, y); with kl_beta > 0 every token also gets
-beta * KL_t, KL_t = log pi_old(y_t) - log pi_ref(y_t) (k1, InstructGPT, Ouyang et al. 2022 eq. 2).
delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns R_t = A_t + V_t, then the
clipped surrogate + vf_coef * clipped value loss - entropy_coef * entropy (``losses.ppo_loss``, PPO eq. 9).
Defaults gamma = lam = 1.0 (VinePPO's PPO baseline; with a terminal-only reward A_t = R - V_t); the AutoDSPy
seed uses gamma .99 / lam .95, InstructGPT-style RLHF (TRL) gamma 1 / lam .95: set algorithm.gamma / lam.
In tool-use episodes the actions are the policy's tokens (loss mask 1): the KL penalty and the final reward sit
on them, and GAE runs over them only, skipping spliced tool output. Deviations and choices: values and old log-probs come from one trainer forward before the first update
(old values are never refreshed between epochs); a response cut by the length limit is still treated as
terminal (no bootstrap from V) and its reward is replaced by ``truncation_penalty``; KL always uses k1 in
the reward (``kl_kind`` is for the GRPO-family loss term); advantages are whitened over the loss-mask tokens
of the whole batch (not per minibatch) when ``whiten_advantages``, returns use the raw advantages.
``StepOutput.advantages_P_G`` is each sequence's mean token advantage (as trained), for the rollout log.
"""

from __future__ import annotations

import torch

from raylign.algorithms.advantages import gae
from raylign.algorithms.numerics import kl_estimate, masked_mean, masked_whiten
from raylign.algorithms.policy_gradient import rollout_metrics, rollout_output
from raylign.algorithms.protocol import Cluster, StepOutput, add_tis, completions_batch
from raylign.types import Completion, Problem, Score


def ppo_step(cluster: Cluster, problems: list[Problem], cfg, state: dict) -> StepOutput:
    """generate -> score -> values, old (and ref) log-probs -> per-token rewards -> GAE -> train_step -> sync."""
    groups = cluster.generate(problems, n=cfg.group_size, temperature=cfg.temperature)
    scores = cluster.score(problems, groups)
    rewards_P_G = penalize_truncated(scores, groups, cfg.truncation_penalty)
    batch = completions_batch(groups, cfg.temperature)
    metrics = rollout_metrics(groups, scores, rewards_P_G)

    lengths_B = [len(ids) for ids in batch.completion_ids]
    T = max(1, max(lengths_B))
    valid_B_T = pad_B_T([[1.0] * n for n in lengths_B], T)
    mask_B_T = pad_B_T(batch.loss_mask, T)
    old_values = cluster.values(batch)
    old_logprobs = cluster.logprobs(batch)
    values_B_T = pad_B_T(old_values, T)
    kl_B_T = torch.zeros_like(values_B_T)
    if cfg.kl_beta > 0:
        ref_logprobs = cluster.logprobs(batch, which="ref")
        # the policy's own tokens only: tool output spliced into an episode is not an action
        kl_B_T = kl_estimate(pad_B_T(old_logprobs, T), pad_B_T(ref_logprobs, T), "k1") * mask_B_T
        metrics["kl/reward_mean"] = kl_B_T.sum(-1).mean().item()
    rewards_B_T = token_rewards(rewards_P_G.flatten(), mask_B_T, kl_B_T, cfg.kl_beta)
    # GAE steps over the policy's tokens: gamma and lam discount once per action, never across tool output
    adv_B_T, returns_B_T = gae(rewards_B_T, values_B_T, valid_B_T, cfg.gamma, cfg.lam, action_mask_B_T=mask_B_T)
    if cfg.whiten_advantages:
        adv_B_T = masked_whiten(adv_B_T, mask_B_T)

    batch.fields.update(advantages_B=rows(adv_B_T, lengths_B), old_logprobs_B_T=old_logprobs,
                        old_values_B_T=old_values, returns_B_T=rows(returns_B_T, lengths_B))
    loss_kwargs = dict(clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, vf_coef=cfg.vf_coef,
                       vf_clip=cfg.vf_clip, entropy_coef=cfg.entropy_coef, agg=cfg.loss_agg,
                       max_tokens=cluster.max_new_tokens)
    add_tis(batch, groups, loss_kwargs, cfg.tis_cap)
    for _ in range(cfg.epochs):
        metrics.update(cluster.train_step(batch, "ppo", loss_kwargs, cfg.minibatches))
    metrics.update(cluster.sync_weights())
    metrics.update({
        "value/mean": masked_mean(values_B_T, valid_B_T).item(),
        "returns/mean": masked_mean(returns_B_T, valid_B_T).item(),
        "advantage/abs_mean": masked_mean(adv_B_T.abs(), mask_B_T).item(),
    })
    return rollout_output(problems, groups, scores, masked_mean(adv_B_T, mask_B_T, dim=-1).view_as(rewards_P_G),
                          metrics)


def penalize_truncated(scores: list[list[Score]], groups: list[list[Completion]], penalty: float | None) -> torch.Tensor:
    """Rewards (P, G); a completion cut by the length limit gets ``penalty`` instead of its score (None: keeps it)."""
    return torch.tensor([[penalty if c.finish_reason == "length" and penalty is not None else s.reward
                          for c, s in zip(g, sg, strict=True)]
                         for g, sg in zip(groups, scores, strict=True)], dtype=torch.float64)


@torch.no_grad()
def token_rewards(rewards_B: torch.Tensor, valid_B_T: torch.Tensor, kl_B_T: torch.Tensor,
                  kl_beta: float) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_beta * KL_t on every action token (``valid_B_T``: 1 where the policy acted),
    plus R on the last one; 0 elsewhere."""
    valid_B_T = valid_B_T.to(rewards_B.dtype)
    rewards_B_T = -kl_beta * kl_B_T.to(rewards_B.dtype) * valid_B_T
    has_tokens_B = valid_B_T.sum(-1) > 0  # an empty completion has no token to carry its reward
    last_B = valid_B_T.shape[-1] - 1 - valid_B_T.flip(-1).argmax(-1)  # the last action, wherever the gaps are
    rows_B = torch.arange(len(rewards_B))[has_tokens_B]
    rewards_B_T[rows_B, last_B[has_tokens_B]] += rewards_B[has_tokens_B]
    return rewards_B_T


def pad_B_T(rows_B: list[list[float]], T: int) -> torch.Tensor:
    """Right-pad ragged rows with 0 into a float64 (B, T) tensor."""
    return torch.tensor([list(map(float, r)) + [0.0] * (T - len(r)) for r in rows_B], dtype=torch.float64)


def rows(x_B_T: torch.Tensor, lengths_B: list[int]) -> list[list[float]]:
    """Back to ragged per-sequence lists (a TrainBatch field) of each sequence's own length."""
    return [x_B_T[i, :n].tolist() for i, n in enumerate(lengths_B)]
