"""Stepwise DPO (the futureAGI seed): DPO whose token log-ratios are weighted by the score of their step.

For a pair (x, y_w, y_l) with per-token log-ratios l_t = log pi(y_t | x, y_<t) - log ref(y_t | x, y_<t):
    h = sum_t w^w_t l^w_t - sum_t w^l_t l^l_t,   loss = -log sigmoid(beta h)   (``stepwise_dpo_loss``)
w^w_t = s(step of t in y_w) and w^l_t = 1 - s(step of t in y_l), with step scores s in [0, 1]: the good steps
of the chosen response are pushed up most, the bad steps of the rejected one pushed down most. With every
chosen score 1 and every rejected score 0 all weights are 1 and h is DPO's (Rafailov et al. 2023, eq. 7).
Steps are the non-empty lines (``step_delimiter``) of a response; a token belongs to the step its last
character falls in (the end-of-turn token to the last step). Scores come from (``step_scores``):
- ``data``: the pairs' ``scores_chosen`` / ``scores_rejected`` (one per step or per token); a pair without
  them is plain DPO (chosen 1, rejected 0);
- ``mc``: Monte Carlo, as Math-Shepherd (Wang et al. 2024) but from the current policy: a step's score is the
  success rate (share judged correct by the env) of K continuations from the prefix that ends with it
  (VinePPO's deduplicated ``continue_from`` batch, ``vineppo.mc_rewards``); the last step scores whether the
  response itself is correct. Needs
  the pairs' ground truth (``Pair.answer``) and the env's reward;
- ``judge``: a frozen judge model on its own generator actor scores each step from a prompt template
  (``envs.judge.STEP_TEMPLATE``); an unparseable verdict scores 0 and is counted (``judge/unparseable``).
"""

from __future__ import annotations

from bisect import bisect_right

import torch

from raylign.algorithms.dpo import encode_pairs, pair_batch
from raylign.algorithms.protocol import Cluster, StepOutput
from raylign.algorithms.vineppo import mc_rewards, mc_states, step_values
from raylign.envs.judge import STEP_TEMPLATE, parse_verdict, step_judge_requests
from raylign.envs.pairs import step_spans, token_scores
from raylign.types import Completion, Pair, Problem


def step_dpo_step(cluster: Cluster, pairs: list[Pair], cfg, state: dict) -> StepOutput:
    """encode -> step scores (data, MC or judge) -> per-token weights -> reference log-probs -> train."""
    encoded = encode_pairs(cluster, pairs)
    batch = pair_batch(encoded)
    responses = [text for p in pairs for text in (p.chosen, p.rejected)]
    pieces_B = cluster.token_pieces(batch.completion_ids)
    ends_B = [_char_ends(pieces) for pieces in pieces_B]
    spans_B = [step_spans(text, cfg.step_delimiter) for text in responses]
    step_scores_B, metrics = STEP_SCORES[cfg.step_scores](cluster, pairs, batch, pieces_B, ends_B, spans_B, cfg)
    weights_B = []
    for i, (scores, ends, spans) in enumerate(zip(step_scores_B, ends_B, spans_B, strict=True)):
        per_token = token_scores(scores, len(ends), ends, spans)
        weights_B.append(per_token if i % 2 == 0 else [1.0 - s for s in per_token])
    batch.fields["token_weights_B_T"] = weights_B
    batch.fields["ref_logprobs_B_T"] = cluster.logprobs(batch, which="ref")
    metrics.update(cluster.train_step(batch, "step_dpo", {"beta": cfg.beta}, 1))
    metrics.update(cluster.sync_weights(lazy=True))
    records = [{"pair_id": p.id, "source": p.source, "chosen": p.chosen, "rejected": p.rejected,
                "scores_chosen": step_scores_B[2 * k], "scores_rejected": step_scores_B[2 * k + 1]}
               for k, p in enumerate(pairs)]
    return StepOutput(metrics, records)


def _char_ends(pieces: list[str]) -> list[int]:
    ends, n = [], 0
    for piece in pieces:
        n += len(piece)
        ends.append(n)
    return ends


