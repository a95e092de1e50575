"""GSPO and CISPO losses against hand-computed values and gradients (masks with zeros, a length-1 response,
a fully masked sequence)."""

import math

import pytest
import torch
from torch.testing import assert_close

from raylign.algorithms.is_losses import cispo_loss, gspo_loss
from raylign.algorithms.losses import policy_gradient_loss

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


# GSPO batch: row 0 three tokens, row 1 two tokens (third masked), row 2 a length-1 response, row 3 fully masked
GSPO_LOGP = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0], [-0.7, 0.0, 0.0], [-0.4, -0.4, -0.4]]
GSPO_LOG_RATIO = [[0.3, -0.1, 0.1], [0.0, 0.1, 5.0], [0.0002, 0.0, 0.0], [3.0, 3.0, 3.0]]
GSPO_MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]]


def test_gspo_ratio_is_the_length_normalised_sequence_ratio_clipped_per_sequence():
    logp = t(GSPO_LOGP).requires_grad_()
    old = logp.detach() - t(GSPO_LOG_RATIO)
    adv = t([1.0, -1.0, 2.0, 5.0])
    loss, m = gspo_loss(logp, adv, t(GSPO_MASK), old_logprobs_B_T=old, clip_eps=0.05, clip_eps_high=0.08)
    loss.backward()
    # s = exp(mean log-ratio over mask tokens): e^0.1 = 1.10517 (above 1.08, A > 0: clipped, no gradient),
    # e^0.05 = 1.05127 (A < 0, inside), e^0.0002 = 1.0002 (length 1, inside); row 3 is not counted.
    s0, s1, s2 = math.exp(0.1), math.exp(0.05), math.exp(0.0002)
    assert loss.item() == pytest.approx((-1.08 + s1 - 2.0 * s2) / 3)
    assert_close(logp.grad, t([[0.0, 0.0, 0.0],
                               [s1 / 2 / 3, s1 / 2 / 3, 0.0],  # d(-A s)/dlogp_t = -A s / |y|, over 3 sequences
                               [-2.0 * s2 / 3, 0.0, 0.0],
                               [0.0, 0.0, 0.0]]))
    assert m["clip/fraction"] == pytest.approx(1 / 3)
    assert m["ratio/mean"] == pytest.approx((s0 + s1 + s2) / 3)
    assert m["loss/policy"] == pytest.approx(loss.item()) and m["loss/kl"] == 0.0


def test_gspo_clips_whole_sequences_not_tokens():
    # token ratios 2 and 0.5: the token clip binds on both, the sequence ratio (geometric mean) is exactly 1
    logp = t([[-1.0, -1.0]])
    old = logp - t([[math.log(2.0), -math.log(2.0)]])
    _, seq = gspo_loss(logp, t([1.0]), t([[1, 1]]), old_logprobs_B_T=old, clip_eps=0.2)
    _, tok = policy_gradient_loss(logp, old, t([1.0]), t([[1, 1]]), clip_eps=0.2)
    assert seq["clip/fraction"] == 0.0 and seq["ratio/mean"] == pytest.approx(1.0)
    assert tok["clip/fraction"] == 0.5  # r = 2, A > 0 is cut; r = 0.5, A > 0 keeps its gradient


