"""Checks the driver runs before any actor starts: each bad input is one line naming the file, row or field.

- problems: an empty split, or fewer training problems than one step takes;
- resume: the checkpoint to continue from must be complete and intact (manifest sizes and hashes), written by
  the same number of trainer workers for the same model, and the config must not change a field that the
  saved state depends on (the prompt stream, the RNG states, the optimizer's parameters).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from raylign import storage
from raylign.config import Config, ConfigError
from raylign.envs import DataError, make_env
from raylign.envs.pairs import (RowIssue, arith_examples, arith_pairs, load_examples, load_pairs, validate_examples,
                                validate_pairs)
from raylign.types import Example, Pair, Problem
from raylign.orchestrator.checkpoint import newest_checkpoint, read_driver_state, verify_checkpoint

# Fields a resumed run must share with the run it continues: the model and its optimizer state, the trainer's
# per-rank RNG states, the algorithm's state, and the problem set whose shuffled order the checkpoint indexes.
RESUME_FIXED = ["model.name", "trainer.num_workers", "algorithm.name", "algorithm.critic", "env.name",
                "env.difficulty", "env.num_problems", "env.seed", "dataset.path", "dataset.limit",
                "dataset.question_key", "dataset.question_template", "dataset.answer_key", "seed",
                "algorithm.data_path", "algorithm.data_split", "algorithm.data_limit", "algorithm.skip_invalid",
                "train.sft_warmup_steps", "train.sft_warmup_data", "train.sft_warmup_batch_size"]


def data_source(cfg: Config, split: str) -> str:
    if split == "train" and getattr(cfg.algorithm, "data_path", None):
        return cfg.algorithm.data_path.replace("{split}", cfg.algorithm.data_split)
    if cfg.dataset.path:
        return cfg.dataset.path.replace("{split}", split)
    return f"env.name={cfg.env.name} (built-in data)"


def require_problems(problems: list[Problem], cfg: Config, split: str, need: int, purpose: str) -> list[Problem]:
    """``problems`` unchanged, or a DataError when the split yields fewer than ``need`` of them."""
    if len(problems) < need:
        found = "no problems" if not problems else f"only {len(problems)} problems"
        raise DataError(f"{data_source(cfg, split)}: split '{split}' yields {found}; {purpose} needs at least {need}")
    return problems


def _prompts(env, cfg: Config) -> list[Problem]:
    return env.problems("train")


def sft_examples(cfg: Config, path: str | None, split: str, limit: int | None, key: str) -> list[Example]:
    """SFT examples from ``path``, or the arith env's worked solutions when it is None."""
    if path:
        return load_examples(path, split, limit)
    if cfg.env.name != "arith":
        raise ConfigError(f"{key} is needed with env.name={cfg.env.name} (only arith generates its own "
                          "worked solutions)")
    return arith_examples(cfg.env, cfg.dataset, split, limit or cfg.env.num_problems)


def _examples(env, cfg: Config) -> list[Example]:
    algo = cfg.algorithm
    return sft_examples(cfg, algo.data_path, algo.data_split, algo.data_limit, "algorithm.data_path")


def warmup_examples(cfg: Config) -> list[Example]:
    """The SFT warm-up's examples (train.sft_warmup_steps), validated; [] without a warm-up."""
    if not cfg.train.sft_warmup_steps:
        return []
    from raylign.algorithms.registry import ALGORITHMS

    if ALGORITHMS[cfg.algorithm.name].reference(cfg.algorithm):
        raise ConfigError(f"train.sft_warmup_steps with algorithm.name={cfg.algorithm.name}: its reference model "
                          "would be the base model, not the warmed-up one; run the SFT as its own run and start "
                          "this one from it (model.name=<sft run>/final_model)")
    examples = sft_examples(cfg, cfg.train.sft_warmup_data, "train", None, "train.sft_warmup_data")
    examples = require_problems(examples, cfg, "train", cfg.train.sft_warmup_batch_size,
                                f"one SFT warm-up step (train.sft_warmup_batch_size={cfg.train.sft_warmup_batch_size})")
    if issues := validate_examples(examples):
        raise DataError(f"{len(issues)} invalid SFT warm-up examples; the first: {issues[0]}")
    return examples


