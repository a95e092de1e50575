"""PPO loss (policy + value + entropy), the critic-only loss and the entropy-regularised critic-free loss."""

import inspect

import pytest
import torch
from torch.testing import assert_close

from raylign.algorithms.losses import policy_entropy_loss, ppo_loss, value_only_loss
from raylign.algorithms.registry import LOSSES

F64 = torch.float64


def t(x, grad=False):
    return torch.tensor(x, dtype=F64, requires_grad=grad)


def _inputs():
    # one sequence, two tokens, on-policy (ratio 1): the policy term is -A per token
    return dict(
        logprobs_B_T=t([[-1.0, -2.0]], grad=True),
        values_B_T=t([[0.5, 0.0]], grad=True),
        entropy_B_T=t([[1.0, 3.0]], grad=True),
        old_logprobs_B_T=t([[-1.0, -2.0]]),
        old_values_B_T=t([[0.45, 0.3]]),
        returns_B_T=t([[1.0, -1.0]]),
        advantages_B=t([[1.0, -2.0]]),
        mask_B_T=t([[1.0, 1.0]]),
    )


def test_ppo_loss_by_hand():
    x = _inputs()
    loss, m = ppo_loss(**x, clip_eps=0.2, vf_coef=0.5, vf_clip=0.2, entropy_coef=0.1, agg="token")
    # policy: mean(-1, +2) = 0.5
    # value: token 0 moves 0.05 (inside the clip): (0.5 - 1)^2 = 0.25;
    #        token 1 moves -0.3, clipped to 0.3 - 0.2 = 0.1: max((0 + 1)^2, (0.1 + 1)^2) = 1.21
    #        0.5 * mean(0.25, 1.21) = 0.365
    # entropy: mean(1, 3) = 2;  total = 0.5 + 0.5 * 0.365 - 0.1 * 2 = 0.4825
    assert loss.item() == pytest.approx(0.4825)
    assert m["loss/policy"] == pytest.approx(0.5)
    assert m["loss/value"] == pytest.approx(0.365)
    assert m["loss/entropy"] == pytest.approx(2.0)
    assert m["loss/kl"] == 0.0 and m["value/clip_fraction"] == pytest.approx(0.5)
    loss.backward()
    # d/dV: 0.5 * vf_coef * 0.5 (mean) * 2 (V - R) = 0.25 * (0.5 - 1) on token 0; token 1's clip cuts its grad
    assert_close(x["values_B_T"].grad, t([[-0.125, 0.0]]))
    assert_close(x["entropy_B_T"].grad, t([[-0.05, -0.05]]))  # -entropy_coef / 2 tokens
    assert_close(x["logprobs_B_T"].grad, t([[-0.5, 1.0]]))  # -A / 2 tokens


def test_ppo_loss_sequence_aggregation_weights_policy_and_entropy_per_sequence():
    x = _inputs()
    x.update(logprobs_B_T=t([[-1.0, -2.0], [-1.0, 0.0]]), old_logprobs_B_T=t([[-1.0, -2.0], [-1.0, 0.0]]),
             values_B_T=t([[0.5, 0.0], [0.0, 0.0]]), old_values_B_T=t([[0.5, 0.0], [0.0, 0.0]]),
             returns_B_T=t([[0.5, 0.0], [1.0, 0.0]]), entropy_B_T=t([[1.0, 3.0], [6.0, 100.0]]),
             advantages_B=t([[1.0, -2.0], [4.0, 9.0]]), mask_B_T=t([[1.0, 1.0], [1.0, 0.0]]))
    loss, m = ppo_loss(**x, vf_coef=1.0, vf_clip=10.0, entropy_coef=0.5, agg="sequence")
    # policy: mean(mean(-1, 2), -4) = -1.75; entropy: mean(2, 6) = 4 (padding's 100 ignored)
    # value: token mean over 3 valid tokens, 0.5 * (0 + 0 + 1) / 3
    assert m["loss/policy"] == pytest.approx(-1.75)
    assert m["loss/entropy"] == pytest.approx(4.0)
    assert m["loss/value"] == pytest.approx(1 / 6)
    assert loss.item() == pytest.approx(-1.75 + 1 / 6 - 2.0)


def test_value_only_loss_ignores_logprobs():
    x = _inputs()
    loss, m = value_only_loss(x["values_B_T"], x["old_values_B_T"], x["returns_B_T"], x["mask_B_T"], vf_clip=0.2,
                              logprobs_B_T=x["logprobs_B_T"])
    assert loss.item() == pytest.approx(0.365) and m["loss/value"] == pytest.approx(0.365)


def test_policy_entropy_loss_on_policy_and_off_policy():
    x = _inputs()
    loss, m = policy_entropy_loss(x["logprobs_B_T"], x["entropy_B_T"], x["advantages_B"], x["mask_B_T"],
                                  entropy_coef=0.1)
    assert loss.item() == pytest.approx(0.5 - 0.2) and m["ratio/mean"] == pytest.approx(1.0)
    # old log-prob 0.1 lower on token 0: ratio e^0.1 = 1.105 < 1.2, unclipped: (-1.105 * 1 + 1 * 2) / 2
    loss, _ = policy_entropy_loss(x["logprobs_B_T"], x["entropy_B_T"], x["advantages_B"], x["mask_B_T"],
                                  old_logprobs_B_T=t([[-1.1, -2.0]]), entropy_coef=0.0)
    assert loss.item() == pytest.approx(-0.5 * torch.exp(t(0.1)).item() + 1.0)


def test_registered_losses_declare_what_the_trainer_must_compute():
    assert LOSSES["ppo"].outputs == {"values_B_T", "entropy_B_T"}
    assert LOSSES["value"].outputs == {"values_B_T"}
    assert LOSSES["policy_entropy"].outputs == {"entropy_B_T"}
    assert LOSSES["policy_gradient"].outputs == frozenset()
    # every declared field and output is a parameter of the function: the contract can't promise what fn lacks
    for name, loss in LOSSES.items():
        params = set(inspect.signature(loss.fn).parameters)
        declared = loss.fields | loss.optional | loss.outputs | {"logprobs_B_T", "mask_B_T"}
        assert declared <= params or "kwargs" in params, (name, declared - params)


def test_contract_names_what_a_command_lacks_or_adds():
    LOSSES["ppo"].check("ppo", {"advantages_B", "old_logprobs_B_T", "old_values_B_T", "returns_B_T"}, {"vf_coef"})
    with pytest.raises(ValueError, match=r"missing batch fields \['returns_B_T'\]"):
        LOSSES["ppo"].check("ppo", {"advantages_B", "old_logprobs_B_T", "old_values_B_T"}, set())
    with pytest.raises(ValueError, match=r"unexpected batch fields \['bogus_B'\]"):
        LOSSES["value"].check("value", {"old_values_B_T", "returns_B_T", "bogus_B"}, set())
    with pytest.raises(ValueError, match=r"unknown loss_kwargs \['clip_esp'\]"):
        LOSSES["policy_gradient"].check("policy_gradient", {"advantages_B", "old_logprobs_B_T"}, {"clip_esp"})
    assert LOSSES["value"].unit({"agg": "sequence"}) == "token" and LOSSES["ppo"].unit({"agg": "fixed"}) == "fixed"
