"""One config section per algorithm (``algorithm.name`` picks it): a pydantic discriminated union.

Shared bases: ``_Sampling`` (algorithms that sample during training), ``_PolicyGradient``, ``_CriticFree``
(its loss variants and DAPO's rules), ``_Offline``
(datasets of examples or pairs) and ``_DpoLoss``. ``raylign.config`` re-exports every name here.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, model_validator

from raylign.config_base import _Section


class _Sampling(_Section):
    """Fields of every algorithm that samples from the current policy during training."""

    group_size: int = Field(4, ge=1, description="samples per prompt (G)")
    prompts_per_step: int = Field(8, ge=1, description="prompts per training step (P); batch = P x G sequences")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of training rollouts; the trainer's log-probs use it too (evals use generator.temperature)")

    @property
    def items_per_step(self) -> int:
        return self.prompts_per_step


class _PolicyGradient(_Sampling):
    """Fields of the clipped-surrogate family (GRPO, RLOO, REINFORCE, PPO, VinePPO)."""

    clip_eps: float = Field(0.2, gt=0, description="PPO-style ratio clip (lower side, and upper unless clip_eps_high)")
    clip_eps_high: float | None = Field(None, gt=0, description="upper ratio clip (DAPO clip-higher); None = clip_eps")
    loss_agg: Literal["token", "sequence", "fixed"] = Field("token", description="loss aggregation: token mean, per-sequence mean, or Dr.GRPO fixed length (generator.max_new_tokens)")
    kl_beta: float = Field(0.0, ge=0, description="KL(policy || reference) coefficient; 0: no reference model is built")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator (Schulman's k1/k2/k3)")
    epochs: int = Field(1, ge=1, description="passes over each batch (more than 1 makes the ratio clip matter)")
    minibatches: int = Field(1, ge=1, description="optimizer steps per epoch")
    tis_cap: float | None = Field(None, gt=0, description="truncated importance sampling: weight each token by min(pi_trainer / pi_generator, tis_cap) (the generator's kernels, and async its older weights, differ from the trainer's); None: off")
    max_staleness: int = Field(0, ge=0, description="asynchronous training: the generators sample the next max_staleness steps' prompts while a step trains, so a sample may be that many policy versions old (older ones are dropped); 0: synchronous")

    @model_validator(mode="after")
    def _check_async(self):
        if self.max_staleness > 0 and self.tis_cap is None:
            raise ValueError(f"max_staleness={self.max_staleness} trains on samples of older weights; set "
                             "algorithm.tis_cap (e.g. 2.0) so the loss corrects for them")
        return self


class _CriticFree(_PolicyGradient):
    """Fields of the critic-free policy-gradient step (GRPO, RLOO, REINFORCE, REINFORCE++): the loss variant and
    DAPO's sampling and length rules (raylign/algorithms/dapo.py), all off by default."""

    policy_loss: Literal["clip", "gspo", "cispo"] = Field("clip", description="clip: PPO-style token ratio clip; gspo: sequence-level ratio and clip (Zheng et al. 2025, always a sequence mean); cispo: clipped, detached IS weight (MiniMax-M1)")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all equal and sample more prompts until the batch is full")
    max_extra_generate_calls: int = Field(2, ge=0, description="dynamic sampling: at most this many extra generate calls per step (then tied groups fill the batch)")
    overlong_filter: bool = Field(False, description="DAPO: responses cut by generator.max_new_tokens get loss mask 0 (their reward still counts in the group)")
    overlong_buffer: int | None = Field(None, ge=1, description="DAPO eq. 13: soft length penalty over the last this many tokens of generator.max_new_tokens; None: off")
    overlong_penalty: float = Field(1.0, ge=0, description="the soft length penalty at generator.max_new_tokens (DAPO: 1)")

    @model_validator(mode="after")
    def _check_variants(self):
        if self.policy_loss == "gspo" and "loss_agg" in self.model_fields_set and self.loss_agg != "sequence":
            raise ValueError(f"policy_loss=gspo averages over sequences; loss_agg={self.loss_agg!r} does not apply")
        if self.tis_cap is not None and self.policy_loss != "clip":
            raise ValueError(f"tis_cap weights the clipped surrogate; policy_loss={self.policy_loss!r} has its own ratio")
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError("dynamic_sampling needs group_size >= 2 (a group of one is always tied)")
        return self


class GrpoConfig(_CriticFree):
    name: Literal["grpo"] = "grpo"
    normalize_std: bool = Field(True, description="divide group advantages by the group std (False = Dr.GRPO)")
    kl_in_reward: bool = Field(False, description="subtract beta*KL from the reward instead of adding a loss term")


class RlooConfig(_CriticFree):
    name: Literal["rloo"] = "rloo"
    kl_in_reward: bool = Field(False, description="subtract beta*KL from the reward instead of adding a loss term")


class ReinforceConfig(_CriticFree):
    name: Literal["reinforce"] = "reinforce"
    ema_decay: float = Field(0.9, ge=0, lt=1, description="baseline = decay*baseline + (1-decay)*reward")
    kl_in_reward: bool = Field(False, description="subtract beta*KL from the reward instead of adding a loss term")


class ReinforcePpConfig(_CriticFree):
    name: Literal["reinforce_pp"] = "reinforce_pp"
    group_baseline: bool = Field(False, description="REINFORCE++-baseline: subtract the group mean before the batch normalisation")
    kl_in_reward: bool = Field(False, description="subtract beta*KL from the reward instead of adding a loss term")

    @model_validator(mode="after")
    def _check_group(self):
        if self.group_baseline and self.group_size < 2:
            raise ValueError("group_baseline needs group_size >= 2")
        return self