def _pairs(env, cfg: Config) -> list[Pair]:
    algo = cfg.algorithm
    if algo.data_path:
        return load_pairs(algo.data_path, algo.data_split, algo.data_limit)
    if cfg.env.name != "arith":
        raise ConfigError(f"algorithm.data_path is needed for {algo.name} with env.name={cfg.env.name} "
                          "(only arith generates its own preference pairs)")
    return arith_pairs(cfg.env, cfg.dataset, algo.data_split, algo.data_limit or cfg.env.num_problems, cfg.seed)


# What each data source of the algorithm registry reads (Algorithm.data).
DATA_SOURCES: dict[str, Callable] = {"prompts": _prompts, "examples": _examples, "pairs": _pairs}


def data_issues(items: list, cfg: Config, tokenizer=None) -> list[RowIssue]:
    """Row-by-row problems of SFT examples or preference pairs (none for env prompts)."""
    if items and isinstance(items[0], Pair):
        issues = validate_pairs(items, tokenizer, cfg.model.max_model_len if tokenizer else None,
                                getattr(cfg.algorithm, "step_delimiter", "\n"))
        if getattr(cfg.algorithm, "step_scores", None) == "mc":
            issues += [RowIssue(p.source, "answer", "missing: algorithm.step_scores=mc scores steps against the "
                                "ground truth") for p in items if not p.answer]
        return issues
    if items and isinstance(items[0], Example):
        return validate_examples(items, tokenizer, cfg.model.max_model_len if tokenizer else None)
    return []


def checked_items(items: list, cfg: Config, tokenizer=None) -> tuple[list, int]:
    """``items`` without invalid rows and how many were dropped; with invalid rows and no
    ``algorithm.skip_invalid``, a DataError listing the first of them."""
    issues = data_issues(items, cfg, tokenizer)
    if not issues:
        return items, 0
    if not getattr(cfg.algorithm, "skip_invalid", False):
        raise DataError(f"{len({i.source for i in issues})} invalid rows in the training data, the first: {issues[0]} "
                        "(`raylign data validate CONFIG` lists them all; --skip-invalid drops them)")
    bad = {i.source for i in issues}
    return [x for x in items if x.source not in bad], len(bad)


def training_problems(env, cfg: Config) -> tuple[list, list[Problem]]:
    """(training items of the algorithm's data source, held-out eval problems), each checked against what
    the run needs of it."""
    from raylign.algorithms.registry import ALGORITHMS  # imports torch (no Ray): after the config checks

    per_step = cfg.algorithm.items_per_step
    source = ALGORITHMS[cfg.algorithm.name].data
    key = "prompts_per_step" if source == "prompts" else "batch_size"
    train = require_problems(DATA_SOURCES[source](env, cfg), cfg, "train", per_step,
                             f"one training step (algorithm.{key}={per_step})")
    evals: list[Problem] = []
    if cfg.train.eval_before or cfg.train.eval_after:
        evals = require_problems(env.problems(cfg.train.eval_split), cfg, cfg.train.eval_split, 1,
                                 "the held-out eval (train.eval_before / train.eval_after)")[:cfg.train.eval_limit]
    return train, evals


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def check_storage(cfg: Config) -> None:
    """``train.storage`` opens, and a probe file can be written and removed there (credentials, bucket)."""
    if not cfg.train.storage:
        return
    probe = storage.join(cfg.train.storage, f".raylign-probe-{os.getpid()}")
    try:
        storage.write_text(probe, "probe")
        storage.delete_file(probe)
    except Exception as e:  # pyarrow's errors differ by scheme: any of them means the run could not checkpoint
        raise ConfigError(f"train.storage={cfg.train.storage!r} cannot be written: {str(e).splitlines()[0]}") from None


