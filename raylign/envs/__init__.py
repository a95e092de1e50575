"""Environments: a task's problems and the reward for a completion (see ``base.Env``).

Plain Python only: this package never imports ray, vllm, deepspeed, raylign.actors or
raylign.orchestrator, so reward code runs (and is unit-tested) anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

from raylign.config import Config, DatasetConfig, EnvConfig, RagConfig
from raylign.envs.arith import ArithEnv
from raylign.envs.base import Env
from raylign.types import Problem, Score
from raylign.envs.data import DataError
from raylign.envs.gsm8k import Gsm8kEnv
from raylign.envs.math_competition import MathEnv

def _rag_env(env_cfg: EnvConfig, dataset_cfg: DatasetConfig, rag_cfg: RagConfig) -> Env:
    # Imported here: the document store pulls in chromadb and bm25s, which math-only runs never need.
    from raylign.config import Config
    from raylign.envs.rag.env import RagEnv
    from raylign.envs.rag.store import qa_records

    cfg = Config(env=env_cfg, dataset=dataset_cfg, rag=rag_cfg)
    return RagEnv(lambda split: qa_records(cfg, split), rag_cfg)


def _dspy_env(cfg: Config, models: EnvModels) -> Env:
    # Imported here: dspy pulls in litellm, which the other envs never need.
    from raylign.envs.dspy.env import DspyEnv

    return DspyEnv(cfg.env, cfg.dataset, cfg.dspy, cfg.reward.judge, models.get("task"), models.get("judge"))


# Models an env calls while scoring, by role ("task": the AutoDSPy task model, "judge"): each a function from a
# batch of chat conversations, a temperature and a token cap to one reply per conversation. Reward actors
# supply them (backed by generator actors); the driver builds envs without them, for their problems.
EnvModels = dict[str, Callable[[list[list[dict[str, str]]], float, int], list[str]]]
EnvFactory = Callable[[Config, EnvModels], Env]
ENVS: dict[str, EnvFactory] = {
    "arith": lambda cfg, models: ArithEnv(cfg.env, cfg.dataset),
    "gsm8k": lambda cfg, models: Gsm8kEnv(cfg.env, cfg.dataset),
    "math": lambda cfg, models: MathEnv(cfg.env, cfg.dataset),
    "rag": lambda cfg, models: _rag_env(cfg.env, cfg.dataset, cfg.rag),
    "dspy": _dspy_env,
}


def make_env(env_cfg: EnvConfig, dataset_cfg: DatasetConfig, rag_cfg: RagConfig | None = None,
             cfg: Config | None = None, models: EnvModels | None = None) -> Env:
    """The env named by ``env.name``, built from plain config (cheap; data loads in ``problems``).

    ``cfg`` gives the sections an env may read beyond these (``dspy``, ``reward.judge``); ``models`` the
    models it calls while scoring.
    """
    factory = ENVS.get(env_cfg.name)
    if factory is None:
        raise ValueError(f"unknown env.name {env_cfg.name!r}; known: {', '.join(sorted(ENVS))}")
    base = cfg or Config()
    full = base.model_copy(update={"env": env_cfg, "dataset": dataset_cfg, "rag": rag_cfg or base.rag})
    return factory(full, models or {})


__all__ = ["ENVS", "DataError", "Env", "EnvModels", "Problem", "Score", "make_env", "ArithEnv", "Gsm8kEnv", "MathEnv"]
