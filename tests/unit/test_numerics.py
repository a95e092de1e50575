"""Shared numerics against hand-computed values."""

import math

import pytest
import torch
from torch.testing import assert_close

from raylign.algorithms.numerics import (
    K3_LOG_RATIO_CLAMP, aggregate, entropy_from_logits, kl_estimate, masked_mean, masked_sum, masked_whiten,
)

F64 = torch.float64
LN2 = math.log(2.0)


def t(x):
    return torch.tensor(x, dtype=F64)


def test_masked_sum_and_mean():
    x, mask = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), t([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(x, mask).item() == 7.0
    assert_close(masked_sum(x, mask, dim=-1), t([3.0, 4.0]))
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0)
    assert_close(masked_mean(x, mask, dim=-1), t([1.5, 4.0]))
    assert_close(masked_mean(x, mask.bool(), dim=0), t([2.5, 2.0, 0.0]))


def test_masked_mean_of_empty_slice_is_zero_with_finite_grad():
    x = t([[1.0, 2.0], [3.0, 4.0]]).requires_grad_()
    out = masked_mean(x, t([[1, 1], [0, 0]]), dim=-1)
    assert_close(out.detach(), t([1.5, 0.0]))
    out.sum().backward()
    assert_close(x.grad, t([[0.5, 0.5], [0.0, 0.0]]))


def test_masked_whiten_uses_unbiased_std_and_zeroes_padding():
    # valid [2, 4, 6]: mean 4, unbiased var (4 + 0 + 4) / 2 = 4 -> std 2 (population std would be 1.633)
    x, mask = t([[2.0, 4.0, 6.0, 100.0]]), t([[1, 1, 1, 0]])
    assert_close(masked_whiten(x, mask), t([[-1.0, 0.0, 1.0, 0.0]]))
    assert_close(masked_whiten(x, mask, shift_mean=False), t([[3.0, 4.0, 5.0, 0.0]]))


@pytest.mark.parametrize("kind,expected", [
    ("k1", LN2),                    # log(0.5 / 0.25)
    ("k2", 0.5 * LN2**2),           # 0.240227
    ("k3", 0.5 + LN2 - 1.0),        # r = 0.25/0.5: (r - 1) - log r = 0.193147
])
def test_kl_estimators_at_known_ratio(kind, expected):
    logp, logq = t([[math.log(0.5)]]), t([[math.log(0.25)]])
    assert kl_estimate(logp, logq, kind).item() == pytest.approx(expected)


@pytest.mark.parametrize("kind,expected", [("k1", -LN2), ("k2", 0.5 * LN2**2), ("k3", 2.0 - LN2 - 1.0)])
def test_kl_estimators_with_ratio_flipped(kind, expected):
    # pi = 0.25, ref = 0.5: k1 goes negative, k3 = 2 - ln 2 - 1 = 0.306853 stays positive
    logp, logq = t([[math.log(0.25)]]), t([[math.log(0.5)]])
    assert kl_estimate(logp, logq, kind).item() == pytest.approx(expected)


def test_k3_log_ratio_is_clamped():
    c = K3_LOG_RATIO_CLAMP
    # log(ref/pi) = 30 is clamped to c: e^c - c - 1; log(ref/pi) = -30 is clamped to -c: e^-c + c - 1
    out = kl_estimate(t([[0.0, 0.0]]), t([[30.0, -30.0]]), "k3")
    assert_close(out, t([[math.exp(c) - c - 1.0, math.exp(-c) + c - 1.0]]))
    assert torch.isfinite(kl_estimate(t([[0.0]]), t([[1e4]]), "k3")).all()


def test_unknown_kl_kind_raises():
    with pytest.raises(ValueError):
        kl_estimate(t([[0.0]]), t([[0.0]]), "k4")


def test_entropy_from_logits():
    # uniform over 2 -> ln 2; [0.5, 0.25, 0.25] -> 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2; shift-invariant
    logits = t([[[0.0, 0.0, -1e9], [math.log(0.5) + 3.0, math.log(0.25) + 3.0, math.log(0.25) + 3.0]]])
    assert_close(entropy_from_logits(logits), t([[LN2, 1.5 * LN2]]))


LOSS = [[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]]
MASK = [[1, 1, 1], [1, 0, 0]]


def test_aggregate_token_mean():
    assert aggregate(t(LOSS), t(MASK), "token").item() == pytest.approx((1 + 2 + 3 + 4) / 4)  # 2.5


def test_aggregate_sequence_mean():
    # per sequence 2 and 4, then mean over sequences = 3 (token mean would be 2.5)
    assert aggregate(t(LOSS), t(MASK), "sequence").item() == pytest.approx(3.0)


def test_aggregate_sequence_mean_skips_empty_rows():
    assert aggregate(t([[1.0, 2.0, 3.0], [9.0, 9.0, 9.0]]), t([[1, 1, 1], [0, 0, 0]]), "sequence").item() == 2.0


def test_aggregate_fixed_constant():
    with pytest.raises(ValueError, match="max_tokens"):  # no silent default: the padded T made it length-biased
        aggregate(t(LOSS), t(MASK), "fixed")
    assert aggregate(t(LOSS), t(MASK), "fixed", max_tokens=5).item() == pytest.approx(10.0 / (2 * 5))


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError):
        aggregate(t(LOSS), t(MASK), "mean")
