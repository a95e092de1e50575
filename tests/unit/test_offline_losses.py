"""SFT, DPO (sigmoid / ipo / dpop, label smoothing) and stepwise DPO against hand-computed values and gradients."""

import math

import pytest
import torch
from torch.testing import assert_close

from raylign.algorithms.offline_losses import dpo_loss, pair_logratios, sft_loss, stepwise_dpo_loss

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# Two pairs, T = 3: rows 0 / 2 chosen, 1 / 3 rejected. Row 0 ends in padding, row 2 has a masked token in the
# middle (policy -4.0, ref -0.1, both must be ignored), row 3 is one token long. Garbage ref values on padding.
POLICY = [[-1.0, -2.0, 0.0],
          [-3.0, -1.0, -0.5],
          [-0.5, -4.0, -1.5],
          [-2.0, 0.0, 0.0]]
REF = [[-1.5, -2.5, 9.0],
       [-2.0, -1.5, -0.5],
       [-1.0, -0.1, -1.0],
       [-3.0, 5.0, 5.0]]
MASK = [[1, 1, 0],
        [1, 1, 1],
        [1, 0, 1],
        [1, 0, 0]]
CHOSEN = [1.0, 0.0, 1.0, 0.0]
# sums: policy -3, -4.5, -2, -2; ref -4, -4, -2, -3
# log-ratios l: chosen 1.0, 0.0; rejected -0.5, 1.0  ->  h0 = 1.5, h1 = -1.0
H = (1.5, -1.0)


def batch():
    return t(POLICY).requires_grad_(), t(MASK), t(REF), t(CHOSEN)


def test_sft_token_mean_ignores_masked_and_padding():
    # row 1's middle token (-3.0) is masked, the last columns are padding: nll = (1 + 2 + 0.5) / 3
    logprobs = t([[-1.0, -2.0, 0.0], [-0.5, -3.0, 0.0]]).requires_grad_()
    loss, metrics = sft_loss(logprobs, t([[1, 1, 0], [1, 0, 0]]))
    assert loss.item() == pytest.approx(3.5 / 3)
    assert metrics["loss/sft"] == pytest.approx(3.5 / 3)
    assert metrics["sft/perplexity"] == pytest.approx(math.exp(3.5 / 3))
    assert metrics["sft/tokens"] == 3.0
    loss.backward()
    assert_close(logprobs.grad, t([[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]]))


def test_sft_all_masked_is_zero_not_nan():
    loss, metrics = sft_loss(t([[-1.0, -2.0]]), t([[0, 0]]))
    assert loss.item() == 0.0 and metrics["sft/tokens"] == 0.0


def test_pair_logratios_sums_and_averages():
    logprobs, mask, ref, chosen = batch()
    r = pair_logratios(logprobs, ref, mask, chosen)
    assert_close(r.policy_chosen_P, t([-3.0, -2.0]))
    assert_close(r.policy_rejected_P, t([-4.5, -2.0]))
    assert_close(r.ref_chosen_P, t([-4.0, -2.0]))
    assert_close(r.ref_rejected_P, t([-4.0, -3.0]))
    assert_close(r.logratio_chosen_P, t([1.0, 0.0]))
    assert_close(r.logratio_rejected_P, t([-0.5, 1.0]))
    avg = pair_logratios(logprobs, ref, mask, chosen, average=True)
    # means over 2, 3, 2, 1 tokens: chosen (-1.5 + 2.0), (-1.0 + 1.0); rejected (-1.5 + 4/3), (-2 + 3)
    assert_close(avg.logratio_chosen_P, t([0.5, 0.0]))
    assert_close(avg.logratio_rejected_P, t([-1 / 6, 1.0]))


