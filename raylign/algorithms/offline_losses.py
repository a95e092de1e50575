"""Offline losses: SFT and preference-pair DPO variants; each returns the mean over its micro-batch's units.

SFT: token-mean negative log-likelihood. Pairs: row 2k is pair k's chosen response y_w, row 2k+1 its rejected
y_l; log pi(y|x) is the sum of the response's masked-in token log-probs, and with l(y) = log pi(y|x) - log ref(y|x)
the DPO margin is h = l(y_w) - l(y_l). Losses, averaged over pairs:
  sigmoid: -log sig(beta h) (Rafailov et al. 2023, eq. 7); label_smoothing eps gives cDPO / TRL's
           -(1 - eps) log sig(beta h) - eps log sig(-beta h).
  ipo:     (h - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17). Deviation, as TRL: log-probs are length-AVERAGED
           (mean over masked-in tokens), not summed, so the target 1/(2 beta) doesn't scale with length.
  dpop:    -log sig(beta (h - lambda max(0, log ref(y_w|x) - log pi(y_w|x)))) (Pal et al. 2024, Smaug, eq. 3).
Stepwise DPO (futureAGI's; in the spirit of Lai et al. 2024 Step-DPO, deviating by weighting every token instead
of comparing one first-wrong step after a shared prefix): with l_t = log pi(y_t) - log ref(y_t) and per-token
weights w_t, h = sum_t w^w_t l^w_t - sum_t w^l_t l^l_t, loss = -log sig(beta h). The caller sets w = s on chosen
tokens and w = 1 - s on rejected ones from step scores s in [0, 1]; scores 1 (chosen) and 0 (rejected) make
every weight 1, so h is DPO's h and the loss is sigmoid DPO exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from raylign.algorithms.numerics import masked_mean, masked_sum


def sft_loss(logprobs_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean NLL over masked-in tokens. Metrics: loss/sft, sft/perplexity (exp of it), sft/tokens."""
    nll = -masked_mean(logprobs_B_T, mask_B_T)
    metrics = {
        "loss/sft": nll.item(),
        "sft/perplexity": torch.exp(nll.detach()).item(),
        "sft/tokens": masked_sum(torch.ones_like(logprobs_B_T), mask_B_T).item(),
    }
    return nll, metrics


class PairLogRatios(NamedTuple):
    """Per-pair (P = B / 2) sequence log-probs of the policy and reference, and their log-ratios l(y)."""

    policy_chosen_P: torch.Tensor
    policy_rejected_P: torch.Tensor
    ref_chosen_P: torch.Tensor
    ref_rejected_P: torch.Tensor
    logratio_chosen_P: torch.Tensor
    logratio_rejected_P: torch.Tensor


def check_pair_layout(chosen_B: torch.Tensor) -> None:
    """Raise ValueError unless chosen_B is 1, 0, 1, 0, ... (rows 2k chosen, 2k+1 rejected) with even length."""
    if chosen_B.dim() != 1 or chosen_B.shape[0] % 2 != 0 or chosen_B.shape[0] == 0:
        raise ValueError(f"pair batch needs a 1-D chosen_B of even, non-zero length; got shape "
                         f"{tuple(chosen_B.shape)}")
    expected_B = (torch.arange(chosen_B.shape[0], device=chosen_B.device) % 2 == 0).to(chosen_B.dtype)
    if not torch.equal(chosen_B, expected_B):
        raise ValueError("pair batch rows must alternate chosen, rejected (chosen_B = 1, 0, 1, 0, ...); got "
                         f"{chosen_B.tolist()}")


def pair_logratios(
    logprobs_B_T: torch.Tensor,
    ref_logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    chosen_B: torch.Tensor,
    weights_B_T: torch.Tensor | None = None,
    average: bool = False,
) -> PairLogRatios:
    """Sequence log-probs per pair: masked sums of (weights *) log-probs; average=True divides by the row's
    masked-in token count (an empty row gives 0). The reference is detached; weights are data, detached too."""
    check_pair_layout(chosen_B)
    if weights_B_T is not None and weights_B_T.shape != logprobs_B_T.shape:
        raise ValueError(f"weights_B_T shape {tuple(weights_B_T.shape)} != logprobs_B_T shape "
                         f"{tuple(logprobs_B_T.shape)}")
    ref_B_T = ref_logprobs_B_T.detach()
    if weights_B_T is not None:
        w_B_T = weights_B_T.detach().to(logprobs_B_T.dtype)
        logprobs_B_T, ref_B_T = logprobs_B_T * w_B_T, ref_B_T * w_B_T
    reduce = masked_mean if average else masked_sum
    policy_B = reduce(logprobs_B_T, mask_B_T, dim=-1)
    ref_B = reduce(ref_B_T, mask_B_T, dim=-1)
    return PairLogRatios(policy_B[0::2], policy_B[1::2], ref_B[0::2], ref_B[1::2],
                         policy_B[0::2] - ref_B[0::2], policy_B[1::2] - ref_B[1::2])


