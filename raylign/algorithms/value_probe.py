"""How well a PPO critic predicts value: its V(s) against Monte Carlo estimates at the same states.

VinePPO (Kazemnejad et al. 2024, sec. 6) measures the value network's accuracy by comparing its estimates
with MC values from many rollouts at the reasoning-step boundaries of sampled responses. ``critic_vs_mc``
does the same with the run's own machinery: sample responses, split them into steps (``split_steps``), read
the critic's value before the first token of each step (``Cluster.values``), and estimate each state with K
continuations (``vineppo.mc_rewards``, the env's reward, as the critic is trained on). Nothing is trained.
"""

from __future__ import annotations

import math

from raylign.algorithms.protocol import Cluster, completions_batch
from raylign.algorithms.step_split import split_steps
from raylign.algorithms.vineppo import step_starts, mc_rewards, mc_states
from raylign.types import Problem


def critic_at_states(values_B: list[list[float]], boundaries_B: list[list[int]], state_B: list[list[int]],
                     num_states: int) -> list[float]:
    """The critic's value of each unique state: V before the first token of the step that starts there.

    ``values_B[i][t]`` is V(s_t) of sequence i; a state reached by several sequences takes the first one's
    value (the prefixes are identical token for token, so a deterministic critic gives them the same V)."""
    out: list[float | None] = [None] * num_states
    for values, ends, row in zip(values_B, boundaries_B, state_B, strict=True):
        for start, s in zip(step_starts(ends), row, strict=True):
            if out[s] is None:
                out[s] = float(values[start])
    missing = [s for s, v in enumerate(out) if v is None]
    if missing:
        raise ValueError(f"states {missing} are reached by no sequence")
    return out  # type: ignore[return-value]


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation; None with fewer than 2 points or a constant series (undefined)."""
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} and {len(y)} values")
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def critic_vs_mc(cluster: Cluster, problems: list[Problem], samples: int, mc_rollouts: int, temperature: float,
                 step_split: str = "auto", max_steps: int = 8, mc_max_new_tokens: int | None = None) -> dict:
    """Sample ``samples`` responses per problem, then compare the critic with K-rollout MC values per state.

    Returns the correlation and mean absolute error over the unique states, with the paired values."""
    groups = cluster.generate(problems, n=samples, temperature=temperature)
    batch = completions_batch(groups, temperature)
    pieces_B = cluster.token_pieces(batch.completion_ids)
    boundaries_B = [split_steps(p, step_split, max_steps) for p in pieces_B]
    prefixes_S, state_B = mc_states(batch.prompt_ids, batch.completion_ids, boundaries_B)
    problem_B = [problems[p] for p in batch.group_B]
    rewards_S_K, _ = mc_rewards(cluster, problem_B, prefixes_S, state_B, pieces_B, boundaries_B, mc_rollouts,
                                temperature, mc_max_new_tokens)
    mc_S = rewards_S_K.mean(-1).tolist()
    critic_S = critic_at_states(cluster.values(batch), boundaries_B, state_B, len(prefixes_S))
    return {
        "states": len(mc_S),
        "correlation": pearson(critic_S, mc_S),
        "mae": sum(abs(a - b) for a, b in zip(critic_S, mc_S)) / max(1, len(mc_S)),
        "critic_mean": sum(critic_S) / max(1, len(critic_S)),
        "mc_mean": sum(mc_S) / max(1, len(mc_S)),
        "pairs": [[round(a, 4), round(b, 4)] for a, b in zip(critic_S, mc_S)],
    }