def test_dpo_sigmoid_value_and_metrics():
    logprobs, mask, ref, chosen = batch()
    loss, m = dpo_loss(logprobs, mask, ref, chosen, beta=0.1)
    # -log sig(0.1 * 1.5) and -log sig(0.1 * -1.0), mean over 2 pairs
    expected = (softplus(-0.15) + softplus(0.1)) / 2
    assert loss.item() == pytest.approx(expected)
    assert m["loss/dpo"] == pytest.approx(expected)
    assert m["dpo/reward_chosen"] == pytest.approx(0.1 * (1.0 + 0.0) / 2)
    assert m["dpo/reward_rejected"] == pytest.approx(0.1 * (-0.5 + 1.0) / 2)
    assert m["dpo/reward_accuracy"] == 0.5  # pair 0: 0.1 > -0.05 yes; pair 1: 0.0 > 0.1 no
    assert m["dpo/margin"] == pytest.approx(0.1 * (1.5 - 1.0) / 2)
    assert m["dpo/logps_chosen"] == pytest.approx((-3.0 - 2.0) / 2)
    assert m["dpo/logps_rejected"] == pytest.approx((-4.5 - 2.0) / 2)
    assert "dpo/positive_penalty" not in m


def test_dpo_sigmoid_gradient():
    logprobs, mask, ref, chosen = batch()
    loss, _ = dpo_loss(logprobs, mask, ref, chosen, beta=0.1)
    loss.backward()
    # d/dh of -log sig(beta h) / n_pairs is -beta sig(-beta h) / 2; dh/dlogprob = +1 chosen, -1 rejected, 0 masked
    g0, g1 = -0.1 * sig(-0.1 * H[0]) / 2, -0.1 * sig(-0.1 * H[1]) / 2
    assert logprobs.grad[0, 0].item() == pytest.approx(-0.1 * sig(-0.15) / 2)
    assert_close(logprobs.grad, t([[g0, g0, 0.0],
                                   [-g0, -g0, -g0],
                                   [g1, 0.0, g1],
                                   [-g1, 0.0, 0.0]]))


def test_dpo_label_smoothing():
    logprobs, mask, ref, chosen = batch()
    loss, _ = dpo_loss(logprobs, mask, ref, chosen, beta=0.1, label_smoothing=0.25)
    # per pair: 0.75 * (-log sig(x)) + 0.25 * (-log sig(-x)), x = 0.15, -0.1
    expected = sum(0.75 * softplus(-x) + 0.25 * softplus(x) for x in (0.15, -0.1)) / 2
    assert loss.item() == pytest.approx(expected)


def test_dpo_ipo_uses_length_averaged_logprobs():
    logprobs, mask, ref, chosen = batch()
    loss, m = dpo_loss(logprobs, mask, ref, chosen, beta=0.1, loss_type="ipo")
    # averaged h0 = 0.5 + 1/6 = 2/3, h1 = 0 - 1 = -1; target 1 / (2 * 0.1) = 5
    expected = ((2 / 3 - 5) ** 2 + (-1 - 5) ** 2) / 2
    assert loss.item() == pytest.approx(expected)
    # summed log-probs would give ((1.5 - 5)^2 + (-1 - 5)^2) / 2: make sure that is not what we computed
    assert loss.item() != pytest.approx(((1.5 - 5) ** 2 + 36) / 2)
    assert m["dpo/logps_chosen"] == pytest.approx((-1.5 - 1.0) / 2)
    assert m["dpo/margin"] == pytest.approx(0.1 * (2 / 3 - 1) / 2)


def test_dpop_inactive_penalty_equals_sigmoid():
    # chosen log-ratios are 1.0 and 0.0: max(0, -l_w) = 0 for both, so dpop is sigmoid DPO
    logprobs, mask, ref, chosen = batch()
    loss, m = dpo_loss(logprobs, mask, ref, chosen, beta=0.1, loss_type="dpop", dpop_lambda=50.0)
    assert loss.item() == pytest.approx((softplus(-0.15) + softplus(0.1)) / 2)
    assert m["dpo/positive_penalty"] == 0.0


