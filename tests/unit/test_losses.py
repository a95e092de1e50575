"""Clipped policy-gradient loss, value loss and KL-in-reward against hand-computed values and gradients."""

import math

import pytest
import torch
from torch.testing import assert_close

from raylign.algorithms.losses import kl_penalized_rewards, policy_gradient_loss, value_loss

F64 = torch.float64
LN2 = math.log(2.0)


def t(x):
    return torch.tensor(x, dtype=F64)


MASK = [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("agg,max_tokens,expected_grad", [
    # token: -A * mask / 5 valid tokens
    ("token", None, [[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]]),
    # sequence: -A / (|o_i| * 2 sequences)
    ("sequence", None, [[-1 / 3, -1 / 3, -1 / 3], [0.25, 0.25, 0.0]]),
    # fixed: -A / (2 * 4)
    ("fixed", 4, [[-0.25, -0.25, -0.25], [0.125, 0.125, 0.0]]),
])
def test_on_policy_step_is_reinforce(agg, max_tokens, expected_grad):
    logprobs = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]]).requires_grad_()
    loss, metrics = policy_gradient_loss(logprobs, logprobs.detach(), t([2.0, -1.0]), t(MASK), agg=agg,
                                         max_tokens=max_tokens)
    loss.backward()
    assert_close(logprobs.grad, t(expected_grad))
    assert metrics["clip/fraction"] == 0.0
    assert metrics["ratio/mean"] == pytest.approx(1.0)
    assert metrics["loss/kl"] == 0.0 and metrics["kl/mean"] == 0.0


def test_on_policy_loss_value_and_logits_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    tokens = torch.tensor([[0, 3, 1], [4, 2, 2]])
    adv = t([2.0, -1.0])
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    loss, metrics = policy_gradient_loss(logp, logp.detach(), adv, t(MASK))
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    reinforce = -(adv[:, None] * logp * t(MASK)).sum() / 5
    (expected,) = torch.autograd.grad(reinforce, logits)
    assert_close(grad, expected)
    assert loss.item() == pytest.approx(-(2.0 * 3 - 1.0 * 2) / 5)  # ratio 1: -sum(A) / n_tokens
    assert metrics["loss/policy"] == pytest.approx(loss.item())


def test_clipping_on_both_sides_and_both_signs():
    # ratios 1.5, 0.5, 0.5, 1.5, 3 (masked) with A = +1, +1, -1, -1, +1 and eps = 0.2:
    #   A>0, r=1.5: max(-1.5, -1.2) = -1.2 clipped (no grad)   A>0, r=0.5: max(-0.5, -0.8) = -0.5 (grad -r)
    #   A<0, r=0.5: max(0.5, 0.8) = 0.8 clipped (no grad)      A<0, r=1.5: max(1.5, 1.2) = 1.5 (grad +r)
    ratios = t([[1.5], [0.5], [0.5], [1.5], [3.0]])
    logprobs = ratios.log().requires_grad_()
    mask = t([[1], [1], [1], [1], [0]])
    loss, metrics = policy_gradient_loss(logprobs, torch.zeros_like(ratios), t([1.0, 1.0, -1.0, -1.0, 1.0]), mask)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    loss.backward()
    assert_close(logprobs.grad, t([[0.0], [-0.5 / 4], [0.0], [1.5 / 4], [0.0]]))
    assert metrics["clip/fraction"] == pytest.approx(0.5)
    assert metrics["ratio/mean"] == pytest.approx(1.0)


