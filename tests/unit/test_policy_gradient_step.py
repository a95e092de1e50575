"""The GRPO / RLOO / REINFORCE step against an in-process Cluster whose rewards are known."""

import pytest

from raylign.algorithms.policy_gradient import policy_gradient_step
from raylign.config import ALGORITHM_CONFIGS

from raylign.types import Completion, Problem, Score, TrainBatch


def AlgorithmConfig(name: str = "grpo", **fields):
    return ALGORITHM_CONFIGS[name](**fields)

REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1]]  # prompt 0: two right; prompt 1: no signal


class FakeCluster:
    max_new_tokens = 64

    def __init__(self):
        self.calls: list[tuple] = []
        self.version = 0

    def generate(self, problems, n, temperature):
        self.calls.append(("generate", n, temperature))
        return [[Completion(prompt_ids=[1, 2], token_ids=[10 + j, 2], text=f"{i}-{j}", logprobs=[-1.0, -0.5],
                            finish_reason="stop", policy_version=self.version) for j in range(n)]
                for i in range(len(problems))]

    def score(self, problems, groups):
        return [[Score(reward=REWARDS[i][j], correct=REWARDS[i][j] == 1.0, prediction="x", format_ok=True)
                 for j in range(len(g))] for i, g in enumerate(groups)]

    def logprobs(self, batch: TrainBatch, which="policy"):
        self.calls.append(("logprobs", which))
        return [[-0.7] * len(ids) for ids in batch.completion_ids]

    def train_step(self, batch, loss_name, loss_kwargs, minibatches=1):
        self.calls.append(("train_step", batch, loss_name, loss_kwargs, minibatches))
        return {"loss/policy": 0.5}

    def sync_weights(self):
        self.version += 1
        self.calls.append(("sync",))
        return {"policy/version": float(self.version)}


PROBLEMS = [Problem(id=f"p{i}", messages=[{"role": "user", "content": "q"}], answer="1") for i in range(2)]


def _train_calls(cluster):
    return [c for c in cluster.calls if c[0] == "train_step"]


def test_grpo_step_sends_group_normalised_advantages():
    cluster, state = FakeCluster(), {}
    out = policy_gradient_step(cluster, PROBLEMS, AlgorithmConfig(name="grpo", group_size=4, temperature=0.9), state)
    (_, batch, loss_name, kwargs, minibatches), = _train_calls(cluster)
    # Group 0: mean 0.5, unbiased std sqrt(1/3) -> +-0.866; group 1 has zero variance -> 0.
    s = 0.5 / (1 / 3) ** 0.5
    assert batch.fields["advantages_B"] == pytest.approx([s, -s, -s, s, 0, 0, 0, 0], abs=1e-5)
    assert loss_name == "policy_gradient_on_policy" and minibatches == 1
    assert kwargs["kl_beta"] == 0.0 and kwargs["agg"] == "token"
    assert "ref_logprobs_B_T" not in batch.fields and "old_logprobs_B_T" not in batch.fields
    assert batch.completion_ids[1] == [11, 2] and batch.loss_mask[0] == [1, 1]
    assert cluster.calls[0] == ("generate", 4, 0.9) and cluster.calls[-1] == ("sync",)
    assert out.metrics["reward/mean"] == pytest.approx(0.3)
    assert out.metrics["reward/zero_std_groups"] == 0.5
    assert out.metrics["accuracy/train"] == 0.25
    assert out.metrics["policy/version"] == 1.0


def test_dr_grpo_keeps_raw_centered_rewards():
    cluster = FakeCluster()
    policy_gradient_step(cluster, PROBLEMS, AlgorithmConfig(name="grpo", normalize_std=False), {})
    batch = _train_calls(cluster)[0][1]
    assert batch.fields["advantages_B"] == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_rloo_leave_one_out():
    cluster = FakeCluster()
    policy_gradient_step(cluster, PROBLEMS, AlgorithmConfig(name="rloo"), {})
    batch = _train_calls(cluster)[0][1]
    # r=1: 1 - (0+0+1)/3 = 2/3 ; r=0: 0 - 2/3
    assert batch.fields["advantages_B"] == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])


def test_reinforce_ema_baseline_carries_across_steps():
    cluster, state = FakeCluster(), {}
    cfg = AlgorithmConfig(name="reinforce", group_size=4)
    policy_gradient_step(cluster, PROBLEMS[:1], cfg, state)
    adv = _train_calls(cluster)[0][1].fields["advantages_B"]
    # baseline 0 -> r-b per sample, b <- 0.9 b + 0.1 r: b = 0, 0.1, 0.09, 0.081 before samples 1..4
    assert adv == pytest.approx([1.0, -0.1, -0.09, 1 - 0.081])
    assert state["baseline"] == pytest.approx(0.9 * 0.081 + 0.1)


def test_kl_and_multi_epoch_fetch_ref_and_old_logprobs():
    cluster = FakeCluster()
    cfg = AlgorithmConfig(name="grpo", kl_beta=0.05, epochs=2, minibatches=2)
    policy_gradient_step(cluster, PROBLEMS, cfg, {})
    assert ("logprobs", "ref") in cluster.calls and ("logprobs", "policy") in cluster.calls
    calls = _train_calls(cluster)
    assert len(calls) == 2 and all(c[2] == "policy_gradient" and c[4] == 2 for c in calls)
    batch = calls[0][1]
    assert batch.fields["ref_logprobs_B_T"][0] == [-0.7, -0.7] and calls[0][3]["kl_beta"] == 0.05


def test_kl_in_reward_moves_beta_out_of_the_loss():
    cluster = FakeCluster()
    cfg = AlgorithmConfig(name="grpo", kl_beta=0.5, kl_in_reward=True, kl_kind="k1", normalize_std=False)
    policy_gradient_step(cluster, PROBLEMS, cfg, {})
    _, batch, _, kwargs, _ = _train_calls(cluster)[0]
    assert kwargs["kl_beta"] == 0.0
    # k1 per token = gen logprob - ref = (-1 - -0.7) + (-0.5 - -0.7) = -0.1 per sequence, the same for all:
    # a constant shift cancels in group-centred advantages.
    assert batch.fields["advantages_B"] == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