def test_dpop_active_penalty():
    logprobs = t([[-1.0, -1.0], [-2.0, 0.0], [-2.0, -1.0], [-3.0, -3.0]]).requires_grad_()
    ref = t([[-1.5, -1.5], [-1.0, 0.0], [-1.5, -1.0], [-2.0, -2.0]])
    mask = t([[1, 1], [1, 0], [1, 1], [1, 1]])
    # pair 0: l_w = -2 + 3 = 1, l_l = -2 + 1 = -1, h = 2, penalty 0
    # pair 1: l_w = -3 + 2.5 = -0.5, l_l = -6 + 4 = -2, h = 1.5, penalty 0.5
    # beta 0.5, lambda 2: logits 0.5 * (2 - 0) = 1.0 and 0.5 * (1.5 - 2 * 0.5) = 0.25
    loss, m = dpo_loss(logprobs, mask, ref, t(CHOSEN), beta=0.5, loss_type="dpop", dpop_lambda=2.0)
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(-0.25)) / 2)
    assert m["dpo/positive_penalty"] == pytest.approx(0.25)
    loss.backward()
    # pair 1 chosen token: d logit / d logp = 0.5 * (1 + lambda) = 1.5 (penalty active), times -sig(-0.25) / 2
    assert logprobs.grad[2, 0].item() == pytest.approx(-1.5 * sig(-0.25) / 2)
    # pair 0 chosen token: penalty inactive, only beta = 0.5
    assert logprobs.grad[0, 0].item() == pytest.approx(-0.5 * sig(-1.0) / 2)


def test_dpo_unknown_loss_type_lists_valid_ones():
    logprobs, mask, ref, chosen = batch()
    with pytest.raises(ValueError, match="dpop.*ipo.*sigmoid"):
        dpo_loss(logprobs, mask, ref, chosen, loss_type="hinge")


@pytest.mark.parametrize("chosen", [[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 0.0, 0.5, 0.0]])
def test_bad_pair_layout_raises(chosen):
    n = len(chosen)
    logprobs, mask, ref = t(POLICY[:n]), t(MASK[:n]), t(REF[:n])
    with pytest.raises(ValueError, match="chosen_B"):
        dpo_loss(logprobs, mask, ref, t(chosen))
    with pytest.raises(ValueError, match="chosen_B"):
        stepwise_dpo_loss(logprobs, mask, ref, t(chosen), torch.ones_like(logprobs))


def test_length_one_responses():
    # one pair, one token each: l_w = -0.2 + 0.5 = 0.3, l_l = -1 + 0.5 = -0.5, h = 0.8
    logprobs, ref, mask = t([[-0.2], [-1.0]]), t([[-0.5], [-0.5]]), t([[1], [1]])
    loss, m = dpo_loss(logprobs, mask, ref, t([1.0, 0.0]), beta=1.0)
    assert loss.item() == pytest.approx(softplus(-0.8))
    assert m["dpo/reward_accuracy"] == 1.0
    # ipo: averaging over one token changes nothing: (0.8 - 0.5)^2
    ipo, _ = dpo_loss(logprobs, mask, ref, t([1.0, 0.0]), beta=1.0, loss_type="ipo")
    assert ipo.item() == pytest.approx(0.3**2)
    sft, sm = sft_loss(logprobs[:1], mask[:1])
    assert sft.item() == pytest.approx(0.2) and sm["sft/tokens"] == 1.0


def step_weights(scores_B_T, chosen_B):
    # the caller's mapping: w = s on chosen rows, 1 - s on rejected rows
    return torch.where(chosen_B.bool().unsqueeze(-1), scores_B_T, 1.0 - scores_B_T)