def test_gspo_on_policy_is_grpo_with_sequence_mean_and_kl_is_a_sequence_mean():
    logp = t(GSPO_LOGP).requires_grad_()
    ref = logp.detach() - 0.5 * t(GSPO_MASK)
    adv = t([1.0, -1.0, 2.0, 5.0])
    loss, m = gspo_loss(logp, adv, t(GSPO_MASK), ref_logprobs_B_T=ref, kl_beta=0.1, kl_kind="k1")
    loss.backward()
    # ratio 1: -A / (|y_i| * 3 non-empty sequences); k1 = 0.5 on every mask token: beta * 0.5
    grpo = t([[-1 / 9] * 3, [1 / 6, 1 / 6, 0.0], [-2 / 3, 0.0, 0.0], [0.0] * 3])
    kl_grad = 0.1 * t([[1 / 9] * 3, [1 / 6, 1 / 6, 0.0], [1 / 3, 0.0, 0.0], [0.0] * 3])
    assert_close(logp.grad, grpo + kl_grad)
    assert m["loss/kl"] == pytest.approx(0.05) and m["kl/mean"] == pytest.approx(0.5)
    assert m["loss/policy"] == pytest.approx(-(1.0 - 1.0 + 2.0) / 3)
    with pytest.raises(ValueError, match="one advantage per sequence"):
        gspo_loss(logp, t([[1.0] * 3] * 4), t(GSPO_MASK))


# CISPO batch: ratios 1.5, 0.5, 1 | 2, 1, (3 masked) | 0.5 (length 1); eps_low 0.2, eps_high 0.28
CISPO_RATIO = [[1.5, 0.5, 1.0], [2.0, 1.0, 3.0], [0.5, 1.0, 1.0]]
CISPO_MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
CISPO_W = [[1.28, 0.8, 1.0], [1.28, 1.0, 0.0], [0.8, 0.0, 0.0]]  # clipped weights on mask tokens


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_cispo_clips_the_weight_and_keeps_every_token_gradient(agg):
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0], [-0.7, 0.0, 0.0]]).requires_grad_()
    old = logp.detach() - t(CISPO_RATIO).log()
    adv = t([1.0, -2.0, 3.0])
    loss, m = cispo_loss(logp, adv, t(CISPO_MASK), old_logprobs_B_T=old, clip_eps=0.2, clip_eps_high=0.28, agg=agg)
    loss.backward()
    w, a = t(CISPO_W), adv[:, None]
    norm = t([[6.0], [6.0], [6.0]]) if agg == "token" else t([[9.0], [6.0], [3.0]])  # 6 tokens | |y_i| * 3
    assert_close(logp.grad, -w * a / norm)
    # value -w A: token (-3.08 + 4.56 - 2.4) / 6; sequence (-3.08/3 + 4.56/2 - 2.4) / 3
    want = (-3.08 + 4.56 - 2.4) / 6 if agg == "token" else (-3.08 / 3 + 4.56 / 2 - 2.4) / 3
    assert loss.item() == pytest.approx(want)
    assert (logp.grad[t(CISPO_MASK) > 0] != 0).all()  # the clipped tokens (1.5, 0.5, 2, 0.5) still learn
    if agg == "token":
        assert m["clip/fraction"] == pytest.approx(4 / 6)
        assert m["ratio/mean"] == pytest.approx((1.5 + 0.5 + 1.0 + 2.0 + 1.0 + 0.5) / 6)
    # the clipped surrogate cuts the gradient of the A > 0, r = 1.5 token (CISPO keeps it) but not of r = 0.5
    ppo = logp.detach().clone().requires_grad_()
    policy_gradient_loss(ppo, old, adv, t(CISPO_MASK), clip_eps=0.2, clip_eps_high=0.28, agg=agg)[0].backward()
    assert ppo.grad[0, 0] == 0 and ppo.grad[2, 0] != 0 and logp.grad[0, 0] != 0


def test_cispo_on_policy_equals_the_on_policy_clip_loss_through_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    tokens = torch.tensor([[0, 3, 1], [4, 2, 2]])
    mask, adv = t([[1, 1, 0], [1, 1, 1]]), t([0.7, -1.3])
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    loss_c, m = cispo_loss(logp, adv, mask)
    (grad_c,) = torch.autograd.grad(loss_c, logits, retain_graph=True)
    loss_p, _ = policy_gradient_loss(logp, logp.detach(), adv, mask)
    (grad_p,) = torch.autograd.grad(loss_p, logits)
    assert_close(grad_c, grad_p)
    assert loss_c.item() == pytest.approx(loss_p.item()) and m["clip/fraction"] == 0.0
