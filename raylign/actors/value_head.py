"""The PPO critic's scalar head, read off a causal LM's final hidden states.

``attach_value_head`` adds ``raylign_value_head`` (Linear(hidden, 1), zero-initialised so V starts at 0) to an
HF model *before* it is wrapped by a train backend, and hooks the decoder's final norm so every forward also
computes V for every position. Computing it inside the model's own forward matters: FSDP2 all-gathers the
root's parameters (where the head lives) only during that forward, and DDP only tracks parameters used there.
The same head serves both critic layouts: on the policy backbone (``critic: value_head``) or on a second copy
of the model (``critic: separate``). Synced weights and HF exports leave the head out; checkpoints keep it.
"""

from __future__ import annotations

import torch
from torch import nn

VALUE_HEAD = "raylign_value_head"
_STASH = "_raylign_values_B_L"


def attach_value_head(model: nn.Module) -> None:
    norm = getattr(model.get_decoder(), "norm", None)
    if not isinstance(norm, nn.Module):
        raise ValueError(f"value head: {type(model).__name__} has no final decoder norm to read hidden states from")
    head = nn.Linear(model.config.hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.add_module(VALUE_HEAD, head)

    def stash(module, args, hidden_B_L_H):
        setattr(model, _STASH, getattr(model, VALUE_HEAD)(hidden_B_L_H).squeeze(-1))

    norm.register_forward_hook(stash)


def take_values(model: nn.Module) -> torch.Tensor:
    """V for every input position (B, L) from the model's last forward; clears it so no graph is kept."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the HF model holds it
    values_B_L = base.__dict__.pop(_STASH, None)
    if values_B_L is None:
        raise RuntimeError("no value-head output: the model has no value head or was not run")
    return values_B_L


def drop_value_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The policy's weights for generators and HF exports: without the critic's head."""
    return {k: v for k, v in state.items() if VALUE_HEAD not in k.split(".")}
