"""DAPO's rules and REINFORCE++ by hand, and dynamic sampling against an in-process Cluster whose rewards are
known per prompt: how many extra generate calls it makes, how many prompts each asks for, and the batch it
trains on."""

import math

import pytest
import torch
from torch.testing import assert_close

from raylign.algorithms.advantages import reinforce_pp_advantages
from raylign.algorithms.dapo import mask_truncated, overlong_penalty, sample_groups, tied_groups
from raylign.algorithms.policy_gradient import policy_gradient_step
from raylign.algorithms.protocol import completions_batch
from raylign.config import ALGORITHM_CONFIGS, ConfigError, load_config
from raylign.orchestrator.checkpoint import PromptStream
from raylign.types import Completion, Problem, Score

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def test_overlong_penalty_is_dapo_eq_13():
    # L_max 10, L_cache 4: 0 up to 6 tokens, then (6 - |y|) / 4, -1 from 10 on; times the factor 0.5
    lengths = t([0, 6, 7, 8, 10, 12])
    assert_close(overlong_penalty(lengths, 10, 4, 0.5), t([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))
    assert_close(overlong_penalty(t([1, 2]), 2, 2), t([-0.5, -1.0]))  # the buffer may be the whole budget
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 10, 11)


def test_tied_groups_and_reinforce_pp_by_hand():
    rewards = t([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1]])
    assert tied_groups(rewards).tolist() == [False, True]
    # REINFORCE++: batch mean 0.3, deviations .7 -.3 -.3 .7 -.2 x4, unbiased std sqrt(1.32 / 7)
    dev = t([[0.7, -0.3, -0.3, 0.7], [-0.2] * 4])
    assert_close(reinforce_pp_advantages(rewards, eps=0.0), dev / math.sqrt(1.32 / 7))
    # -baseline: group-centred .5 -.5 -.5 .5 0 x4, divided by their batch std sqrt(1 / 7); the tied group stays 0
    adv = reinforce_pp_advantages(rewards, group_baseline=True, eps=0.0)
    assert_close(adv, t([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]) * math.sqrt(7.0))
    assert torch.equal(adv[1], torch.zeros(4, dtype=F64))
    assert torch.equal(reinforce_pp_advantages(t([[0.3, 0.3], [0.3, 0.3]])), torch.zeros(2, 2, dtype=F64))
    assert torch.equal(reinforce_pp_advantages(t([[2.0]])), torch.zeros(1, 1, dtype=F64))  # one sample, no std


def _problem(kind: str, k: int) -> Problem:
    return Problem(id=f"{kind}{k}", messages=[{"role": "user", "content": "q"}], answer="1", meta={"kind": kind})


# per kind: each sample's (reward, finish_reason, completion length); "t" groups are tied, "m" groups mixed
KINDS = {"t": [(0.0, "stop", 2)] * 4, "m": [(1.0, "stop", 2), (0.0, "length", 8), (0.0, "stop", 7), (1.0, "stop", 3)]}


class PromptCluster:
    """generate/score by each prompt's kind; next_prompts serves a queue of prompts and records each request."""

    max_new_tokens = 8

    def __init__(self, queue: list[Problem]):
        self.queue, self.requests, self.generated, self.train = list(queue), [], [], []
        self.version = 0

    def next_prompts(self, n):
        self.requests.append(n)
        out, self.queue = self.queue[:n], self.queue[n:]
        return out

    def generate(self, problems, n, temperature):
        self.generated.append([p.id for p in problems])
        return [[Completion([1, 2], [5] * KINDS[p.meta["kind"]][j][2], f"{p.id}-{j}", [-1.0] * KINDS[p.meta["kind"]][j][2],
                            KINDS[p.meta["kind"]][j][1], policy_version=self.version) for j in range(n)] for p in problems]

    def score(self, problems, groups):
        return [[Score(KINDS[p.meta["kind"]][j][0], KINDS[p.meta["kind"]][j][0] == 1.0, "x", True)
                 for j in range(len(g))] for p, g in zip(problems, groups)]

    def logprobs(self, batch, which="policy"):
        return [[-0.7] * len(ids) for ids in batch.completion_ids]

    def train_step(self, batch, loss_name, loss_kwargs, minibatches=1):
        self.train.append((batch, loss_name, loss_kwargs, minibatches))
        return {"loss/policy": 0.0}

    def sync_weights(self):
        self.version += 1
        return {}


