"""GAE and returns against hand-computed values, with PPO's per-token rewards (terminal reward + KL)."""

import torch
from torch.testing import assert_close

from raylign.algorithms.advantages import gae
from raylign.algorithms.ppo import token_rewards

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def test_gae_gamma_lam_half_with_padding_junk():
    # row 0 (3 tokens, R = 2, V = 1, .5, 1):
    #   A2 = 2 - 1 = 1;  A1 = (0.5 * 1 - 0.5) + 0.25 * 1 = 0.25;  A0 = (0.5 * 0.5 - 1) + 0.25 * 0.25 = -0.6875
    # row 1 (1 token, R = -1, V = .25; junk rewards/values on padding must not leak): A0 = -1.25
    rewards = t([[0.0, 0.0, 2.0], [-1.0, 5.0, 5.0]])
    values = t([[1.0, 0.5, 1.0], [0.25, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert_close(adv, t([[-0.6875, 0.25, 1.0], [-1.25, 0.0, 0.0]]))
    assert_close(ret, t([[0.3125, 0.75, 2.0], [-1.0, 0.0, 0.0]]))


def test_gae_lam_one_is_discounted_return_minus_value():
    adv, ret = gae(t([[0.0, 0.0, 1.0]]), t([[0.2, 0.3, 0.4]]), t([[1, 1, 1]]), gamma=0.9, lam=1.0)
    assert_close(ret, t([[0.81, 0.9, 1.0]]))
    assert_close(adv, t([[0.61, 0.6, 0.6]]))


def test_gae_terminal_only_reward_gamma_lam_one():
    # every token's advantage is R - V_t and every return is R, whatever the values in between
    adv, ret = gae(t([[0.0, 0.0, 0.0, 0.5]]), t([[0.1, 0.9, -0.3, 0.5]]), t([[1, 1, 1, 1]]), gamma=1.0, lam=1.0)
    assert_close(adv, t([[0.4, -0.4, 0.8, 0.0]]))
    assert_close(ret, t([[0.5, 0.5, 0.5, 0.5]]))


def test_token_rewards_terminal_on_last_valid_token_and_kl_on_every_token():
    valid = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    kl = t([[0.2, 0.2, 0.2], [0.5, 7.0, 7.0], [3.0, 3.0, 3.0]])  # KL on padding is junk
    rewards = token_rewards(t([1.0, -1.0, 4.0]), valid, kl, kl_beta=0.1)
    # an empty completion (row 2) has no token to carry its reward
    assert_close(rewards, t([[-0.02, -0.02, 0.98], [-1.05, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_gae_of_kl_shaped_rewards():
    # gamma = lam = 1: A_t = sum of rewards from t on - V_t = (0.98 - 0.02 * (2 - t)) - V_t
    rewards = token_rewards(t([1.0]), t([[1, 1, 1]]), t([[0.2, 0.2, 0.2]]), kl_beta=0.1)
    adv, ret = gae(rewards, t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]]), gamma=1.0, lam=1.0)
    assert_close(ret, t([[0.94, 0.96, 0.98]]))
    assert_close(adv, t([[0.44, 0.36, 0.28]]))