def test_clip_higher_widens_only_the_upper_bound():
    # r=1.25, A=+1: clipped at 1.2 with eps_high=eps, free with eps_high=0.28. r=0.7, A=-1: 1-eps=0.8 binds both
    logprobs, old, adv, mask = t([[math.log(1.25)], [math.log(0.7)]]), t([[0.0], [0.0]]), t([1.0, -1.0]), t([[1], [1]])
    sym, m_sym = policy_gradient_loss(logprobs, old, adv, mask, clip_eps=0.2)
    high, m_high = policy_gradient_loss(logprobs, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert sym.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert high.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert m_sym["clip/fraction"] == pytest.approx(1.0)
    assert m_high["clip/fraction"] == pytest.approx(0.5)


def test_per_token_advantages():
    logprobs = t([[-1.0, -2.0]]).requires_grad_()
    loss, _ = policy_gradient_loss(logprobs, logprobs.detach(), t([[1.0, -3.0]]), t([[1, 1]]))
    loss.backward()
    assert loss.item() == pytest.approx(1.0)  # -(1 - 3) / 2
    assert_close(logprobs.grad, t([[-0.5, 1.5]]))


def test_kl_penalty_in_the_loss():
    # pi = 0.5, ref = 0.25, A = 0: loss = beta * k3 = 0.1 * (0.5 + ln2 - 1); d k3 / d logp = 1 - ref/pi = 0.5
    logprobs = t([[math.log(0.5)]]).requires_grad_()
    loss, metrics = policy_gradient_loss(logprobs, logprobs.detach(), t([0.0]), t([[1]]),
                                         ref_logprobs_B_T=t([[math.log(0.25)]]), kl_beta=0.1, kl_kind="k3")
    k3 = 0.5 + LN2 - 1.0
    assert loss.item() == pytest.approx(0.1 * k3)
    assert metrics["loss/kl"] == pytest.approx(0.1 * k3)
    assert metrics["kl/mean"] == pytest.approx(k3)
    assert metrics["loss/policy"] == 0.0
    loss.backward()
    assert_close(logprobs.grad, t([[0.05]]))


def test_kl_beta_without_reference_raises():
    with pytest.raises(ValueError):
        policy_gradient_loss(t([[0.0]]), t([[0.0]]), t([1.0]), t([[1]]), kl_beta=0.1)


def test_value_loss_clipped_by_hand():
    # tok0: v=1, old=0.5 -> v_clip=0.7; (1-2)^2=1 < (0.7-2)^2=1.69: clipped binds, no grad
    # tok1: v=1, old=0.9 -> v_clip=1.0; both 1; grad 0.5 * 2(v-R) / 3 tokens
    # tok2: v=0, old=0.5 -> v_clip=0.3, R=-1: (0+1)^2=1 < 1.69: clipped binds;  tok3 masked
    values = t([[1.0, 1.0, 0.0, 5.0]]).requires_grad_()
    mask = t([[1, 1, 1, 0]])
    loss, metrics = value_loss(values, t([[0.5, 0.9, 0.5, 0.0]]), t([[2.0, 2.0, -1.0, 0.0]]), mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 1.69) / 3)
    loss.backward()
    assert_close(values.grad, t([[0.0, 0.5 * 2 * (1.0 - 2.0) / 3, 0.0, 0.0]]))
    assert metrics["value/clip_fraction"] == pytest.approx(2 / 3)
    assert metrics["value/mean"] == pytest.approx(2 / 3)
    assert metrics["loss/value"] == pytest.approx(loss.item())


@pytest.mark.parametrize("kind,expected", [
    ("k1", [1.0 - 0.1 * 2 * LN2, 0.0 + 0.1 * LN2]),
    ("k3", [1.0 - 0.1 * 2 * (0.5 + LN2 - 1.0), 0.0 - 0.1 * (2.0 - LN2 - 1.0)]),
])
def test_kl_penalized_rewards(kind, expected):
    # row 0: two tokens pi=0.5, ref=0.25 (KL > 0); row 1: one token pi=0.25, ref=0.5, second token padding
    logp = t([[math.log(0.5), math.log(0.5)], [math.log(0.25), 3.0]])
    ref = t([[math.log(0.25), math.log(0.25)], [math.log(0.5), -3.0]])
    out = kl_penalized_rewards(t([1.0, 0.0]), logp, ref, t([[1, 1], [1, 0]]), beta=0.1, kind=kind)
    assert_close(out, t(expected))