def _kinds(spec: str, start: int = 0) -> list[Problem]:
    return [_problem(k, start + i) for i, k in enumerate(spec)]


def _dapo(**fields):
    return ALGORITHM_CONFIGS["grpo"](group_size=4, dynamic_sampling=True, **fields)


def test_dynamic_sampling_asks_for_the_missing_groups_over_the_share_kept():
    # 3 of 4 kept: 1 missing / 0.75 kept -> ceil(1.33) = 2 more prompts, one call, the first mixed one fills it
    cluster = PromptCluster(_kinds("tm", start=10))
    problems, groups, scores, rewards, metrics = sample_groups(cluster, _kinds("mmtm"), _dapo(prompts_per_step=4))
    assert cluster.requests == [2] and cluster.generated == [["m0", "m1", "t2", "m3"], ["t10", "m11"]]
    assert [p.id for p in problems] == ["m0", "m1", "m3", "m11"] and len(groups) == 4 and rewards.shape == (4, 4)
    assert metrics == {"filter/dropped_groups": 2.0, "filter/extra_generate_calls": 1.0, "filter/refilled_groups": 0.0}
    assert not tied_groups(rewards).any()


def test_dynamic_sampling_stops_at_the_cap_and_fills_with_tied_groups():
    # nothing is kept: every extra call asks for the whole P; after 2 calls the batch is filled with tied groups
    cluster = PromptCluster(_kinds("tttttt", start=10))
    problems, _, _, rewards, metrics = sample_groups(cluster, _kinds("tt"), _dapo(prompts_per_step=2,
                                                                                 max_extra_generate_calls=2))
    assert cluster.requests == [2, 2] and len(cluster.generated) == 3
    assert [p.id for p in problems] == ["t0", "t1"] and rewards.shape == (2, 4)
    assert metrics == {"filter/dropped_groups": 4.0, "filter/extra_generate_calls": 2.0, "filter/refilled_groups": 2.0}
    cluster = PromptCluster(_kinds("m"))
    _, _, _, _, metrics = sample_groups(cluster, _kinds("tt"), _dapo(prompts_per_step=2, max_extra_generate_calls=0))
    assert cluster.requests == [] and metrics["filter/extra_generate_calls"] == 0.0  # cap 0: plain GRPO sampling


def test_dapo_step_trains_on_a_full_batch_with_overlong_filtering_and_shaping():
    cluster = PromptCluster(_kinds("mtmm", start=10))
    cfg = _dapo(prompts_per_step=3, overlong_filter=True, overlong_buffer=4, clip_eps=0.2, clip_eps_high=0.28)
    out = policy_gradient_step(cluster, _kinds("tmt"), cfg, {})
    # kept 1 of 3: 2 missing / (1/3) = 6 -> at most P = 3 prompts: m10, t11, m12 -> 3 mixed groups in one call
    assert cluster.requests == [3] and [r["prompt_id"] for r in out.records[::4]] == ["m1", "m10", "m12"]
    (batch, loss_name, kwargs, _), = cluster.train
    assert len(batch) == 12 and batch.group_B == [0] * 4 + [1] * 4 + [2] * 4
    assert loss_name == "policy_gradient_on_policy" and kwargs["clip_eps_high"] == 0.28 and kwargs["agg"] == "token"
    # the sample cut at the length limit keeps its reward in the group but trains on nothing
    assert batch.loss_mask[1] == [0] * 8 and batch.loss_mask[0] == [1, 1] and batch.loss_mask[2] == [1] * 7
    # shaping (L_max 8, buffer 4): lengths 2, 8, 7, 3 -> 0, -1, -0.75, 0 on rewards 1, 0, 0, 1
    shaped = t([1.0, -1.0, -0.75, 1.0])
    centred = shaped - shaped.mean()
    assert_close(t(batch.fields["advantages_B"][:4]), centred / (shaped.std() + 1e-6))
    assert out.metrics["reward/overlong_penalty"] == pytest.approx(-1.75 / 4)
    assert out.metrics["filter/truncated_masked"] == 3.0 and out.metrics["filter/dropped_groups"] == 3.0  # t0 t2 t11
    assert out.metrics["filter/extra_generate_calls"] == 1.0


