"""VinePPO (Kazemnejad et al. 2024, arXiv 2410.01679): PPO whose critic is replaced by Monte Carlo values.

Each response y to prompt x is split into reasoning steps (``step_split``); s_0 = x and s_k = (x, y_<b_k) is
the state at the k-th step boundary. From every state K continuations eta_j ~ pi_theta(. | s_k) are sampled
and V(s_k) = 1/K sum_j R(x, y_<b_k + eta_j) (sec. 4). With the reward only at the end and gamma = 1, step k
gets A(s_k, a_k) = r + gamma V(s_{k+1}) - V(s_k) = V(s_{k+1}) - V(s_k), where the state after the last step
is terminal and "worth" the trajectory's own reward R(x, y), so the last step gets R(x, y) - V(s_last).
Every token of a step gets its step's advantage; the loss is PPO's clipped surrogate, no critic, no value
loss; continuations are only scored, never trained on. Departures and choices:
- identical (prompt + partial response) token prefixes are estimated once for the whole batch: s_0 is shared
  by the G samples of a prompt (as the paper notes), and by identical first steps; one continue_from call.
- a response or continuation cut by the length limit gets ``truncation_penalty`` as its reward (null: keeps
  its score); the continuation cap mc_max_new_tokens counts new tokens only, so prefix + continuation may pass
  the response cap.
- steps are capped at max_steps_per_response by merging the shortest steps (``split_steps``).
- gamma and lam are not used (gamma = 1 as in the paper; MC values need no lambda).
- advantages are whitened over the batch's loss-mask tokens when ``whiten_advantages``; entropy_coef > 0 adds
  an entropy bonus (loss "policy_entropy"); KL (kl_beta > 0) is a loss term as in GRPO, not in the reward.
- a state is scored with the problem of the first sequence reaching it; multi-turn episodes are not
  special-cased (a boundary inside tool output is continued by the policy alone, without the tool).
``StepOutput.advantages_P_G`` is each sequence's mean token advantage (as trained), for the rollout log.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from raylign.algorithms.numerics import masked_mean, masked_whiten
from raylign.algorithms.policy_gradient import rollout_metrics, rollout_output
from raylign.algorithms.ppo import pad_B_T, penalize_truncated, rows
from raylign.algorithms.protocol import Cluster, StepOutput, add_tis, completions_batch
from raylign.algorithms.step_split import split_steps
from raylign.types import Problem
from raylign.types import TrainBatch


def vineppo_step(cluster: Cluster, problems: list[Problem], cfg, state: dict) -> StepOutput:
    """generate -> score -> split steps -> MC values of the unique states -> step advantages -> train -> sync."""
    groups = cluster.generate(problems, n=cfg.group_size, temperature=cfg.temperature)
    scores = cluster.score(problems, groups)
    rewards_P_G = penalize_truncated(scores, groups, cfg.truncation_penalty)
    batch = completions_batch(groups, cfg.temperature)
    metrics = rollout_metrics(groups, scores, rewards_P_G)

    pieces_B = cluster.token_pieces(batch.completion_ids)
    boundaries_B = [split_steps(p, cfg.step_split, cfg.max_steps_per_response) for p in pieces_B]
    prefixes_S, state_B = mc_states(batch.prompt_ids, batch.completion_ids, boundaries_B)
    problem_B = [p for p, g in enumerate(groups) for _ in g]
    rewards_S_K, mc_metrics = mc_rewards(cluster, [problems[i] for i in problem_B], prefixes_S, state_B, pieces_B,
                                         boundaries_B, cfg.mc_rollouts, cfg.temperature, cfg.mc_max_new_tokens,
                                         cfg.truncation_penalty)
    values_B = step_values(rewards_S_K, state_B)

    lengths_B = [len(ids) for ids in batch.completion_ids]
    mask_B_T = pad_B_T(batch.loss_mask, max(1, max(lengths_B)))
    adv_B_T = step_advantages(values_B, rewards_P_G.flatten(), boundaries_B, mask_B_T.shape[1])
    if cfg.whiten_advantages:
        adv_B_T = masked_whiten(adv_B_T, mask_B_T)
    batch.fields["advantages_B"] = rows(adv_B_T, lengths_B)
    loss_name, loss_kwargs = _policy_loss(cluster, batch, cfg)
    add_tis(batch, groups, loss_kwargs, cfg.tis_cap)
    for _ in range(cfg.epochs):
        metrics.update(cluster.train_step(batch, loss_name, loss_kwargs, cfg.minibatches))
    metrics.update(cluster.sync_weights())
    metrics.update(mc_metrics)
    metrics["steps/mean"] = sum(map(len, boundaries_B)) / max(1, sum(n > 0 for n in lengths_B))
    metrics["advantage/abs_mean"] = masked_mean(adv_B_T.abs(), mask_B_T).item()
    return rollout_output(problems, groups, scores, masked_mean(adv_B_T, mask_B_T, dim=-1).view_as(rewards_P_G),
                          metrics)


def mc_states(prompt_ids_B: list[list[int]], completion_ids_B: list[list[int]],
              boundaries_B: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """The unique states to estimate, and which one each step starts from.

    Sequence i with step ends [b_1, ..., b_m] has states starting its m steps: prompt + completion[:s] for
    s in [0, b_1, ..., b_{m-1}] (the state after b_m is terminal, an empty response has none). Returns
    (prefixes_S, state_B) with state_B[i][k] the index in prefixes_S of the state step k of sequence i
    starts from; identical token prefixes anywhere in the batch share one index, in first-seen order.
    """
    index: dict[tuple[int, ...], int] = {}
    prefixes_S: list[list[int]] = []
    state_B: list[list[int]] = []
    for prompt, completion, ends in zip(prompt_ids_B, completion_ids_B, boundaries_B, strict=True):
        row = []
        for start in step_starts(ends):
            prefix = list(prompt) + list(completion[:start])
            s = index.setdefault(tuple(prefix), len(prefixes_S))
            if s == len(prefixes_S):
                prefixes_S.append(prefix)
            row.append(s)
        state_B.append(row)
    return prefixes_S, state_B


@torch.no_grad()
def step_values(rewards_S_K: torch.Tensor, state_B: list[list[int]]) -> list[list[float]]:
    """V(s) = mean of the K continuation rewards of state s, gathered per sequence like ``state_B``."""
    values_S = rewards_S_K.mean(-1).tolist()
    return [[values_S[s] for s in row] for row in state_B]


@torch.no_grad()
def step_advantages(values_B: list[list[float]], rewards_B: torch.Tensor, boundaries_B: list[list[int]],
                    T: int) -> torch.Tensor:
    """Per-token advantages (B, T), 0 on padding: every token of step k gets V(s_{k+1}) - V(s_k).

    values_B[i][k] is V at the start of step k; the value after the last step is the trajectory's reward.
    """
    adv_B_T = torch.zeros((len(boundaries_B), T), dtype=torch.float64)
    for i, (values, ends) in enumerate(zip(values_B, boundaries_B, strict=True)):
        if not ends:
            continue  # an empty response: no tokens, no steps
        next_values = list(values[1:]) + [float(rewards_B[i])]
        for start, end, v, v_next in zip(step_starts(ends), ends, values, next_values, strict=True):
            adv_B_T[i, start:end] = v_next - v
    return adv_B_T


def step_starts(ends: list[int]) -> list[int]:
    """Token index where each step starts, from the step ends (0 first; [] for an empty response)."""
    return [0] + list(ends[:-1]) if ends else []


def mc_rewards(cluster: Cluster, problem_B: list[Problem], prefixes_S, state_B, pieces_B, boundaries_B, K: int,
               temperature: float, max_new_tokens: int | None = None, truncation_penalty: float | None = None,
               success: bool = False):
    """Score K continuations of every unique state in one continue_from and one score call: (S, K) rewards
    (with ``success``: 1.0 for a correct continuation, else 0.0, so a state's mean is its success rate).

    ``problem_B[i]`` is the problem sequence i answers (it scores every continuation of a state i reaches
    first); ``pieces_B`` the text of each completion token (the partial response is scored with them)."""
    if not prefixes_S:  # only empty responses: nothing to estimate
        return torch.zeros((0, K), dtype=torch.float64), {"mc/states": 0.0, "mc/states_before_dedup": 0.0,
                                                          "mc/calls": 0.0, "tokens/mc_rollouts": 0.0}
    origin_S: dict[int, tuple[int, int]] = {}  # state -> (a sequence reaching it, its response length there)
    for i, row in enumerate(state_B):
        for s, start in zip(row, step_starts(boundaries_B[i])):
            origin_S.setdefault(s, (i, start))
    conts_S_K = cluster.continue_from(prefixes_S, n=K, temperature=temperature, max_new_tokens=max_new_tokens)
    # the env scores the whole response: the partial response up to the boundary, then the continuation
    groups_S = [[replace(c, text="".join(pieces_B[i][:start]) + c.text) for c in conts_S_K[s]]
                for s, (i, start) in sorted(origin_S.items())]
    scores_S = cluster.score([problem_B[i] for _, (i, _) in sorted(origin_S.items())], groups_S)
    if success:
        rewards_S_K = torch.tensor([[float(s.correct) for s in g] for g in scores_S], dtype=torch.float64)
    else:
        rewards_S_K = penalize_truncated(scores_S, conts_S_K, truncation_penalty)
    metrics = {
        "mc/states": float(len(prefixes_S)),
        "mc/states_before_dedup": float(sum(map(len, state_B))),
        "mc/calls": 1.0,
        "tokens/mc_rollouts": float(sum(len(c.token_ids) for conts in conts_S_K for c in conts)),
        "value/mean": rewards_S_K.mean().item(),
        "value/std": rewards_S_K.mean(-1).std().item() if len(prefixes_S) > 1 else 0.0,
        "value/s0_mean": rewards_S_K[sorted({row[0] for row in state_B if row})].mean().item(),
    }
    return rewards_S_K, metrics


def _policy_loss(cluster: Cluster, batch: TrainBatch, cfg) -> tuple[str, dict]:
    """The critic-free clipped loss, with the reference / old log-probs it needs (as policy_gradient.py)."""
    loss_kwargs = dict(clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, agg=cfg.loss_agg,
                       kl_beta=cfg.kl_beta, kl_kind=cfg.kl_kind, max_tokens=cluster.max_new_tokens)
    if cfg.kl_beta > 0:
        batch.fields["ref_logprobs_B_T"] = cluster.logprobs(batch, which="ref")
    on_policy = cfg.epochs == 1 and cfg.minibatches == 1
    if not on_policy:
        batch.fields["old_logprobs_B_T"] = cluster.logprobs(batch)
    if cfg.entropy_coef > 0:
        return "policy_entropy", {**loss_kwargs, "entropy_coef": cfg.entropy_coef}
    return ("policy_gradient_on_policy" if on_policy else "policy_gradient"), loss_kwargs
