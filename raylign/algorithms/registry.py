"""The two registries the driver and the trainer read: ``ALGORITHMS`` (a step function and what it needs) and
``LOSSES`` (a loss function and its contract).

A new algorithm is one module (its pure loss and its one-screen step), one ``Algorithm`` entry below (plus a
``Loss`` entry when it brings a loss) and its config section in ``raylign/config.py``. The driver builds only
what the entry asks for: generator replicas when it samples during training (or evals are on), a reference
model only when ``reference(cfg)`` says so, a critic only when ``critic(cfg)`` names one, and the data source
(``prompts`` from the env, SFT ``examples`` or preference ``pairs``). Nothing is read from signatures: a loss
lists the batch fields it takes, its keyword knobs, and the extra forward outputs it needs (``values_B_T``:
the critic's V(s_t) with grad; ``entropy_B_T``: the policy's per-token entropy with grad), and the trainer
refuses a command that does not match the contract, on every rank, before any collective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from raylign.algorithms.dpo import dpo_step, online_dpo_step
from raylign.algorithms.is_losses import cispo_loss, gspo_loss
from raylign.algorithms.losses import policy_entropy_loss, policy_gradient_loss, ppo_loss, value_only_loss
from raylign.algorithms.offline_losses import dpo_loss, sft_loss, stepwise_dpo_loss
from raylign.algorithms.policy_gradient import policy_gradient_step
from raylign.algorithms.ppo import ppo_step
from raylign.algorithms.protocol import StepFn
from raylign.algorithms.restem import restem_step
from raylign.algorithms.sft import sft_step
from raylign.algorithms.step_dpo import step_dpo_step
from raylign.algorithms.vineppo import vineppo_step

DataSource = Literal["prompts", "examples", "pairs"]


def _always(cfg: Any) -> bool:
    return True


def _never(cfg: Any) -> bool:
    return False


def _kl(cfg: Any) -> bool:
    """A reference only when the KL term is on."""
    return cfg.kl_beta > 0


def _no_critic(cfg: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Algorithm:
    """What the driver needs to run one algorithm: its step and what that step uses."""

    step: StepFn
    data: DataSource  # what the step consumes: env prompts, SFT examples or preference pairs
    generation: Callable[[Any], bool] = _always  # samples from the policy during training
    reference: Callable[[Any], bool] = _kl  # a frozen reference model (trainer.ref_model says where)
    critic: Callable[[Any], str | None] = _no_critic  # "value_head" or "separate" (PPO)
    judge: Callable[[Any], bool] = _never  # a frozen judge model on its own generator actor
    base_snapshot: Callable[[Any], bool] = _never  # keep the initial weights for Cluster.reset_policy
    headline: tuple[str, ...] = ("reward/mean", "accuracy/train")  # metrics shown on the progress bar


_DPO_HEADLINE = ("loss/dpo", "dpo/reward_accuracy", "dpo/margin")

ALGORITHMS: dict[str, Algorithm] = {
    "grpo": Algorithm(policy_gradient_step, "prompts"),
    "rloo": Algorithm(policy_gradient_step, "prompts"),
    "reinforce": Algorithm(policy_gradient_step, "prompts"),
    "reinforce_pp": Algorithm(policy_gradient_step, "prompts"),
    "ppo": Algorithm(ppo_step, "prompts", critic=lambda cfg: cfg.critic),
    "vineppo": Algorithm(vineppo_step, "prompts"),
    "sft": Algorithm(sft_step, "examples", generation=_never, reference=_never, headline=("loss/sft",)),
    "dpo": Algorithm(dpo_step, "pairs", generation=_never, reference=_always, headline=_DPO_HEADLINE),
    "online_dpo": Algorithm(online_dpo_step, "prompts", reference=_always,
                            headline=("reward/mean", "accuracy/train", "dpo/reward_accuracy")),
    "step_dpo": Algorithm(step_dpo_step, "pairs", generation=lambda cfg: cfg.step_scores == "mc",
                          reference=_always, judge=lambda cfg: cfg.step_scores == "judge", headline=_DPO_HEADLINE),
    "restem": Algorithm(restem_step, "prompts", reference=_never, base_snapshot=lambda cfg: cfg.restart_from_base,
                        headline=("reward/mean", "accuracy/train", "restem/kept")),
}


@dataclass(frozen=True)
class Loss:
    """A registered loss ``fn(logprobs_B_T=, mask_B_T=, **fields, **kwargs) -> (loss, metrics)`` and its contract.

    ``units``: what the loss averages over within one micro-batch (token | sequence | fixed); the trainer
    weights micro-batches by it so a step equals one loss over the whole minibatch. None: the ``agg`` knob.
    """

    fn: Callable
    fields: frozenset[str]  # batch fields it requires
    optional: frozenset[str] = frozenset()  # batch fields it may take
    kwargs: frozenset[str] = frozenset()  # keyword knobs it accepts
    outputs: frozenset[str] = frozenset()  # forward outputs beyond log-probs: values_B_T, entropy_B_T
    units: str | None = None

    def check(self, name: str, fields: set[str], kwargs: set[str]) -> None:
        """ValueError naming what a train_step's batch fields and knobs lack or add to this contract."""
        problems = []
        if missing := self.fields - fields:
            problems.append(f"missing batch fields {sorted(missing)}")
        if extra := fields - self.fields - self.optional:
            problems.append(f"unexpected batch fields {sorted(extra)}")
        if unknown := kwargs - self.kwargs:
            problems.append(f"unknown loss_kwargs {sorted(unknown)} (accepted: {sorted(self.kwargs)})")
        if problems:
            raise ValueError(f"loss {name!r}: {'; '.join(problems)}")

    def unit(self, kwargs: dict) -> str:
        return self.units or kwargs.get("agg", "token")


