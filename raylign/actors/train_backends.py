"""Data-parallel backends of the trainer workers, picked by ``trainer.backend`` from TRAIN_BACKENDS.

A backend turns the fp32 HF model (optionally with LoRA adapters and a value head) into a :class:`Trainable`:
the module to call, its optimizer and LR schedule, and every operation whose form depends on the backend:
mixed precision, skipping the gradient reduction on accumulation micro-batches, backward, the optimizer
step (clip, step, schedule), and the collectives that read and write the full model and optimizer state.
The worker calls only these, so FSDP2, DDP and DeepSpeed ZeRO serve the same commands.

Mixed precision: FSDP2 uses ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (bf16 all-gathers
over gloo work, and the compute matches a bf16 checkpoint, i.e. what vLLM runs); DDP has no public
param-dtype policy, so it runs under ``torch.autocast(bf16)`` (norms and softmax stay fp32, so its numbers
differ slightly). DeepSpeed (deepspeed_backend.py) keeps bf16 parameters and fp32 master weights itself.

Full state dicts of the torch backends go through ``torch.distributed.checkpoint.state_dict`` (trainable.py):
it strips the DDP ``module.`` prefix, gathers FSDP2 shards, and loads a full dict broadcast from rank 0 into
any layout. Every backend writes the same full, name-keyed layout, so a checkpoint of one loads into another.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from raylign.actors.deepspeed_backend import wrap as wrap_deepspeed
from raylign.actors.trainable import GroupsFn, LrLambda, Trainable, adamw, trainable_named
from raylign.config import TrainerConfig

class _Ddp(Trainable):
    def __init__(self, ddp, inner, optimizer, scheduler, cfg: TrainerConfig):
        super().__init__(ddp, inner, optimizer, scheduler)
        self._device_type = "cuda" if cfg.use_gpu else "cpu"
        self._bf16 = cfg.bf16

    def compute(self):
        return torch.autocast(self._device_type, dtype=torch.bfloat16, enabled=self._bf16)

    def grad_sync(self, sync: bool):
        return nullcontext() if sync else self.model.no_sync()


class _Fsdp2(Trainable):
    @contextmanager
    def grad_sync(self, sync: bool):
        self.model.set_requires_gradient_sync(sync)
        yield


def _reshard_after_forward() -> bool:
    # One rank holds every parameter anyway: keeping the bf16 copy from forward to backward costs ~2 bytes per
    # parameter and saves re-casting the fp32 weights for every micro-batch's backward.
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_world_size() > 1


def wrap_fsdp2(model: nn.Module, cfg: TrainerConfig, groups: GroupsFn, lr_lambda: LrLambda) -> Trainable:
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
    return _Fsdp2(model, model, *adamw(groups(trainable_named(model)), cfg, lr_lambda))


def wrap_ddp(model: nn.Module, cfg: TrainerConfig, groups: GroupsFn, lr_lambda: LrLambda) -> Trainable:
    from torch.nn.parallel import DistributedDataParallel

    # Buffers (rotary inv_freq) are identical constants on every rank: syncing them each forward would
    # only add a collective. (Weights and buffers are still broadcast from rank 0 once, at init.)
    ddp = DistributedDataParallel(model, forward_sync_buffers=False)
    return _Ddp(ddp, model, *adamw(groups(trainable_named(model)), cfg, lr_lambda), cfg)


TRAIN_BACKENDS: dict[str, Callable[[nn.Module, TrainerConfig, GroupsFn, LrLambda], Trainable]] = {
    "fsdp2": wrap_fsdp2,
    "ddp": wrap_ddp,
    "deepspeed": wrap_deepspeed,
}