def _data_scores(cluster, pairs, batch, pieces_B, ends_B, spans_B, cfg):
    out = []
    for k, p in enumerate(pairs):
        if p.scores_chosen is None:  # no scores: plain DPO
            out += [[1.0] * len(spans_B[2 * k]), [0.0] * len(spans_B[2 * k + 1])]
        else:
            out += [list(p.scores_chosen), list(p.scores_rejected)]
    return out, {}


def step_boundaries(ends: list[int], spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(the steps that own at least one token, the token index just past each of them), with tokens assigned to
    steps exactly as ``token_scores`` assigns them (by their last character)."""
    stops = [end for _, end in spans]
    step_of_t = [min(bisect_right(stops, e - 1), len(spans) - 1) for e in ends]
    steps = sorted(set(step_of_t))
    return steps, [max(t for t, k in enumerate(step_of_t) if k == s) + 1 for s in steps]


def _mc_scores(cluster, pairs, batch, pieces_B, ends_B, spans_B, cfg):
    problems = [Problem(p.id, p.prompt, p.answer) for p in pairs]
    problem_B = [problems[i // 2] for i in range(len(batch))]
    owned_B, boundaries_B = zip(*(step_boundaries(e, s) for e, s in zip(ends_B, spans_B, strict=True)))
    prefixes_S, state_B = mc_states(batch.prompt_ids, batch.completion_ids, list(boundaries_B))
    rewards_S_K, metrics = mc_rewards(cluster, problem_B, prefixes_S, state_B, pieces_B, list(boundaries_B),
                                      cfg.mc_rollouts, cfg.mc_temperature, success=True)
    values_B = step_values(rewards_S_K, state_B)
    full = [Completion(p, c, "".join(pieces), [], "stop")
            for p, c, pieces in zip(batch.prompt_ids, batch.completion_ids, pieces_B, strict=True)]
    own = [float(s.correct) for g in cluster.score(problem_B, [[c] for c in full]) for s in g]
    # a step's score: the value of the state it ends in; the last step ends the response (its own reward).
    # A step that owns no token (one token spans it) keeps 0: no token carries its weight.
    scores_B = []
    for i, (owned, values) in enumerate(zip(owned_B, values_B, strict=True)):
        scores = [0.0] * len(spans_B[i])
        for s, v in zip(owned, list(values[1:]) + [own[i]], strict=True):
            scores[s] = v
        scores_B.append(scores)
    metrics["mc/score_mean_chosen"] = float(torch.tensor([s for b in scores_B[::2] for s in b]).mean())
    metrics["mc/score_mean_rejected"] = float(torch.tensor([s for b in scores_B[1::2] for s in b]).mean())
    return scores_B, metrics


def _judge_scores(cluster, pairs, batch, pieces_B, ends_B, spans_B, cfg):
    template = cfg.judge_template or STEP_TEMPLATE
    requests, owner = [], []
    for i, (spans, pair) in enumerate(zip(spans_B, [p for p in pairs for _ in range(2)], strict=True)):
        text = pair.chosen if i % 2 == 0 else pair.rejected
        steps = [text[a:b].strip() for a, b in spans]
        requests += step_judge_requests(pair.prompt[-1]["content"], steps, template)
        owner += [i] * len(steps)
    verdicts = [parse_verdict(a) for a in cluster.judge(requests, cfg.judge_max_new_tokens)]
    scores_B: list[list[float]] = [[] for _ in range(len(batch))]
    for i, v in zip(owner, verdicts, strict=True):
        scores_B[i].append(0.0 if v is None else v)
    unparseable = sum(v is None for v in verdicts)
    return scores_B, {"judge/requests": float(len(verdicts)), "judge/unparseable": float(unparseable),
                      "judge/unparseable_rate": unparseable / max(1, len(verdicts)),
                      "judge/score_mean": sum(v for v in verdicts if v is not None) / max(1, len(verdicts) - unparseable)}


STEP_SCORES = {"data": _data_scores, "mc": _mc_scores, "judge": _judge_scores}