def test_stepwise_with_extreme_scores_is_sigmoid_dpo():
    logprobs, mask, ref, chosen = batch()
    scores = chosen.unsqueeze(-1).expand(-1, 3).clone()  # 1 on chosen rows, 0 on rejected
    weights = step_weights(scores, chosen)
    assert torch.equal(weights, torch.ones_like(weights))
    step, sm = stepwise_dpo_loss(logprobs, mask, ref, chosen, weights, beta=0.1)
    logprobs2 = logprobs.detach().clone().requires_grad_()
    dpo, dm = dpo_loss(logprobs2, mask, ref, chosen, beta=0.1)
    assert torch.allclose(step, dpo, rtol=0.0, atol=1e-7)
    step.backward()
    dpo.backward()
    assert torch.allclose(logprobs.grad, logprobs2.grad, rtol=0.0, atol=1e-7)
    for key, value in dm.items():
        assert sm[key] == pytest.approx(value, abs=1e-7), key
    assert sm["dpo/weight_mean_chosen"] == 1.0 and sm["dpo/weight_mean_rejected"] == 1.0


def test_stepwise_weighted_by_hand():
    logprobs, mask, ref, chosen = batch()
    scores = t([[1.0, 0.5, 0.7],    # chosen: w = 1.0, 0.5 (pad 0.7 ignored); l = 0.5, 0.5 -> 0.75
                [0.0, 1.0, 0.5],    # rejected: w = 1.0, 0.0, 0.5; l = -1, 0.5, 0 -> -1.0
                [0.2, 0.9, 1.0],    # chosen: w = 0.2, (0.9 masked), 1.0; l = 0.5, -, -0.5 -> -0.4
                [0.5, 0.3, 0.3]])   # rejected: w = 0.5; l = 1 -> 0.5
    weights = step_weights(scores, chosen)
    loss, m = stepwise_dpo_loss(logprobs, mask, ref, chosen, weights, beta=0.5)
    # h0 = 0.75 + 1.0 = 1.75, h1 = -0.4 - 0.5 = -0.9; logits 0.875, -0.45
    assert loss.item() == pytest.approx((softplus(-0.875) + softplus(0.45)) / 2)
    assert m["loss/dpo"] == pytest.approx(loss.item())
    assert m["dpo/reward_chosen"] == pytest.approx(0.5 * (0.75 - 0.4) / 2)
    assert m["dpo/reward_rejected"] == pytest.approx(0.5 * (-1.0 + 0.5) / 2)
    assert m["dpo/margin"] == pytest.approx(0.5 * (1.75 - 0.9) / 2)
    assert m["dpo/reward_accuracy"] == 0.5  # 0.375 > -0.5; -0.2 < 0.25
    assert m["dpo/logps_chosen"] == pytest.approx(-2.5)  # unweighted sums -3, -2
    assert m["dpo/logps_rejected"] == pytest.approx(-3.25)
    assert m["dpo/weight_mean_chosen"] == pytest.approx((1.0 + 0.5 + 0.2 + 1.0) / 4)
    assert m["dpo/weight_mean_rejected"] == pytest.approx((1.0 + 0.0 + 0.5 + 0.5) / 4)
    loss.backward()
    # d loss / d logp_t = -beta w_t sig(-beta h) / 2 on chosen tokens, +beta w_t sig(-beta h) / 2 on rejected
    assert logprobs.grad[0, 1].item() == pytest.approx(-0.5 * 0.5 * sig(-0.875) / 2)
    assert logprobs.grad[1, 1].item() == 0.0  # rejected token with weight 0 (score 1: judged good)
    assert logprobs.grad[3, 0].item() == pytest.approx(0.5 * 0.5 * sig(0.45) / 2)
    assert logprobs.grad[2, 1].item() == 0.0  # masked token


def test_stepwise_weights_shape_checked():
    logprobs, mask, ref, chosen = batch()
    with pytest.raises(ValueError, match="weights_B_T shape"):
        stepwise_dpo_loss(logprobs, mask, ref, chosen, torch.ones(4, 2, dtype=F64))
