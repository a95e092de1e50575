"""The PPO step against an in-process Cluster whose rewards, values and log-probs are known."""

import pytest
import torch

from raylign.algorithms.ppo import ppo_step
from raylign.config import ALGORITHM_CONFIGS

from raylign.types import Completion, Problem, Score, TrainBatch


def AlgorithmConfig(name: str = "grpo", **fields):
    return ALGORITHM_CONFIGS[name](**fields)

# one prompt, two samples: a 3-token answer with reward 1, a 2-token one cut by the length limit (reward 0.3)
COMPLETIONS = [([10, 11, 12], 1.0, "stop"), ([10, 13], 0.3, "length")]
VALUES = [[0.5, 0.6, 0.7], [0.4, 0.2]]


class FakeCluster:
    max_new_tokens = 64

    def __init__(self):
        self.calls: list[tuple] = []

    def generate(self, problems, n, temperature):
        self.calls.append(("generate", n, temperature))
        return [[Completion(prompt_ids=[1, 2], token_ids=ids, text=str(r), logprobs=[-1.0] * len(ids),
                            finish_reason=fin) for ids, r, fin in COMPLETIONS[:n]] for _ in problems]

    def score(self, problems, groups):
        return [[Score(reward=float(c.text), correct=c.text == "1.0", prediction=c.text, format_ok=True) for c in g]
                for g in groups]

    def values(self, batch: TrainBatch):
        self.calls.append(("values",))
        return [list(v) for v in VALUES]

    def logprobs(self, batch: TrainBatch, which="policy"):
        self.calls.append(("logprobs", which))
        return [[-1.0 if which == "policy" else -1.2] * len(ids) for ids in batch.completion_ids]

    def train_step(self, batch, loss_name, loss_kwargs, minibatches=1):
        self.calls.append(("train_step", batch, loss_name, loss_kwargs, minibatches))
        return {"loss/policy": 0.5}

    def sync_weights(self):
        self.calls.append(("sync",))
        return {"policy/version": 1.0}


PROBLEMS = [Problem(id="p0", messages=[{"role": "user", "content": "q"}], answer="1")]


def _run(**cfg):
    cluster = FakeCluster()
    out = ppo_step(cluster, PROBLEMS, AlgorithmConfig(name="ppo", group_size=2, **cfg), {})
    return cluster, out, [c for c in cluster.calls if c[0] == "train_step"]


def test_gae_fields_with_gamma_lam_one_and_truncation_penalty():
    cluster, out, calls = _run(whiten_advantages=False, truncation_penalty=-0.5, epochs=3, minibatches=2)
    assert len(calls) == 3 and all(c[2] == "ppo" and c[4] == 2 for c in calls)
    batch = calls[0][1]
    # gamma = lam = 1 and a terminal reward: A_t = R - V_t, returns R; the truncated sample's R is -0.5
    assert batch.fields["advantages_B"][0] == pytest.approx([0.5, 0.4, 0.3])
    assert batch.fields["advantages_B"][1] == pytest.approx([-0.9, -0.7])
    assert batch.fields["returns_B_T"] == [pytest.approx([1.0, 1.0, 1.0]), pytest.approx([-0.5, -0.5])]
    assert batch.fields["old_values_B_T"] == VALUES
    assert batch.fields["old_logprobs_B_T"] == [[-1.0] * 3, [-1.0] * 2]
    assert "ref_logprobs_B_T" not in batch.fields
    assert calls[0][3] == dict(clip_eps=0.2, clip_eps_high=None, vf_coef=0.5, vf_clip=0.2, entropy_coef=0.0,
                               agg="token", max_tokens=64)
    assert ("logprobs", "ref") not in cluster.calls and cluster.calls[-1] == ("sync",)
    assert out.advantages_P_G.shape == (1, 2)
    assert out.advantages_P_G[0].tolist() == pytest.approx([0.4, -0.8])  # mean token advantage per sequence
    assert out.metrics["reward/mean"] == pytest.approx(0.25)  # (1 + -0.5) / 2
    assert out.metrics["value/mean"] == pytest.approx(2.4 / 5)
    assert out.metrics["policy/version"] == 1.0