def policy_gradient_on_policy_loss(logprobs_B_T, **kwargs):
    """One update per batch: the sampling policy is the current one, so old log-probs are the detached
    current ones (ratio exactly 1) and no separate forward pass is spent computing them."""
    return policy_gradient_loss(logprobs_B_T=logprobs_B_T, old_logprobs_B_T=logprobs_B_T.detach(), **kwargs)


_PG_KWARGS = frozenset({"clip_eps", "clip_eps_high", "agg", "kl_beta", "kl_kind", "max_tokens"})
_REF = frozenset({"ref_logprobs_B_T"})
# the clipped-surrogate losses take truncated importance sampling: the generator's log-probs and the cap
_CLIP_FIELDS, _CLIP_KWARGS = _REF | {"gen_logprobs_B_T"}, _PG_KWARGS | {"tis_cap"}

LOSSES: dict[str, Loss] = {
    "policy_gradient": Loss(policy_gradient_loss, frozenset({"advantages_B", "old_logprobs_B_T"}), _CLIP_FIELDS,
                            _CLIP_KWARGS),
    "policy_gradient_on_policy": Loss(policy_gradient_on_policy_loss, frozenset({"advantages_B"}), _CLIP_FIELDS,
                                      _CLIP_KWARGS),
    "policy_entropy": Loss(policy_entropy_loss, frozenset({"advantages_B"}), _CLIP_FIELDS | {"old_logprobs_B_T"},
                           _CLIP_KWARGS | {"entropy_coef"}, frozenset({"entropy_B_T"})),
    "ppo": Loss(ppo_loss, frozenset({"advantages_B", "old_logprobs_B_T", "old_values_B_T", "returns_B_T"}),
                _CLIP_FIELDS, _CLIP_KWARGS | {"vf_coef", "vf_clip", "entropy_coef"}, frozenset({"values_B_T", "entropy_B_T"})),
    # GSPO: one clipped ratio per sequence, a mean over sequences; CISPO: a clipped, detached IS weight per token
    "gspo": Loss(gspo_loss, frozenset({"advantages_B"}), _REF | {"old_logprobs_B_T"},
                 frozenset({"clip_eps", "clip_eps_high", "kl_beta", "kl_kind"}), units="sequence"),
    "cispo": Loss(cispo_loss, frozenset({"advantages_B"}), _REF | {"old_logprobs_B_T"}, _PG_KWARGS),
    "sft": Loss(sft_loss, frozenset(), units="token"),
    "dpo": Loss(dpo_loss, frozenset({"ref_logprobs_B_T", "chosen_B"}),
                kwargs=frozenset({"beta", "loss_type", "dpop_lambda", "label_smoothing"}), units="sequence"),
    "step_dpo": Loss(stepwise_dpo_loss, frozenset({"ref_logprobs_B_T", "chosen_B", "token_weights_B_T"}),
                     kwargs=frozenset({"beta"}), units="sequence"),
    "value": Loss(value_only_loss, frozenset({"old_values_B_T", "returns_B_T"}), frozenset(), frozenset({"vf_clip"}),
                  frozenset({"values_B_T"}), units="token"),
}
