"""Truncated importance sampling: weights min(pi_old / pi_gen, cap), the weighted clipped loss and its gradient,
the metrics, and how the steps hand the generator's log-probs to the trainer under the loss contract."""

import math

import pytest
import torch

from raylign.algorithms.losses import policy_gradient_loss, tis_ratio
from raylign.algorithms.policy_gradient import policy_gradient_step
from raylign.algorithms.registry import LOSSES
from raylign.config import ALGORITHM_CONFIGS
from tests.unit.test_policy_gradient_step import PROBLEMS, FakeCluster, _train_calls

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, -4.0]], dtype=torch.float64)
GEN = torch.tensor([[-1.0, -1.5, -2.5], [-0.3, -3.0, -4.0]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
ADV = torch.tensor([1.0, -0.5], dtype=torch.float64)


def test_weights_are_the_truncated_ratio_of_trainer_to_generator():
    w = tis_ratio(OLD, GEN).clamp(max=2.0)
    expected = [[1.0, math.exp(-0.5), 2.0], [1.0, 2.0, 1.0]]  # exp(2) and exp(2) are capped at 2
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))


def test_weighted_loss_scales_each_tokens_gradient_and_reports_the_ratios():
    lp = OLD.clone().requires_grad_(True)
    loss, metrics = policy_gradient_loss(lp, OLD, ADV, MASK, gen_logprobs_B_T=GEN, tis_cap=2.0)
    loss.backward()
    w = tis_ratio(OLD, GEN).clamp(max=2.0)
    # ratio 1 (old = current): d loss / d lp_t = -A_i w_t / (valid tokens) under the token mean
    expected = -(ADV[:, None] * w * MASK) / MASK.sum()
    torch.testing.assert_close(lp.grad, expected)
    assert loss.item() == pytest.approx(expected.sum().item())
    ratios = [1.0, math.exp(-0.5), math.exp(2.0), 1.0, math.exp(2.0)]  # the five loss tokens, untruncated
    assert metrics["tis/ratio_mean"] == pytest.approx(sum(ratios) / 5)
    assert metrics["tis/ratio_max"] == pytest.approx(math.exp(2.0))
    assert metrics["tis/capped_fraction"] == pytest.approx(2 / 5)


def test_a_generator_that_agrees_with_the_trainer_changes_nothing():
    plain, _ = policy_gradient_loss(OLD * 0.9, OLD, ADV, MASK)
    tis, metrics = policy_gradient_loss(OLD * 0.9, OLD, ADV, MASK, gen_logprobs_B_T=OLD, tis_cap=2.0)
    assert tis.item() == pytest.approx(plain.item()) and metrics["tis/capped_fraction"] == 0.0
    with pytest.raises(ValueError, match="tis_cap needs gen_logprobs_B_T"):
        policy_gradient_loss(OLD, OLD, ADV, MASK, tis_cap=2.0)


def test_the_step_sends_the_generators_log_probs_under_the_loss_contract():
    cluster = FakeCluster()
    cfg = ALGORITHM_CONFIGS["grpo"](group_size=4, tis_cap=2.0)
    policy_gradient_step(cluster, PROBLEMS, cfg, {})
    (_, batch, loss_name, kwargs, _), = _train_calls(cluster)
    assert batch.fields["gen_logprobs_B_T"] == [[-1.0, -0.5]] * 8 and kwargs["tis_cap"] == 2.0
    LOSSES[loss_name].check(loss_name, set(batch.fields), set(kwargs))  # the trainer's check passes
    off = FakeCluster()
    policy_gradient_step(off, PROBLEMS, ALGORITHM_CONFIGS["grpo"](group_size=4), {})
    (_, batch, _, kwargs, _), = _train_calls(off)
    assert "gen_logprobs_B_T" not in batch.fields and "tis_cap" not in kwargs
    with pytest.raises(ValueError, match="policy_loss='gspo' has its own ratio"):
        ALGORITHM_CONFIGS["grpo"](policy_loss="gspo", tis_cap=2.0)