def test_gae_with_discount_and_lambda():
    _, _, calls = _run(whiten_advantages=False, gamma=0.9, lam=0.5)
    fields = calls[0][1].fields
    # A2 = 1 - .7 = .3;  A1 = (.9 * .7 - .6) + .45 * .3 = .165;  A0 = (.9 * .6 - .5) + .45 * .165 = .11425
    assert fields["advantages_B"][0] == pytest.approx([0.11425, 0.165, 0.3])
    assert fields["returns_B_T"][0] == pytest.approx([0.61425, 0.765, 1.0])
    # truncation_penalty defaults to 0: A1 = 0 - .2;  A0 = (.9 * .2 - .4) + .45 * -.2 = -.31
    assert fields["advantages_B"][1] == pytest.approx([-0.31, -0.2])


def test_kl_goes_into_the_per_token_reward():
    cluster, out, calls = _run(whiten_advantages=False, kl_beta=0.1)
    assert ("logprobs", "ref") in cluster.calls
    fields = calls[0][1].fields
    # k1 = -1 - (-1.2) = 0.2 per token, reward -0.02 per token: returns 0.94, 0.96, 0.98
    assert fields["returns_B_T"][0] == pytest.approx([0.94, 0.96, 0.98])
    assert fields["advantages_B"][0] == pytest.approx([0.44, 0.36, 0.28])
    assert "ref_logprobs_B_T" not in fields and "kl_beta" not in calls[0][3]
    assert out.metrics["kl/reward_mean"] == pytest.approx((0.6 + 0.4) / 2)


def test_whitened_advantages_have_zero_mean_unit_std_over_tokens():
    _, _, calls = _run(whiten_advantages=True)
    flat = torch.tensor([a for row in calls[0][1].fields["advantages_B"] for a in row], dtype=torch.float64)
    assert flat.mean().item() == pytest.approx(0.0, abs=1e-7)
    assert flat.std().item() == pytest.approx(1.0, abs=1e-6)
    # raw .5 .4 .3 -.4 -.2 (no penalty: R = 0 for the cut sample): mean .12, unbiased variance .628 / 4
    raw = torch.tensor([0.5, 0.4, 0.3, -0.4, -0.2], dtype=torch.float64)
    assert flat.tolist() == pytest.approx(((raw - 0.12) / (0.157 ** 0.5)).tolist(), abs=1e-6)
    assert calls[0][1].fields["returns_B_T"][0] == pytest.approx([1.0, 1.0, 1.0])  # returns stay raw


class ToolEpisodeCluster(FakeCluster):
    """One episode: policy tokens, two spliced tool-output tokens (loss mask 0), one more policy token."""

    def generate(self, problems, n, temperature):
        c = Completion(prompt_ids=[1, 2], token_ids=[10, 11, 90, 91, 12], text="1.0", logprobs=[-1.0] * 5,
                       finish_reason="stop", loss_mask=[1, 1, 0, 0, 1])
        return [[c] for _ in problems]

    def values(self, batch):
        return [[0.5, 0.6, 9.0, 9.0, 0.7]]  # the values at tool tokens must not enter GAE


def test_kl_and_gae_skip_tool_output_tokens():
    cluster = ToolEpisodeCluster()
    ppo_step(cluster, PROBLEMS[:1], AlgorithmConfig("ppo", group_size=1, kl_beta=0.5, gamma=0.9, lam=0.8,
                                                   whiten_advantages=False, truncation_penalty=None), {})
    batch = next(c[1] for c in cluster.calls if c[0] == "train_step")
    # k1 KL per policy token: -1.0 - (-1.2) = 0.2 -> reward -0.1 on each action, + R = 1 on the last action.
    # actions: t0 (V .5), t1 (V .6), t4 (V .7, terminal). delta4 = 1 - 0.1 - 0.7 = 0.2;
    # delta1 = -0.1 + 0.9 * 0.7 - 0.6 = -0.07; delta0 = -0.1 + 0.9 * 0.6 - 0.5 = -0.06
    # A4 = 0.2; A1 = -0.07 + 0.72 * 0.2 = 0.074; A0 = -0.06 + 0.72 * 0.074 = -0.00672; tool tokens 0
    assert batch.fields["advantages_B"][0] == pytest.approx([-0.00672, 0.074, 0.0, 0.0, 0.2])
    assert batch.fields["returns_B_T"][0] == pytest.approx([0.49328, 0.674, 0.0, 0.0, 0.9])
