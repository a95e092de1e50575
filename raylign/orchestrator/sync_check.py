"""After a weight sync: the canary that checks every replica serves the trainer's weights, and the one-line
description of where each replica runs and how it got its weights."""

from __future__ import annotations

from raylign.algorithms.protocol import completions_batch
from raylign.orchestrator.generator_pool import GeneratorPool, GeneratorPoolError
from raylign.orchestrator.trainer_group import TrainerGroup
from raylign.types import Completion

# Fixed chat prompts every replica samples after a sync; their log-probs must match the trainer's.
CANARY_PROMPTS = [[{"role": "user", "content": "What is 17 + 25?"}],
                  [{"role": "user", "content": "Name a river in Europe."}]]
CANARY_TOKENS = 8


def check_sync(generators: GeneratorPool, trainer: TrainerGroup, tol: float) -> float:
    """Each replica samples the canary prompts; its log-probs must match the trainer's on the same tokens within
    ``tol`` (trainer.sync_check_tol), or the replica is replaced and checked once more (then the run stops: the
    sync itself is broken). Returns the largest gap seen on the replicas that passed."""
    spec = generators.spec(temperature=1.0, n=1, max_new_tokens=CANARY_TOKENS)
    worst = 0.0
    for attempt in range(2):
        per_replica = generators.each_generate(CANARY_PROMPTS, spec)
        gaps = [canary_gap(trainer, [c for g in groups for c in g]) for groups in per_replica]
        bad = [i for i, gap in enumerate(gaps) if gap > tol]
        worst = max([worst, *[g for g in gaps if g <= tol]])
        if not bad:
            return worst
        if attempt == 1:
            raise GeneratorPoolError(f"weight sync check: replicas {bad} still differ from the trainer by "
                                     f"{max(gaps[i] for i in bad):.3f} > trainer.sync_check_tol={tol} "
                                     "in log-prob after being replaced and re-synced")
        for i in bad:
            generators.replace(i, f"failed the weight sync check (log-prob gap {gaps[i]:.3f} > {tol})")
    return worst


def canary_gap(trainer: TrainerGroup, completions: list[Completion]) -> float:
    trainer_lp = trainer.logprobs(completions_batch([completions]))
    return max((abs(a - b) for c, lp in zip(completions, trainer_lp, strict=True)
                for a, b in zip(c.logprobs, lp, strict=True)), default=0.0)


def describe_sync_layout(layout: dict) -> str:
    """One line: which transport each replica got, with short node ids."""
    replicas = "; ".join(f"replica {r['replica']} on node {r['node'][:8]} by {r['transport']}" for r in layout["replicas"])
    return f"trainer rank 0 on node {layout['trainer_node'][:8]}; {replicas}"
