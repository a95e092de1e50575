"""Data-parallel backends of the trainer workers, picked by ``trainer.backend`` from TRAIN_BACKENDS.

A backend turns the fp32 HF model into a :class:`Wrapped`: the module to call, how bf16 compute is done,
and how to skip the gradient all-reduce on accumulation micro-batches. Mixed precision: FSDP2 uses
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (bf16 all-gathers over gloo work, and the
compute matches a bf16 checkpoint, i.e. what vLLM runs); DDP has no public param-dtype policy, so it
runs under ``torch.autocast(bf16)`` (norms and softmax stay fp32, so its numbers differ slightly).
A DeepSpeed backend would add a wrap function here plus its own backward/step (engine.backward/step).

Full state dicts go through ``torch.distributed.checkpoint.state_dict`` for every backend: it strips the
DDP ``module.`` prefix, gathers FSDP2 shards, and loads a full dict broadcast from rank 0 into any layout.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from raylign.config import TrainerConfig

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


@dataclass
class Wrapped:
    model: nn.Module  # call this for forward/backward; its parameters go to the optimizer
    inner: nn.Module  # the HF model underneath (config, parameter names)
    compute: Callable[[], AbstractContextManager]  # around forwards (mixed precision)
    grad_sync: Callable[[bool], AbstractContextManager]  # around a backward; False = accumulate locally


def _device_type(cfg: TrainerConfig) -> str:
    return "cuda" if cfg.use_gpu else "cpu"


def _reshard_after_forward() -> bool:
    # One rank holds every parameter anyway: keeping the bf16 copy from forward to backward costs ~2 bytes per
    # parameter and saves re-casting the fp32 weights for every micro-batch's backward.
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_world_size() > 1


def wrap_fsdp2(model: nn.Module, cfg: TrainerConfig) -> Wrapped:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.bf16 \
        else MixedPrecisionPolicy()
    # Shard each transformer block on its own (the HF "no split" classes), then the root: the root group
    # holds embeddings, final norm and the lm_head, so a tied embedding stays one parameter.
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    reshard = _reshard_after_forward()
    for module in list(model.modules()):
        if type(module).__name__ in block_names:
            fully_shard(module, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=policy)

    @contextmanager
    def grad_sync(sync: bool):
        model.set_requires_gradient_sync(sync)
        yield

    return Wrapped(model=model, inner=model, compute=nullcontext, grad_sync=grad_sync)


def wrap_ddp(model: nn.Module, cfg: TrainerConfig) -> Wrapped:
    from torch.nn.parallel import DistributedDataParallel

    # Buffers (rotary inv_freq) are identical constants on every rank: syncing them each forward would
    # only add a collective. (Weights and buffers are still broadcast from rank 0 once, at init.)
    ddp = DistributedDataParallel(model, forward_sync_buffers=False)
    device_type = _device_type(cfg)

    def compute():
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16)

    def grad_sync(sync: bool):
        return nullcontext() if sync else ddp.no_sync()

    return Wrapped(model=ddp, inner=model, compute=compute, grad_sync=grad_sync)


TRAIN_BACKENDS: dict[str, Callable[[nn.Module, TrainerConfig], Wrapped]] = {
    "fsdp2": wrap_fsdp2,
    "ddp": wrap_ddp,
}


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage (a tied lm_head under DDP); give each name its own copy.
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def gather_model_state(wrapped: Wrapped) -> dict[str, torch.Tensor]:
    """Full fp32 state dict with HF names on rank 0 ({} elsewhere). Collective: every rank must call it."""
    state = get_model_state_dict(wrapped.model, options=_GATHER)
    return _unshare({k: v.detach().contiguous() for k, v in state.items()})


def scatter_model_state(wrapped: Wrapped, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict given on rank 0 (others pass {}) into every rank's shard. Collective."""
    _reshard(wrapped.model)
    set_model_state_dict(wrapped.model, state, options=_SCATTER)


def _reshard(model: nn.Module) -> None:
    # FSDP2 keeps the root's parameters unsharded after a no-grad forward (a logprobs call); loading a state
    # dict then meets plain tensors where it expects DTensor shards. Resharding first makes every layout
    # the sharded one. No-op for DDP.
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gather_optimizer_state(wrapped: Wrapped, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter names on rank 0 ({} elsewhere). Collective."""
    return get_optimizer_state_dict(wrapped.model, optimizer, options=_GATHER)


def scatter_optimizer_state(wrapped: Wrapped, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(wrapped.model, optimizer, state, options=_SCATTER)