def resume_point(cfg: Config) -> tuple[str | None, dict]:
    """The checkpoint a ``--resume`` continues from (verified) and its driver state; (None, {}) to start fresh."""
    if cfg.train.resume != "auto":
        return None, {}
    ckpt = newest_checkpoint(storage.join(cfg.storage_root(), "checkpoints"))
    if ckpt is None:
        return None, {}
    verify_checkpoint(ckpt, expect={"world_size": cfg.trainer.num_workers, "model": cfg.model.name})
    state = read_driver_state(ckpt)
    saved, now = state.get("config", {}), cfg.model_dump(mode="json")
    for dotted in RESUME_FIXED:
        if saved and _get(saved, dotted) != _get(now, dotted):
            raise ConfigError(f"--resume from {ckpt}: it was written with {dotted}={_get(saved, dotted)!r}, this run "
                              f"has {dotted}={_get(now, dotted)!r}; put it back or use a new output_dir")
    if state["step"] > cfg.total_steps:
        raise ConfigError(f"--resume from {ckpt}: it is at step {state['step']}, past train.steps={cfg.train.steps}"
                          + (f" + train.sft_warmup_steps={cfg.train.sft_warmup_steps}" if cfg.train.sft_warmup_steps else ""))
    return ckpt, state


@dataclass
class TrainingPlan:
    """What `raylign train` checked before starting anything: the config with absolute paths, the problems,
    and the checkpoint it continues from (None: a fresh run) with its driver state."""

    cfg: Config
    train_problems: list  # the algorithm's data source: Problems, Examples or Pairs
    eval_problems: list[Problem]
    ckpt: str | None  # a storage location (raylign.storage)
    state: dict
    skipped_rows: int = 0  # invalid examples or pairs dropped (algorithm.skip_invalid)
    warmup: list = field(default_factory=list)  # SFT warm-up examples (train.sft_warmup_steps)


def check_env_models(cfg: Config) -> None:
    """The dspy env's action space and the judge template, checked before any actor starts."""
    if cfg.env.name == "dspy":
        from raylign.envs.dspy.actions import SIGNATURES, action_prompt

        try:
            action_prompt("check", cfg.dspy.modules, cfg.dspy.signatures or SIGNATURES)
        except ValueError as e:
            raise ConfigError(f"dspy.modules / dspy.signatures: {e}") from e
    template = cfg.reward.judge.template
    if template is not None:
        from raylign.envs.judge import template_fields

        try:
            unknown = set(template_fields(template)) - {"question", "reference", "response"}
        except ValueError as e:
            raise ConfigError(f"reward.judge.template: {e}") from e
        if unknown:
            raise ConfigError(f"reward.judge.template: unknown field(s) {sorted(unknown)}; it may use "
                              "{question}, {reference} and {response}")


def plan_training(cfg: Config) -> TrainingPlan:
    """Every check that needs neither a model nor Ray; light imports only, so bad input fails in about a second."""
    cfg = cfg.absolutized()  # no relative path may reach an actor: their working directories differ
    check_env_models(cfg)
    train, evals = training_problems(make_env(cfg.env, cfg.dataset, cfg.rag, cfg=cfg), cfg)
    train, skipped = checked_items(train, cfg)  # the token-length checks follow once the tokenizer is loaded
    warmup = warmup_examples(cfg)
    check_storage(cfg)
    ckpt, state = resume_point(cfg)
    return TrainingPlan(cfg, train, evals, ckpt, state, skipped, warmup)


def plan_eval(cfg: Config) -> tuple[Config, list[Problem]]:
    """`raylign eval`'s checks before anything starts: absolute paths, and at least one problem to pose."""
    cfg = cfg.absolutized()
    check_env_models(cfg)
    env = make_env(cfg.env, cfg.dataset, cfg.rag, cfg=cfg)
    return cfg, require_problems(env.problems(cfg.dataset.split), cfg, cfg.dataset.split, 1, "an eval")
