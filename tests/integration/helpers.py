"""Shared settings for the training integration tests."""

from pathlib import Path

from raylign.config import load_config

PRESET = Path(__file__).resolve().parents[2] / "configs/grpo_arith.yaml"

TINY = ["env.num_problems=16", "algorithm.prompts_per_step=2", "algorithm.group_size=4",
        "generator.max_new_tokens=8", "generator.kv_cache_gb=0.25", "trainer.lr=1e-3", "trainer.micro_batch_tokens=256",
        "trainer.num_cpus_per_worker=1", "trainer.num_workers=2", "train.eval_limit=4", "seed=3"]


def tiny_config(tiny_model, tmp_path, *extra):
    return load_config(PRESET, [f"model.name={tiny_model}", *TINY,
                                                    f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra], environ={})


def vowel_reward(problem, completion):
    """Random text from the tiny model varies in its share of vowels: a reward with signal, unlike arith's."""
    from raylign.types import Score

    share = sum(ch in "aeiou" for ch in completion) / max(1, len(completion))
    return Score(reward=share, correct=share > 0.3, prediction=None, format_ok=True)
