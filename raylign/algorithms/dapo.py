"""DAPO's sampling and length rules (Yu et al. 2025), for the critic-free policy-gradient step.

- Dynamic sampling (sec. 3.2, eq. 11): a group whose rewards are all equal has zero advantage and gives no
  gradient, so it is dropped and more prompts are sampled until the batch holds ``prompts_per_step`` groups.
  Each extra generate call asks for the missing groups divided by the share kept so far (all P when none
  was kept yet), at most P prompts, and at most ``max_extra_generate_calls`` calls a step. Deviations: the
  paper filters on accuracy (all right or all wrong); here on the reward the advantage sees (after overlong
  shaping), which is exactly the zero-gradient test. When the cap is reached short of P, the batch is filled
  with dropped groups (zero advantage), so a step always trains on P groups (veRL stops the run instead).
- Overlong reward shaping (eq. 13): with L_max = generator.max_new_tokens and buffer L_cache, a response of
  |y| tokens gets 0 up to L_max - L_cache, then ((L_max - L_cache) - |y|) / L_cache down to -1 at L_max
  (and -1 beyond), times ``overlong_penalty``, added to its reward. |y| counts the policy's own tokens (a
  multi-turn episode's tool output is not in it).
- Overlong filtering (sec. 3.4): a response cut by the length limit (finish_reason "length") keeps its
  reward in its group's advantage but gets loss mask 0, so it adds nothing to the loss or its normaliser.
Token-level loss and clip-higher are the step's ``loss_agg=token`` and ``clip_eps_high``.
"""

from __future__ import annotations

import math

import torch

from raylign.algorithms.protocol import Cluster
from raylign.types import Completion, Problem, Score, TrainBatch


@torch.no_grad()
def overlong_penalty(lengths_B: torch.Tensor, max_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO eq. 13: 0, then linear down to -factor over the last ``buffer`` tokens of ``max_tokens``. Returns (B,)."""
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"overlong buffer must be in [1, max_tokens={max_tokens}], got {buffer}")
    soft_start = max_tokens - buffer
    penalty_B = ((soft_start - lengths_B.to(torch.float64)) / buffer).clamp(-1.0, 0.0)
    return factor * penalty_B


def tied_groups(rewards_P_G: torch.Tensor) -> torch.Tensor:
    """(P,) bool: the groups whose samples all got the same reward (no learning signal)."""
    return (rewards_P_G == rewards_P_G[..., :1]).all(-1)


def shaped_rewards(groups: list[list[Completion]], scores: list[list[Score]], cfg, max_tokens: int) -> torch.Tensor:
    """rewards_P_G of the scores, plus the overlong penalty when ``cfg.overlong_buffer`` is set."""
    rewards_P_G = torch.tensor([[s.reward for s in g] for g in scores], dtype=torch.float64)
    if cfg.overlong_buffer:
        lengths_P_G = torch.tensor([[float(sum(c.loss_mask) if c.loss_mask is not None else len(c.token_ids))
                                     for c in g] for g in groups], dtype=torch.float64)
        rewards_P_G = rewards_P_G + overlong_penalty(lengths_P_G, max_tokens, cfg.overlong_buffer,
                                                     cfg.overlong_penalty)
    return rewards_P_G


def sample_groups(cluster: Cluster, problems: list[Problem], cfg) -> tuple[list[Problem], list[list[Completion]],
                                                                           list[list[Score]], torch.Tensor, dict]:
    """generate -> score -> shape, then (``cfg.dynamic_sampling``) drop tied groups and sample more prompts
    from ``cluster.next_prompts``. Returns (problems, groups, scores, rewards_P_G, filter metrics)."""
    P, kept, dropped, seen, extra = len(problems), [], [], 0, 0
    while True:
        groups = cluster.generate(problems, n=cfg.group_size, temperature=cfg.temperature)
        scores = cluster.score(problems, groups)
        rewards_P_G = shaped_rewards(groups, scores, cfg, cluster.max_new_tokens)
        tied_P = tied_groups(rewards_P_G) if cfg.dynamic_sampling else torch.zeros(len(problems), dtype=torch.bool)
        for i, tied in enumerate(tied_P.tolist()):
            (dropped if tied else kept).append((problems[i], groups[i], scores[i], rewards_P_G[i]))
        seen += len(problems)
        if len(kept) >= P or extra >= cfg.max_extra_generate_calls:
            break
        missing, share = P - len(kept), len(kept) / seen
        problems = cluster.next_prompts(P if share == 0 else min(P, math.ceil(missing / share)))
        extra += 1
    refill = max(0, P - len(kept))
    chosen = kept[:P] + dropped[:refill]
    metrics = {"filter/dropped_groups": float(len(dropped) - refill), "filter/extra_generate_calls": float(extra),
               "filter/refilled_groups": float(refill)} if cfg.dynamic_sampling else {}
    rewards_P_G = torch.stack([c[3] for c in chosen])
    if cfg.overlong_buffer:
        raw_P_G = torch.tensor([[s.reward for s in c[2]] for c in chosen], dtype=torch.float64)
        metrics["reward/overlong_penalty"] = (rewards_P_G - raw_P_G).mean().item()
    return [c[0] for c in chosen], [c[1] for c in chosen], [c[2] for c in chosen], rewards_P_G, metrics


def mask_truncated(batch: TrainBatch, groups: list[list[Completion]]) -> int:
    """Overlong filtering: loss mask 0 on every response cut by the length limit. Returns how many."""
    flat = [c for g in groups for c in g]
    cut = [i for i, c in enumerate(flat) if c.finish_reason == "length"]
    for i in cut:
        batch.loss_mask[i] = [0] * len(batch.loss_mask[i])
    return len(cut)
