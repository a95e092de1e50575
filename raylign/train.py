"""One code path for training, three ways in:

    raylign train CONFIG [key=value ...] [--resume]
    python -m raylign.train CONFIG [key=value ...] [--resume]      (also what `ray job submit` runs)
    import raylign; raylign.train("configs/grpo_arith.yaml", ["train.steps=10"])   # or a Config object
"""

from __future__ import annotations

import sys
import types

from raylign.config import Config, load_config


def train(config: Config | str, overrides: list[str] | None = None, resume: bool = False, reward_fn=None,
          on_phase=None) -> dict:
    """Run training from a Config or a preset path (+ dotted overrides); returns the run summary.

    ``reward_fn(problem, completion) -> Score`` replaces the env's reward (Python API only): it is pickled by
    value into the reward actors, so a closure or a function defined in your script works.
    ``on_phase(phase, step, cluster)`` is called as each timed phase starts ("generate", "train", "sync", ...):
    tests and ``benchmarks/chaos.py`` use it to kill actors at chosen points.
    """
    from raylign.orchestrator.preflight import plan_training

    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    if resume:
        cfg.train.resume = "auto"
    plan = plan_training(cfg)  # bad data and checkpoints fail here, before torch, Ray or vLLM are imported
    from raylign.orchestrator.train_loop import train as run

    return run(plan, reward_fn=reward_fn, on_phase=on_phase)


class _CallableModule(types.ModuleType):
    """Lets `raylign.train(...)` work whether `raylign.train` resolves to this module or the function."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":  # `python -m raylign.train ...` is `raylign train ...` (what `ray job submit` runs)
    from raylign.cli import main  # only when run as a script: the library never imports the CLI

    sys.exit(main(["train", *sys.argv[1:]]))
