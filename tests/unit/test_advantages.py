"""Advantage estimators against hand-computed values."""

import math

import pytest
import torch
from torch.testing import assert_close

from raylign.algorithms.advantages import ema_baseline_advantages, gae, group_advantages, rloo_advantages

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def test_group_advantages_grpo():
    # [1,0,0,1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 1/sqrt(3) -> +-0.5 * sqrt(3) = +-0.866025
    # [0,0,3]: mean 1, unbiased std sqrt((1 + 1 + 4) / 2) = sqrt(3)
    h = math.sqrt(3.0) / 2.0
    assert_close(group_advantages(t([[1.0, 0.0, 0.0, 1.0]]), eps=0.0), t([[h, -h, -h, h]]))
    s = math.sqrt(3.0)
    assert_close(group_advantages(t([[0.0, 0.0, 3.0]]), eps=0.0), t([[-1 / s, -1 / s, 2 / s]]))


def test_group_advantages_eps_in_the_denominator():
    adv = group_advantages(t([[0.0, 0.0, 3.0]]), eps=0.5)
    s = math.sqrt(3.0) + 0.5
    assert_close(adv, t([[-1 / s, -1 / s, 2 / s]]))


def test_group_advantages_dr_grpo_has_no_std():
    assert_close(group_advantages(t([[1.0, 0.0, 0.0, 1.0]]), normalize_std=False), t([[0.5, -0.5, -0.5, 0.5]]))
    assert_close(group_advantages(t([[0.0, 0.0, 3.0]]), normalize_std=False), t([[-1.0, -1.0, 2.0]]))


def test_group_advantages_tied_groups_give_exact_zero():
    rewards = t([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])
    adv = group_advantages(rewards)
    assert torch.equal(adv[1:], torch.zeros(2, 4, dtype=F64))
    assert adv[0, 0].item() == pytest.approx(math.sqrt(3.0) / 2.0, rel=1e-5)


def test_group_advantages_need_two_samples():
    with pytest.raises(ValueError):
        group_advantages(t([[1.0], [0.0]]))


def test_rloo_by_hand_g3():
    # [1,0,0]: baselines 0, 0.5, 0.5; [1,1,0.5]: baselines 0.75, 0.75, 1.0
    adv = rloo_advantages(t([[1.0, 0.0, 0.0], [1.0, 1.0, 0.5]]))
    assert_close(adv, t([[1.0, -0.5, -0.5], [0.25, 0.25, -0.5]]))


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError):
        rloo_advantages(t([[1.0]]))


def test_ema_baseline_three_steps_by_hand():
    # b=0: r=1 -> A=1, b=0.1; r=0 -> A=-0.1, b=0.09; r=1 -> A=0.91, b=0.181
    adv, b = ema_baseline_advantages(t([1.0, 0.0, 1.0]), baseline=0.0, decay=0.9)
    assert_close(adv, t([1.0, -0.1, 0.91]))
    assert b == pytest.approx(0.181)
    assert adv.dtype == F64


def test_ema_baseline_carries_over_and_respects_decay():
    adv, b = ema_baseline_advantages(t([1.0]), baseline=0.5, decay=0.5)
    assert_close(adv, t([0.5]))
    assert b == pytest.approx(0.75)


def test_gae_by_hand_with_mask():
    # row 0, mask [1,1,0] (t=2 is padding with junk): terminal after t=1
    #   A1 = 1 - 0.6 = 0.4;  A0 = (0 + 0.9*0.6 - 0.5) + 0.9*0.8*0.4 = 0.04 + 0.288 = 0.328
    # row 1, full: A2 = 1 - 0.5 = 0.5;  A1 = (0.9*0.5 - 0.4) + 0.72*0.5 = 0.41;  A0 = (0.9*0.4 - 0.2) + 0.72*0.41
    rewards = t([[0.0, 1.0, 5.0], [0.0, 0.0, 1.0]])
    values = t([[0.5, 0.6, 7.0], [0.2, 0.4, 0.5]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(adv, t([[0.328, 0.4, 0.0], [0.4552, 0.41, 0.5]]))
    assert_close(ret, t([[0.828, 1.0, 0.0], [0.6552, 0.81, 1.0]]))


def test_gae_terminal_reward_gamma_lam_one_is_return_minus_value():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 1.0, 9.0]])
    values = t([[0.2, 0.4, 0.5], [0.2, 0.4, 9.0]])
    adv, ret = gae(rewards, values, t([[1, 1, 1], [1, 1, 0]]), gamma=1.0, lam=1.0)
    assert_close(adv, t([[0.8, 0.6, 0.5], [0.8, 0.6, 0.0]]))
    assert_close(ret, t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))


def test_gae_lam_zero_is_one_step_td():
    adv, _ = gae(t([[0.0, 1.0]]), t([[0.5, 0.6]]), t([[1, 1]]), gamma=0.9, lam=0.0)
    assert_close(adv, t([[0.9 * 0.6 - 0.5, 1.0 - 0.6]]))