class PpoConfig(_PolicyGradient):
    name: Literal["ppo"] = "ppo"
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount (1.0 for language, as VinePPO; AutoDSPy uses 0.99)")
    lam: float = Field(1.0, ge=0, le=1, description="GAE lambda (VinePPO uses 1.0; AutoDSPy 0.95)")
    vf_coef: float = Field(0.5, ge=0, description="weight of the value loss")
    vf_clip: float = Field(0.2, gt=0, description="value clip range around the old values")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus coefficient")
    whiten_advantages: bool = Field(True, description="normalise advantages over the batch")
    critic: Literal["value_head", "separate"] = Field("value_head", description="value head on the policy backbone, or a separate critic model")
    truncation_penalty: float | None = Field(0.0, description="reward of a response cut by the length limit (null: keep its score)")


class VinePpoConfig(_PolicyGradient):
    name: Literal["vineppo"] = "vineppo"
    mc_rollouts: int = Field(4, ge=1, description="Monte Carlo continuations per step boundary (K)")
    mc_max_new_tokens: int | None = Field(None, ge=1, description="continuation length cap (None: generator.max_new_tokens)")
    step_split: Literal["newline", "sentence", "auto"] = Field("auto", description="step boundaries (auto: newlines and sentence ends, numbers kept whole)")
    max_steps_per_response: int = Field(8, ge=1, description="at most this many steps per response (adjacent steps merged)")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus coefficient")
    whiten_advantages: bool = Field(True, description="normalise advantages over the batch")
    truncation_penalty: float | None = Field(0.0, description="reward of a response or continuation cut by the length limit (null: keep its score)")


class _Offline(_Section):
    """Fields of the algorithms that train on a dataset (SFT examples or preference pairs)."""

    data_path: str | None = Field(None, description="jsonl/json/parquet file or hub id ('{split}' is filled in); None: generated from the arith env")
    data_split: str = Field("train", description="split of data_path to train on")
    data_limit: int | None = Field(None, ge=1, description="read at most this many rows")
    batch_size: int = Field(8, ge=1, description="examples (SFT) or pairs (DPO) per optimizer step")
    skip_invalid: bool = Field(False, description="drop rows that fail validation (counted) instead of refusing the data")

    @property
    def items_per_step(self) -> int:
        return self.batch_size


class SftConfig(_Offline):
    name: Literal["sft"] = "sft"


class _DpoLoss(_Section):
    beta: float = Field(0.1, gt=0, description="DPO temperature: strength of the implicit KL to the reference")
    loss_type: Literal["sigmoid", "ipo", "dpop"] = Field("sigmoid", description="sigmoid (Rafailov et al. 2023), ipo (Azar et al. 2023) or dpop (DPO-positive, Pal et al. 2024)")
    dpop_lambda: float = Field(50.0, ge=0, description="dpop: weight of the penalty on a chosen response whose likelihood falls below the reference's")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid: conservative-DPO label noise")


class DpoConfig(_Offline, _DpoLoss):
    name: Literal["dpo"] = "dpo"


class OnlineDpoConfig(_Sampling, _DpoLoss):
    name: Literal["online_dpo"] = "online_dpo"
    loss_type: Literal["sigmoid", "ipo", "dpop"] = Field("dpop", description="as dpo.loss_type; DPO-positive by default (the VinePPO seed's online baseline)")
    pairs_per_prompt: int = Field(1, ge=1, description="at most this many (correct, incorrect) pairs formed from one prompt's samples")


class StepDpoConfig(_Offline):
    name: Literal["step_dpo"] = "step_dpo"
    beta: float = Field(0.1, gt=0, description="DPO temperature")
    step_scores: Literal["data", "mc", "judge"] = Field("data", description="where step scores come from: the pairs' scores_chosen/scores_rejected, Monte Carlo continuations, or an LLM judge")
    step_delimiter: str = Field("\n", description="steps of a response are its non-empty pieces between these")
    mc_rollouts: int = Field(4, ge=1, description="mc: continuations per step prefix (K)")
    mc_temperature: float = Field(1.0, gt=0, description="mc: sampling temperature of the continuations")
    judge_model: str | None = Field(None, description="judge: model of the judge's generator actor (None: model.name)")
    judge_template: str | None = Field(None, description="judge: prompt template with {question}, {previous_steps}, {step} (None: raylign.envs.judge.STEP_TEMPLATE)")
    judge_max_new_tokens: int = Field(32, ge=1, description="judge: tokens of the judge's answer")


class RestEmConfig(_Sampling):
    name: Literal["restem"] = "restem"
    group_size: int = Field(4, ge=1, description="samples per prompt (K) each iteration")
    sft_epochs: int = Field(1, ge=1, description="passes over the kept samples each iteration")
    batch_size: int = Field(8, ge=1, description="kept samples per optimizer step")
    max_per_prompt: int | None = Field(None, ge=1, description="keep at most this many correct samples of one prompt (None: all)")
    restart_from_base: bool = Field(True, description="fine-tune from the base model each iteration (Singh et al. 2023); false continues from the last one")


AlgorithmConfig = Annotated[
    GrpoConfig | RlooConfig | ReinforceConfig | ReinforcePpConfig | PpoConfig | VinePpoConfig | SftConfig | DpoConfig
    | OnlineDpoConfig | StepDpoConfig | RestEmConfig,
    Field(discriminator="name"),
]
# algorithm.name -> its section, read off the union (a new algorithm's section is added there only)
ALGORITHM_CONFIGS: dict[str, type[_Section]] = {
    c.model_fields["name"].default: c for c in get_args(get_args(AlgorithmConfig)[0])}
