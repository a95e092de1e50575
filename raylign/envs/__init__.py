"""Environments: a task's problems and the reward for a completion (see ``base.Env``).

Plain Python only: this package never imports ray, vllm, deepspeed, raylign.actors or
raylign.orchestrator, so reward code runs (and is unit-tested) anywhere.
"""

from __future__ import annotations

from raylign.config import DatasetConfig, EnvConfig
from raylign.envs.arith import ArithEnv
from raylign.envs.base import Env, Problem, Score
from raylign.envs.data import DataError
from raylign.envs.gsm8k import Gsm8kEnv
from raylign.envs.math_competition import MathEnv

ENVS: dict[str, type] = {"arith": ArithEnv, "gsm8k": Gsm8kEnv, "math": MathEnv}


def make_env(env_cfg: EnvConfig, dataset_cfg: DatasetConfig) -> Env:
    """The env named by ``env.name``, built from plain config (cheap; data loads in ``problems``)."""
    cls = ENVS.get(env_cfg.name)
    if cls is None:
        raise ValueError(f"unknown env.name {env_cfg.name!r}; known: {', '.join(sorted(ENVS))}")
    return cls(env_cfg, dataset_cfg)


__all__ = ["ENVS", "DataError", "Env", "Problem", "Score", "make_env", "ArithEnv", "Gsm8kEnv", "MathEnv"]
