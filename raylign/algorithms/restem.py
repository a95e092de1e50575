"""RestEM / expert iteration (Singh et al. 2023, "Beyond Human Data", sec. 3; the VinePPO seed's baseline).

EM for RL with a binary reward: the E-step samples K responses per problem from the current policy and keeps
the correct ones (r = 1); the M-step maximises sum log pi(y | x) over the kept samples (``supervised_batch``:
packed, loss only on the response tokens) for ``sft_epochs`` passes of ceil(kept / batch_size) optimizer
steps, in a fresh seeded order per pass. Kept samples are de-duplicated by token ids within a prompt and
capped at ``max_per_prompt`` (the paper's per-problem cap), the first-sampled first.
Deviations: one iteration per training step over that step's ``prompts_per_step`` problems, not over the
whole training set. With ``restart_from_base`` (the paper's choice) the M-step starts from the base model
and a fresh optimizer, so the policy that samples iteration i+1 is the base fine-tuned on iteration i's kept
samples only, nothing earlier; ``restart_from_base=false`` continues from the last model (cumulative
fine-tuning). The new weights are synced eagerly: the next iteration samples from them. An iteration that
keeps nothing trains, resets and syncs nothing. Multi-turn episodes keep their loss mask (tool output is
context, not a target). ``state["iterations"]`` counts iterations and seeds the shuffle, so a resumed run
continues identically.
"""

from __future__ import annotations

import math
import random

import torch

from raylign.algorithms.policy_gradient import rollout_metrics
from raylign.algorithms.protocol import Cluster, StepOutput
from raylign.algorithms.sft import supervised_batch
from raylign.types import Completion, Problem, Score, TrainBatch


def kept_samples(groups: list[list[Completion]], scores: list[list[Score]],
                 max_per_prompt: int | None) -> list[tuple[int, int]]:
    """(prompt, sample) of the correct samples, distinct token ids within a prompt, at most ``max_per_prompt``
    per prompt, in sample order."""
    out = []
    for p, (group, sg) in enumerate(zip(groups, scores, strict=True)):
        seen: set[tuple[int, ...]] = set()
        for j, (c, s) in enumerate(zip(group, sg, strict=True)):
            if s.correct and tuple(c.token_ids) not in seen and (max_per_prompt is None or len(seen) < max_per_prompt):
                seen.add(tuple(c.token_ids))
                out.append((p, j))
    return out


def kept_batch(samples: list[Completion]) -> TrainBatch:
    """The samples as packable supervised rows; a multi-turn sample's own loss mask replaces the all-ones one."""
    batch = supervised_batch([(c.prompt_ids, c.token_ids) for c in samples])
    batch.loss_mask = [m if c.loss_mask is None else m[:len(c.prompt_ids) - 1] + list(c.loss_mask)
                       for m, c in zip(batch.loss_mask, samples, strict=True)]
    return batch


def restem_step(cluster: Cluster, problems: list[Problem], cfg, state: dict) -> StepOutput:
    """generate K per prompt -> score -> keep the correct -> (reset to base) -> SFT on them -> sync."""
    groups = cluster.generate(problems, n=cfg.group_size, temperature=cfg.temperature)
    scores = cluster.score(problems, groups)
    rewards_P_G = torch.tensor([[s.reward for s in g] for g in scores], dtype=torch.float64)
    metrics = rollout_metrics(groups, scores, rewards_P_G)
    kept = kept_samples(groups, scores, cfg.max_per_prompt)
    iteration = state.get("iterations", 0)
    if kept:
        if cfg.restart_from_base and iteration > 0:
            cluster.reset_policy()
        rng = random.Random(f"restem/{iteration}")  # str seeds hash the same in every process
        minibatches = math.ceil(len(kept) / cfg.batch_size)
        for _ in range(cfg.sft_epochs):
            order = rng.sample(kept, len(kept))
            metrics.update(cluster.train_step(kept_batch([groups[p][j] for p, j in order]), "sft", {}, minibatches))
        metrics.update(cluster.sync_weights())
    state["iterations"] = iteration + 1
    metrics["restem/kept"] = float(len(kept))
    metrics["restem/kept_fraction"] = len(kept) / max(1, sum(len(g) for g in groups))
    metrics["restem/prompts_with_kept"] = len({p for p, _ in kept}) / max(1, len(problems))
    metrics["restem/iteration"] = float(state["iterations"])
    chosen = set(kept)
    records = [{"prompt_id": pr.id, "sample": j, "completion": c.text, "prediction": s.prediction,
                "ground_truth": pr.answer, "reward": s.reward, "correct": s.correct, "kept": (i, j) in chosen,
                "tokens": len(c.token_ids), "policy_version": c.policy_version}
               for i, (pr, group, sg) in enumerate(zip(problems, groups, scores, strict=True))
               for j, (c, s) in enumerate(zip(group, sg, strict=True))]
    return StepOutput(metrics, records, groups, scores)
