"""GRPO, RLOO and REINFORCE with an EMA baseline: one on-policy step, three advantage estimators.

GRPO (Shao et al. 2024, DeepSeekMath eq. 3): A_i = (r_i - mean(r)) / std(r) within a group of G samples of
one prompt, clipped surrogate min(rho*A, clip(rho, 1-eps, 1+eps)*A) with optional KL to a reference.
``normalize_std=False`` is Dr.GRPO (Liu et al. 2025), which drops the std division; ``loss_agg`` picks token,
sequence or fixed-length aggregation. RLOO (Ahmadian et al. 2024): A_i = r_i - mean_{j!=i} r_j.
REINFORCE follows the AutoDSPy seed: A = r - b with b <- 0.9*b + 0.1*r, updated sample by sample.
Deviations: with one epoch and one minibatch the old log-probs are the trainer's own (detached), so the
ratio is exactly 1 and no extra forward pass is spent; with more, they are recomputed by the trainer before
the first update (never taken from the generator, whose bf16 kernels differ slightly). KL can be a loss term
(default) or, with ``kl_in_reward``, subtracted from the reward using the generator's sampling log-probs.
REINFORCE++ (Hu 2025) normalises advantages over the whole batch (``group_baseline``: after a group-mean
baseline). Deviation: the paper puts a per-token KL penalty into the reward and normalises token-level
returns-to-go; here the reward is one number per response, so with ``kl_in_reward`` kl_beta times the
response's summed KL estimate is subtracted from it before the batch normalisation (every token of a response
gets the same advantage); the reinforcepp_arith preset has ``kl_beta=0``, so no KL at all. Variants of the
loss (``policy_loss``: the clipped surrogate, GSPO, CISPO; is_losses.py) and DAPO's dynamic sampling and
overlong shaping/filtering (dapo.py) are keyword arguments of the same step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raylign.algorithms.advantages import (ema_baseline_advantages, group_advantages, reinforce_pp_advantages,
                                           rloo_advantages)
from raylign.algorithms.dapo import mask_truncated, sample_groups
from raylign.algorithms.losses import kl_penalized_rewards
from raylign.algorithms.protocol import Cluster, StepOutput, add_tis, completions_batch
from raylign.types import Completion, Problem, Score


def _grpo(rewards_P_G: torch.Tensor, cfg, state: dict) -> torch.Tensor:
    return group_advantages(rewards_P_G, normalize_std=cfg.normalize_std)


def _rloo(rewards_P_G: torch.Tensor, cfg, state: dict) -> torch.Tensor:
    return rloo_advantages(rewards_P_G)


def _reinforce(rewards_P_G: torch.Tensor, cfg, state: dict) -> torch.Tensor:
    adv_B, state["baseline"] = ema_baseline_advantages(rewards_P_G.flatten(), state.get("baseline", 0.0), cfg.ema_decay)
    return adv_B.view_as(rewards_P_G)


def _reinforce_pp(rewards_P_G: torch.Tensor, cfg, state: dict) -> torch.Tensor:
    return reinforce_pp_advantages(rewards_P_G, group_baseline=cfg.group_baseline)


ADVANTAGES: dict[str, Callable[[torch.Tensor, object, dict], torch.Tensor]] = {
    "grpo": _grpo, "rloo": _rloo, "reinforce": _reinforce, "reinforce_pp": _reinforce_pp,
}

# algorithm.policy_loss -> registered loss (on-policy single update, update with recomputed old log-probs)
POLICY_LOSSES: dict[str, tuple[str, str]] = {
    "clip": ("policy_gradient_on_policy", "policy_gradient"), "gspo": ("gspo", "gspo"), "cispo": ("cispo", "cispo"),
}


def policy_gradient_step(cluster: Cluster, problems: list[Problem], cfg, state: dict) -> StepOutput:
    """generate -> score -> advantages -> train_step -> sync. ``state`` carries algorithm state (EMA baseline)."""
    problems, groups, scores, rewards_P_G, filtered = sample_groups(cluster, problems, cfg)
    batch = completions_batch(groups, cfg.temperature)
    metrics = {**rollout_metrics(groups, scores, rewards_P_G), **filtered}
    if cfg.overlong_filter:
        metrics["filter/truncated_masked"] = float(mask_truncated(batch, groups))

    kl_beta_loss = cfg.kl_beta
    if cfg.kl_beta > 0:
        batch.fields["ref_logprobs_B_T"] = cluster.logprobs(batch, which="ref")
        if cfg.kl_in_reward:
            rewards_P_G = _kl_in_reward(rewards_P_G, groups, batch.fields["ref_logprobs_B_T"], cfg)
            kl_beta_loss = 0.0
    advantages_P_G = ADVANTAGES[cfg.name](rewards_P_G, cfg, state)
    batch.fields["advantages_B"] = advantages_P_G.flatten().tolist()

    loss_kwargs = dict(clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, kl_beta=kl_beta_loss, kl_kind=cfg.kl_kind)
    if cfg.policy_loss != "gspo":  # GSPO's ratio and clip are per sequence: its loss is always a sequence mean
        loss_kwargs.update(agg=cfg.loss_agg, max_tokens=cluster.max_new_tokens)
    loss_name = POLICY_LOSSES[cfg.policy_loss][0]
    if cfg.epochs > 1 or cfg.minibatches > 1:
        batch.fields["old_logprobs_B_T"] = cluster.logprobs(batch)
        loss_name = POLICY_LOSSES[cfg.policy_loss][1]
    add_tis(batch, groups, loss_kwargs, cfg.tis_cap)
    for _ in range(cfg.epochs):
        metrics.update(cluster.train_step(batch, loss_name, loss_kwargs, cfg.minibatches))
    metrics.update(cluster.sync_weights())
    metrics["advantage/abs_mean"] = advantages_P_G.abs().mean().item()
    if "baseline" in state:
        metrics["reward/baseline"] = state["baseline"]
    return rollout_output(problems, groups, scores, advantages_P_G, metrics)


def rollout_output(problems: list[Problem], groups: list[list[Completion]], scores: list[list[Score]],
                   advantages_P_G: torch.Tensor, metrics: dict[str, float]) -> StepOutput:
    """A rollout step's output: its metrics and one rollouts.jsonl row per sample."""
    records = [
        {"prompt_id": p.id, "sample": j, "prompt": p.messages[-1]["content"], "completion": c.text,
         "prediction": s.prediction, "ground_truth": p.answer, "reward": s.reward, "correct": s.correct,
         "advantage": float(advantages_P_G[i, j]), "tokens": len(c.token_ids), "policy_version": c.policy_version,
         "finish_reason": c.finish_reason, **record_extras(c, s)}
        for i, (p, group, sg) in enumerate(zip(problems, groups, scores, strict=True))
        for j, (c, s) in enumerate(zip(group, sg, strict=True))
    ]
    return StepOutput(metrics, records, groups, scores, advantages_P_G)


