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


def test_gae_with_action_mask_skips_tool_tokens():
    # row [a, a, tool, tool, a], gamma = 0.9, lam = 0.8 (gamma lam = 0.72), R = 1 on the last action token.
    # Action steps are positions 0, 1, 4 with V = 0.5, 0.4, 0.2; the tool tokens' values (9.0) never enter.
    #   pos 4: delta = 1 - 0.2 = 0.8;                A = 0.8
    #   pos 1: delta = 0.9 * 0.2 - 0.4 = -0.22;      A = -0.22 + 0.72 * 0.8 = 0.356
    #   pos 0: delta = 0.9 * 0.4 - 0.5 = -0.14;      A = -0.14 + 0.72 * 0.356 = 0.11632
    # returns A + V on action tokens, 0 on tool tokens
    rewards = t([[0.0, 0.0, 0.0, 0.0, 1.0]])
    values = t([[0.5, 0.4, 9.0, 9.0, 0.2]])
    mask = t([[1, 1, 1, 1, 1]])
    action = t([[1, 1, 0, 0, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, action_mask_B_T=action)
    assert_close(adv, t([[0.11632, 0.356, 0.0, 0.0, 0.8]]))
    assert_close(ret, t([[0.61632, 0.756, 0.0, 0.0, 1.0]]))
    # the per-token recursion discounts across the tool tokens and gives something else
    plain_adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert not torch.allclose(plain_adv[:, :2], adv[:, :2])


def test_gae_action_mask_all_ones_is_bit_identical_to_plain():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 9, generator=gen, dtype=F64)
    values = torch.randn(5, 9, generator=gen, dtype=F64)  # junk on padding too
    lengths = torch.tensor([9, 6, 1, 0, 4])
    mask = (torch.arange(9) < lengths[:, None]).to(F64)
    for gamma, lam in [(0.9, 0.8), (1.0, 1.0), (0.5, 0.95)]:
        plain = gae(rewards, values, mask, gamma, lam)
        masked = gae(rewards, values, mask, gamma, lam, action_mask_B_T=torch.ones_like(mask))
        assert torch.equal(plain[0], masked[0]) and torch.equal(plain[1], masked[1])


def test_gae_action_mask_with_padding_and_junk():
    # row 0 [a, tool, a, pad, pad], gamma = 0.5, lam = 1 (gamma lam = 0.5), R = 2 on pos 2, V = 1, _, 0.5:
    #   pos 2: A = 2 - 0.5 = 1.5;   pos 0: delta = 0.5 * 0.5 - 1 = -0.75, A = -0.75 + 0.5 * 1.5 = 0.0
    # row 1 [a, pad, ...], R = -1, V = 0.25: A = -1.25. Junk rewards/values (and action mask 1) on padding and
    # the tool token must not leak.
    rewards = t([[0.0, 0.0, 2.0, 7.0, 7.0], [-1.0, 5.0, 5.0, 5.0, 5.0]])
    values = t([[1.0, 8.0, 0.5, 9.0, 9.0], [0.25, 9.0, 9.0, 9.0, 9.0]])
    mask = t([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    action = t([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=1.0, action_mask_B_T=action)
    assert_close(adv, t([[0.0, 0.0, 1.5, 0.0, 0.0], [-1.25, 0.0, 0.0, 0.0, 0.0]]))
    assert_close(ret, t([[1.0, 0.0, 2.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.0]]))


def test_gae_reward_on_a_tool_token_counts_for_the_action_before_it():
    # [a, tool, a, tool]: R = 1 on the trailing tool token is the last action's reward (pos 2), gamma = lam = 1:
    #   pos 2: A = 1 - 0.3 = 0.7;   pos 0: A = 0.3 - 0.1 + 0.7 = 0.9 (= R - V_0)
    # a reward on a tool token before the first action (row 1, pos 0) has no action to go to and is dropped.
    rewards = t([[0.0, 0.0, 0.0, 1.0], [4.0, 0.0, 1.0, 0.0]])
    values = t([[0.1, 5.0, 0.3, 5.0], [5.0, 0.2, 0.6, 0.0]])
    mask = t([[1, 1, 1, 1], [1, 1, 1, 0]])
    action = t([[1, 0, 1, 0], [0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0, action_mask_B_T=action)
    assert_close(adv, t([[0.9, 0.0, 0.7, 0.0], [0.0, 0.8, 0.4, 0.0]]))
    assert_close(ret, t([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]]))
