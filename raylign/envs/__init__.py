"""Environments: a task's problems and the reward for a completion (see ``base.Env``).

Plain Python only: this package never imports ray, vllm, deepspeed, raylign.actors or
raylign.orchestrator, so reward code runs (and is unit-tested) anywhere.
"""

from __future__ import annotations

from collections.abc import Callable

from raylign.config import DatasetConfig, EnvConfig, RagConfig
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


EnvFactory = Callable[[EnvConfig, DatasetConfig, RagConfig], Env]
ENVS: dict[str, EnvFactory] = {
    "arith": lambda env, data, rag: ArithEnv(env, data),
    "gsm8k": lambda env, data, rag: Gsm8kEnv(env, data),
    "math": lambda env, data, rag: MathEnv(env, data),
    "rag": _rag_env,
}


def make_env(env_cfg: EnvConfig, dataset_cfg: DatasetConfig, rag_cfg: RagConfig | None = None) -> Env:
    """The env named by ``env.name``, built from plain config (cheap; data loads in ``problems``)."""
    factory = ENVS.get(env_cfg.name)
    if factory is None:
        raise ValueError(f"unknown env.name {env_cfg.name!r}; known: {', '.join(sorted(ENVS))}")
    return factory(env_cfg, dataset_cfg, rag_cfg or RagConfig())


__all__ = ["ENVS", "DataError", "Env", "Problem", "Score", "make_env", "ArithEnv", "Gsm8kEnv", "MathEnv"]
