"""Shared settings for the training integration tests."""

import os
import subprocess
import sys
from pathlib import Path

from raylign.config import load_config

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs/grpo_arith.yaml"

TINY = ["env.num_problems=16", "algorithm.prompts_per_step=2", "algorithm.group_size=4",
        "generator.max_new_tokens=8", "generator.kv_cache_gb=0.25", "trainer.lr=1e-3", "trainer.micro_batch_tokens=256",
        "trainer.num_cpus_per_worker=1", "trainer.num_workers=2", "train.eval_limit=4", "seed=3"]

# `raylign` subprocesses start their own local Ray cluster: never the test session's.
CLI_ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
# The GRPO CLI runs (test_cli_runs.py, test_train_runs.py). Relative on purpose: resolved against the
# subprocess's working directory, never the trainer workers'. transformers generate: deterministic on CPU.
CLI_GRPO = ["model.name=tiny-random-llama", *TINY, "ray.num_cpus=6", "tracking.uri=sqlite:///mlflow.db",
            "train.checkpoint_every=1", "generator.backend=hf", "train.steps=3"]


def raylign_cli(cwd: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """`python -m raylign ARGS` in cwd; asserts it exited 0."""
    proc = subprocess.run([sys.executable, "-m", "raylign", *args], cwd=cwd, env=CLI_ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tiny_config(tiny_model, tmp_path, *extra):
    return load_config(PRESET, [f"model.name={tiny_model}", *TINY,
                                                    f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra], environ={})


def vowel_reward(problem, completion):
    """Random text from the tiny model varies in its share of vowels: a reward with signal, unlike arith's."""
    from raylign.types import Score

    share = sum(ch in "aeiou" for ch in completion) / max(1, len(completion))
    return Score(reward=share, correct=share > 0.3, prediction=None, format_ok=True)
