"""What the trainer workers write and read: synced weights, HF exports and the trainer's checkpoint part.

Every function is collective (all ranks call it; gathers and broadcasts run over the process group) and
only rank 0 touches the files, so a multi-node group needs no shared filesystem for writing.
- ``save_weights``: one bf16 safetensors file, HF names, without a tied lm_head (the generators re-tie it),
  written to a temp file in the same folder and ``os.replace``d, so a reader never sees half a file.
- ``export_hf``: a plain HF folder (config, bf16 ``model.safetensors`` as save_pretrained writes it, i.e.
  without a tied lm_head, tokenizer and generation files copied from the source model).
- trainer checkpoint: fp32 master weights (bf16 would break exact resume), the full optimizer state keyed
  by parameter name, scheduler state, step count and every rank's torch/python/numpy RNG state. Full (not
  sharded) state loads into a fresh group of any size; RNG states are per rank and need the same size.
  A separate PPO critic adds its own weights and optimizer state (trainer_critic*); a value head on the
  policy is part of the policy's state.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from raylign.actors.value_head import drop_value_head
from raylign.actors.train_backends import (
    Wrapped,
    gather_model_state,
    gather_optimizer_state,
    scatter_model_state,
    scatter_optimizer_state,
)

if TYPE_CHECKING:
    from raylign.actors.trainer_worker import TrainerWorker

MODEL_FILE = "trainer_model.safetensors"
CRITIC_MODEL_FILE = "trainer_critic.safetensors"  # PPO with critic: separate only
CRITIC_OPTIMIZER_FILE = "trainer_critic_optimizer.pt"
OPTIMIZER_FILE = "trainer_optimizer.pt"
STATE_FILE = "trainer_state.pt"
# Source-model files an HF export must not copy: weights (rewritten) and raylign's build marker.
_NOT_EXPORTED = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "raylign_model.json")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(wrapped: Wrapped, path: str, rank: int) -> None:
    state = drop_value_head(gather_model_state(wrapped))
    if rank == 0:
        if getattr(wrapped.inner.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # the embedding again; both generator backends re-tie it
        _atomic_save({k: v.to(torch.bfloat16) for k, v in state.items()}, Path(path))


def export_hf(wrapped: Wrapped, model_path: str, out_dir: str, rank: int) -> None:
    state = drop_value_head(gather_model_state(wrapped))
    if rank != 0:
        return
    out, src = Path(out_dir), Path(model_path)
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not any(item.match(p) for p in _NOT_EXPORTED):
            shutil.copy2(item, out / item.name)
    config = json.loads((src / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if getattr(wrapped.inner.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    _atomic_save({k: v.to(torch.bfloat16) for k, v in state.items()}, out / "model.safetensors")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_trainer_checkpoint(worker: TrainerWorker, out_dir: str) -> None:
    model_state = gather_model_state(worker.policy)
    optim_state = gather_optimizer_state(worker.policy, worker.optimizer)
    separate = worker.critic is not None and worker.critic is not worker.policy
    if separate:
        critic_state = gather_model_state(worker.critic)
        critic_optim = gather_optimizer_state(worker.critic, worker.critic_optimizer)
    rngs = [None] * worker.world if worker.rank == 0 else None
    dist.gather_object(_rng_state(), rngs, dst=0)
    if worker.rank != 0:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_save(model_state, out / MODEL_FILE)
    torch.save(optim_state, out / OPTIMIZER_FILE)
    state = {"scheduler": worker.scheduler.state_dict(), "steps": worker.steps, "rng": rngs}
    if separate:
        _atomic_save(critic_state, out / CRITIC_MODEL_FILE)
        torch.save(critic_optim, out / CRITIC_OPTIMIZER_FILE)
        state["critic_scheduler"] = worker.critic_scheduler.state_dict()
    torch.save(state, out / STATE_FILE)


def load_trainer_checkpoint(worker: TrainerWorker, in_dir: str) -> None:
    src = Path(in_dir)
    # Rank 0 reads and checks; the others learn the outcome first, so a missing file fails every rank
    # before anyone enters the broadcasts below.
    payload: list = [None]
    if worker.rank == 0:
        missing = [f for f in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE) if not (src / f).is_file()]
        payload = [f"trainer checkpoint {src}: missing {', '.join(missing)}" if missing
                   else torch.load(src / STATE_FILE, weights_only=False)]
    dist.broadcast_object_list(payload, src=0)
    state = payload[0]
    if isinstance(state, str):
        raise FileNotFoundError(state)
    if len(state["rng"]) != worker.world:
        raise ValueError(f"trainer checkpoint {src} holds RNG states of {len(state['rng'])} workers, "
                         f"this group has {worker.world}")
    model_state = load_file(src / MODEL_FILE) if worker.rank == 0 else {}
    scatter_model_state(worker.policy, model_state)
    optim_state = torch.load(src / OPTIMIZER_FILE, weights_only=False) if worker.rank == 0 else {}
    scatter_optimizer_state(worker.policy, worker.optimizer, optim_state)
    if "critic_scheduler" in state:
        scatter_model_state(worker.critic, load_file(src / CRITIC_MODEL_FILE) if worker.rank == 0 else {})
        critic_optim = torch.load(src / CRITIC_OPTIMIZER_FILE, weights_only=False) if worker.rank == 0 else {}
        scatter_optimizer_state(worker.critic, worker.critic_optimizer, critic_optim)
        worker.critic_scheduler.load_state_dict(state["critic_scheduler"])
    worker.scheduler.load_state_dict(state["scheduler"])
    worker.steps = state["steps"]
    _set_rng_state(state["rng"][worker.rank])
