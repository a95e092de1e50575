"""DPO from preference pairs (Rafailov et al. 2023), with the IPO and DPO-positive losses, offline or online.

Offline (``dpo``): each step takes ``batch_size`` pairs (prompt, chosen, rejected), computes the frozen
reference's log-probs of both halves (once per pair: the cluster caches the reference's answers), and takes
one optimizer step on ``offline_losses.dpo_loss``. A pair is one group: its two halves share a packed row
(the prompt computed once) and never leave one micro-batch. Online (``online_dpo``, the VinePPO seed's
episode generator): sample G responses per prompt from the current policy, score them, pair correct with
incorrect ones (at most ``pairs_per_prompt`` per prompt, the longest-lived first: sample order), train on
those pairs and sync. A prompt whose samples are all right or all wrong gives no pair
(``pairs/prompts_without_pair``); a step with no pair at all trains nothing.
"""

from __future__ import annotations

import torch

from raylign.algorithms.policy_gradient import rollout_metrics
from raylign.algorithms.protocol import Cluster, StepOutput
from raylign.types import Pair, Problem, TrainBatch


def pair_batch(encoded: list[tuple[list[int], list[int], list[int]]]) -> TrainBatch:
    """(prompt, chosen, rejected) token ids as rows 2k (chosen) and 2k+1 (rejected), one group per pair."""
    return TrainBatch(
        prompt_ids=[p for p, _, _ in encoded for _ in range(2)],
        completion_ids=[ids for _, c, r in encoded for ids in (c, r)],
        loss_mask=[[1] * len(ids) for _, c, r in encoded for ids in (c, r)],
        fields={"chosen_B": [1.0, 0.0] * len(encoded)},
        group_B=[k for k in range(len(encoded)) for _ in range(2)],
    )


def encode_pairs(cluster: Cluster, pairs: list[Pair]) -> list[tuple[list[int], list[int], list[int]]]:
    chosen = cluster.encode([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = cluster.encode([p.prompt for p in pairs], [p.rejected for p in pairs])
    return [(pc, c, r) for (pc, c), (_, r) in zip(chosen, rejected, strict=True)]


def dpo_kwargs(cfg) -> dict:
    return dict(beta=cfg.beta, loss_type=cfg.loss_type, dpop_lambda=cfg.dpop_lambda,
                label_smoothing=cfg.label_smoothing)


def dpo_step(cluster: Cluster, pairs: list[Pair], cfg, state: dict) -> StepOutput:
    """encode -> reference log-probs -> one optimizer step on the DPO loss -> mark the weights for sync."""
    batch = pair_batch(encode_pairs(cluster, pairs))
    batch.fields["ref_logprobs_B_T"] = cluster.logprobs(batch, which="ref")
    metrics = cluster.train_step(batch, "dpo", dpo_kwargs(cfg), 1)
    metrics.update(cluster.sync_weights(lazy=True))
    records = [{"pair_id": p.id, "source": p.source, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    return StepOutput(metrics, records)


def correct_incorrect_pairs(correct_P_G: list[list[bool]], per_prompt: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen sample, rejected sample) for up to ``per_prompt`` disjoint (correct, incorrect) pairs
    of each prompt, in sample order."""
    out = []
    for p, row in enumerate(correct_P_G):
        good = [j for j, ok in enumerate(row) if ok]
        bad = [j for j, ok in enumerate(row) if not ok]
        out += [(p, g, b) for g, b in list(zip(good, bad))[:per_prompt]]
    return out


def online_dpo_step(cluster: Cluster, problems: list[Problem], cfg, state: dict) -> StepOutput:
    """generate G per prompt -> score -> pair correct with incorrect -> reference log-probs -> DPO -> sync."""
    groups = cluster.generate(problems, n=cfg.group_size, temperature=cfg.temperature)
    scores = cluster.score(problems, groups)
    rewards_P_G = torch.tensor([[s.reward for s in g] for g in scores], dtype=torch.float64)
    metrics = rollout_metrics(groups, scores, rewards_P_G)
    chosen = correct_incorrect_pairs([[s.correct for s in g] for g in scores], cfg.pairs_per_prompt)
    metrics["pairs/count"] = float(len(chosen))
    metrics["pairs/prompts_without_pair"] = float(len(problems) - len({p for p, _, _ in chosen}))
    if chosen:
        encoded = [(groups[p][g].prompt_ids, groups[p][g].token_ids, groups[p][b].token_ids) for p, g, b in chosen]
        batch = pair_batch(encoded)  # DPO's implicit reward is of pi and ref themselves: temperature 1
        batch.fields["ref_logprobs_B_T"] = cluster.logprobs(batch, which="ref")
        metrics.update(cluster.train_step(batch, "dpo", dpo_kwargs(cfg), 1))
        metrics.update(cluster.sync_weights())
    role = {(p, j): r for p, g, b in chosen for j, r in ((g, "chosen"), (b, "rejected"))}
    records = [{"prompt_id": pr.id, "sample": j, "completion": c.text, "prediction": s.prediction,
                "ground_truth": pr.answer, "reward": s.reward, "correct": s.correct,
                "pair": role.get((i, j)), "tokens": len(c.token_ids), "policy_version": c.policy_version}
               for i, (pr, group, sg) in enumerate(zip(problems, groups, scores, strict=True))
               for j, (c, s) in enumerate(zip(group, sg, strict=True))]
    return StepOutput(metrics, records, groups, scores)
