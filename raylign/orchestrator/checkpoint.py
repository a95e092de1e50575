"""Checkpoints: a folder per step, written under a temp name and renamed into place, so a crash never
leaves a half checkpoint that ``resume`` could pick up. The trainer writes weights, optimizer, scheduler
and per-rank RNG states; the driver adds ``driver_state.json`` (step, policy version, data position,
algorithm state, MLflow run id)."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

DRIVER_STATE = "driver_state.json"


def checkpoint_dirs(root: Path) -> list[Path]:
    done = [p for p in root.glob("step-*") if (p / DRIVER_STATE).exists()] if root.exists() else []
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def save_checkpoint(root: Path, step: int, write_trainer: Callable[[str], None], driver_state: dict, keep: int) -> Path:
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_trainer(str(tmp))
    (tmp / DRIVER_STATE).write_text(json.dumps({**driver_state, "step": step}, indent=2))  # last: marks complete
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_driver_state(ckpt: Path) -> dict:
    return json.loads((ckpt / DRIVER_STATE).read_text())


class PromptStream:
    """Training prompts in a seeded random order, epoch after epoch; its position is checkpointed."""

    def __init__(self, problems: list, batch_size: int, seed: int):
        self.problems, self.batch_size, self.seed = problems, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self) -> list:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled()
            batch.append(self.problems[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled()