def test_mask_truncated_counts_and_leaves_the_others():
    groups = [[Completion([1], [2, 3], "", [0.0, 0.0], "length"), Completion([1], [2], "", [0.0], "stop",
                                                                            loss_mask=[1])]]
    batch = completions_batch(groups)
    assert mask_truncated(batch, groups) == 1 and batch.loss_mask == [[0, 0], [1]]


@pytest.mark.parametrize("policy_loss, minibatches, loss_name", [
    ("gspo", 1, "gspo"), ("gspo", 2, "gspo"), ("cispo", 2, "cispo"), ("clip", 2, "policy_gradient")])
def test_policy_loss_picks_the_registered_loss(policy_loss, minibatches, loss_name):
    cluster = PromptCluster([])
    cfg = ALGORITHM_CONFIGS["reinforce_pp"](group_size=4, prompts_per_step=2, policy_loss=policy_loss,
                                            minibatches=minibatches, clip_eps=3e-4, clip_eps_high=4e-4)
    out = policy_gradient_step(cluster, _kinds("mt"), cfg, {})
    (batch, name, kwargs, mb), = cluster.train
    assert name == loss_name and mb == minibatches
    assert ("old_logprobs_B_T" in batch.fields) == (minibatches > 1)
    assert ("agg" in kwargs) == (policy_loss != "gspo") and kwargs["clip_eps"] == 3e-4
    # REINFORCE++ over the batch: rewards 1 0 0 1 and 0 x4 -> mean 0.25, unbiased std sqrt(1.5 / 7)
    assert batch.fields["advantages_B"][0] == pytest.approx(0.75 / (math.sqrt(1.5 / 7) + 1e-6))
    assert "filter/dropped_groups" not in out.metrics


def test_variant_config_checks():
    with pytest.raises(ValueError, match="policy_loss=gspo averages over sequences"):
        ALGORITHM_CONFIGS["grpo"](policy_loss="gspo", loss_agg="token")
    ALGORITHM_CONFIGS["grpo"](policy_loss="gspo", loss_agg="sequence")
    with pytest.raises(ValueError, match="dynamic_sampling needs group_size >= 2"):
        ALGORITHM_CONFIGS["reinforce_pp"](group_size=1, dynamic_sampling=True)
    with pytest.raises(ValueError, match="group_baseline needs group_size >= 2"):
        ALGORITHM_CONFIGS["reinforce_pp"](group_size=1, group_baseline=True)
    with pytest.raises(ConfigError, match=r"overlong_buffer \(64\) exceeds generator.max_new_tokens \(32\)"):
        load_config(None, ["generator.max_new_tokens=32", "algorithm.overlong_buffer=64"], environ={})


def test_prompt_stream_take_continues_the_same_order():
    a, b = PromptStream(list(range(5)), 2, seed=1), PromptStream(list(range(5)), 2, seed=1)
    assert a.next() + a.take(3) + a.next() == b.take(7)
    assert a.state_dict() == b.state_dict() == {"epoch": 1, "position": 2}