def _sigmoid(r: PairLogRatios, beta: float, dpop_lambda: float, label_smoothing: float):
    logits_P = beta * (r.logratio_chosen_P - r.logratio_rejected_P)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits_P) - label_smoothing * F.logsigmoid(-logits_P), {}


def _ipo(r: PairLogRatios, beta: float, dpop_lambda: float, label_smoothing: float):
    return (r.logratio_chosen_P - r.logratio_rejected_P - 1.0 / (2.0 * beta)) ** 2, {}


def _dpop(r: PairLogRatios, beta: float, dpop_lambda: float, label_smoothing: float):
    # positive when the policy has made the chosen response LESS likely than the reference did
    penalty_P = torch.relu(-r.logratio_chosen_P)
    h_P = r.logratio_chosen_P - r.logratio_rejected_P
    loss_P = -F.logsigmoid(beta * (h_P - dpop_lambda * penalty_P))
    return loss_P, {"dpo/positive_penalty": penalty_P.detach().mean().item()}


# loss_type -> (length-average the log-probs?, per-pair loss)
_DPO_LOSSES = {"sigmoid": (False, _sigmoid), "ipo": (True, _ipo), "dpop": (False, _dpop)}


def _pair_metrics(r: PairLogRatios, policy_chosen_P, policy_rejected_P, beta: float) -> dict[str, float]:
    reward_chosen_P = beta * r.logratio_chosen_P.detach()
    reward_rejected_P = beta * r.logratio_rejected_P.detach()
    return {
        "dpo/reward_chosen": reward_chosen_P.mean().item(),
        "dpo/reward_rejected": reward_rejected_P.mean().item(),
        "dpo/reward_accuracy": (reward_chosen_P > reward_rejected_P).to(reward_chosen_P.dtype).mean().item(),
        "dpo/margin": (reward_chosen_P - reward_rejected_P).mean().item(),
        "dpo/logps_chosen": policy_chosen_P.detach().mean().item(),
        "dpo/logps_rejected": policy_rejected_P.detach().mean().item(),
    }


def dpo_loss(
    logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    ref_logprobs_B_T: torch.Tensor,
    chosen_B: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    dpop_lambda: float = 50.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (sigmoid / ipo / dpop), mean over pairs.

    Metrics: loss/dpo; dpo/reward_chosen, dpo/reward_rejected (mean beta * l(y)), dpo/reward_accuracy (share of
    pairs with chosen reward > rejected), dpo/margin (mean reward difference), dpo/logps_chosen,
    dpo/logps_rejected (mean policy sequence log-probs); dpop adds dpo/positive_penalty. For ipo the rewards
    and logps are the length-averaged ones its loss uses. label_smoothing applies to sigmoid only.
    """
    if loss_type not in _DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {sorted(_DPO_LOSSES)}")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is defined for loss_type='sigmoid' only, not {loss_type!r}")
    average, per_pair_loss = _DPO_LOSSES[loss_type]
    r = pair_logratios(logprobs_B_T, ref_logprobs_B_T, mask_B_T, chosen_B, average=average)
    loss_P, extra = per_pair_loss(r, beta, dpop_lambda, label_smoothing)
    loss = loss_P.mean()
    metrics = {"loss/dpo": loss.item(), **_pair_metrics(r, r.policy_chosen_P, r.policy_rejected_P, beta), **extra}
    return loss, metrics


def stepwise_dpo_loss(
    logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    ref_logprobs_B_T: torch.Tensor,
    chosen_B: torch.Tensor,
    token_weights_B_T: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO on per-token-weighted log-ratios (module docstring), mean over pairs.

    Metrics as dpo_loss's: the rewards and margin use the weighted log-ratios the loss sees, dpo/logps_* the
    plain (unweighted) policy sequence log-probs; plus dpo/weight_mean_chosen, dpo/weight_mean_rejected
    (token-mean weight over masked-in tokens of chosen / rejected rows).
    """
    r = pair_logratios(logprobs_B_T, ref_logprobs_B_T, mask_B_T, chosen_B, weights_B_T=token_weights_B_T)
    loss = -F.logsigmoid(beta * (r.logratio_chosen_P - r.logratio_rejected_P)).mean()
    policy_B = masked_sum(logprobs_B_T.detach(), mask_B_T, dim=-1)
    w_B_T = token_weights_B_T.detach().to(logprobs_B_T.dtype)
    metrics = {
        "loss/dpo": loss.item(),
        **_pair_metrics(r, policy_B[0::2], policy_B[1::2], beta),
        "dpo/weight_mean_chosen": masked_mean(w_B_T[0::2], mask_B_T[0::2]).item(),
        "dpo/weight_mean_rejected": masked_mean(w_B_T[1::2], mask_B_T[1::2]).item(),
    }
    return loss, metrics