def record_extras(c: Completion, s: Score) -> dict:
    """What the report shows beyond the reward: its components, and where tool output (loss mask 0) sits in
    the text of a tool-use episode (character spans)."""
    extras = {}
    if s.info.get("components"):
        extras["components"] = s.info["components"]
    if "tool_spans" in c.info:
        extras["tool_spans"] = c.info["tool_spans"]
    return extras


def _kl_in_reward(rewards_P_G, groups, ref_logprobs, cfg) -> torch.Tensor:
    flat = [c for g in groups for c in g]
    width = max(1, max(len(c.logprobs) for c in flat))

    def pad(rows):
        return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64)

    mask_B_T = pad([[1.0] * len(c.logprobs) for c in flat])
    rewards_B = kl_penalized_rewards(rewards_P_G.flatten(), pad([c.logprobs for c in flat]), pad(ref_logprobs),
                                     mask_B_T, cfg.kl_beta, cfg.kl_kind)
    return rewards_B.view_as(rewards_P_G)


def rollout_metrics(groups: list[list[Completion]], scores: list[list[Score]], rewards_P_G: torch.Tensor) -> dict[str, float]:
    flat = [s for g in scores for s in g]
    lengths = torch.tensor([float(len(c.token_ids)) for g in groups for c in g])
    return {
        "reward/mean": rewards_P_G.mean().item(),
        "reward/std": rewards_P_G.std().item() if rewards_P_G.numel() > 1 else 0.0,
        "reward/zero_std_groups": (rewards_P_G.std(dim=1) == 0).double().mean().item() if rewards_P_G.shape[1] > 1 else 0.0,
        "accuracy/train": sum(s.correct for s in flat) / len(flat),
        "format/rate": sum(s.format_ok for s in flat) / len(flat),
        "response/len_mean": lengths.mean().item(),
        "response/len_max": lengths.max().item(),
        "response/truncated": sum(c.finish_reason == "length" for g in groups for c in g) / len(flat),
        **component_means(flat),
        **_episode_metrics([c for g in groups for c in g]),
    }


def component_means(scores: list[Score]) -> dict[str, float]:
    """Each reward component (multi-component rewards such as the RAG env's) as its own batch mean."""
    names = sorted({n for s in scores for n in s.info.get("components", {})})
    return {f"reward/{n}": sum(s.info.get("components", {}).get(n, 0.0) for s in scores) / len(scores) for n in names}


def _episode_metrics(completions: list[Completion]) -> dict[str, float]:
    """Tool-use episodes: turns, search calls and tool errors per episode (none for single-turn envs)."""
    episodes = [c.info for c in completions if "turns" in c.info]
    if not episodes:
        return {}
    n = len(episodes)
    return {"agent/turns": sum(e["turns"] for e in episodes) / n,
            "agent/searches": sum(len(e.get("searches", [])) for e in episodes) / n,
            "agent/search_rate": sum(bool(e.get("searches")) for e in episodes) / n,
            "agent/tool_errors": sum(e.get("tool_errors", 0) for e in episodes) / n,
            "agent/answered": sum(e.get("answer") is not None for e in episodes) / n}
