"""DeepSpeed ZeRO 0-3 as a trainer backend (``trainer.backend=deepspeed``), inside the same Ray Train workers.

``deepspeed.initialize`` wraps the model with raylign's own AdamW and LambdaLR (the client optimizer and
schedule, so the update and the LR curve equal the torch backends'), joining the process group Ray Train
made (gloo on CPU, nccl on GPU). Engine facts this relies on:
- accumulation: GAS is 1 and the worker marks each micro-batch's boundary itself
  (``set_gradient_accumulation_boundary``, the DeepSpeed form of ``grad_sync``), because raylign's work plan
  sizes micro-batches by tokens, so their count varies per step;
- the loss is pre-scaled like the other backends (DeepSpeed averages gradients over ranks, as FSDP2 does);
- DeepSpeed clips (``gradient_clipping``) and reports the pre-clip norm (``get_global_grad_norm``);
- stage 0 keeps fp32 parameters and the plain client optimizer, with bf16 compute under ``torch.autocast`` as
  the DDP backend does (DeepSpeed's own stage-0 bf16 wrapper keeps no per-parameter fp32 state to read), so
  there the norm is taken and clipped here;
- full fp32 weights and Adam moments go through DeepSpeed's public fragment API
  (``safe_get/set_full_fp32_param``, ``safe_get/set_full_optimizer_state``), collective for every stage, so a
  checkpoint holds the same name-keyed full layout as FSDP2's and loads into any backend.
- the optimizer state is created at start by one step with zero gradients, zero LR and zero weight decay,
  then reset to step 0 (a fresh AdamW state): so reading and loading it never meets a missing state.
ZeRO-3 weight reads gather the parameters ``SYNC_BUCKET_BYTES`` at a time (``GatheredParameters``), never
the whole model at once. DeepSpeed JIT-builds one CPU op on first use (~90 s, cached in
~/.cache/torch_extensions).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

from raylign.actors.value_head import VALUE_HEAD, take_values
from raylign.actors.trainable import GroupsFn, LrLambda, Trainable, adamw, trainable_named
from raylign.config import TrainerConfig
from raylign.trainer_config import zero_buckets

SYNC_BUCKET_BYTES = 256 * 2**20  # ZeRO-3: parameters gathered at once when reading full weights


def deepspeed_config(cfg: TrainerConfig, hidden: int) -> dict:
    """The DeepSpeed JSON for a trainer config and a model of hidden size ``hidden``: raylign's keys, then
    ``trainer.deepspeed.config`` merged over (a bucket size set there wins)."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage, **zero_buckets(ds.zero_stage, hidden)}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.use_gpu}
    own_clip = ds.zero_stage == 0  # plain client optimizer: Trainable.step clips
    out = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0 if own_clip else cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16 and ds.zero_stage > 0},
        "zero_allow_untested_optimizer": True,  # raylign's torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # ... also when offloading on CPU, where all state is on CPU anyway
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.bf16 and ds.zero_stage > 0:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return _merge(out, ds.config)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class DeepSpeedTrainable(Trainable):
    def __init__(self, engine, optimizer, scheduler, cfg: TrainerConfig, group_names: list[list[str]]):
        super().__init__(engine, engine.module, optimizer, scheduler)
        self.stage = cfg.deepspeed.zero_stage
        self.own_clip = self.stage == 0
        self.autocast = self.stage == 0 and cfg.bf16
        self._device_type = "cuda" if cfg.use_gpu else "cpu"
        self.group_names = group_names  # parameter names of each optimizer group, in group order
        self.base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW underneath

    # -- training --------------------------------------------------------------------------------------
    def compute(self):
        return torch.autocast(self._device_type, dtype=torch.bfloat16, enabled=self.autocast)

    @contextmanager
    def grad_sync(self, sync: bool):
        self.model.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def zero_grad(self) -> None:
        self.model.zero_grad()

    def step(self, max_norm: float) -> float:
        self.model.set_gradient_accumulation_boundary(True)
        if self.own_clip:
            norm = float(torch.nn.utils.clip_grad_norm_([p for p in self.inner.parameters() if p.requires_grad],
                                                        max_norm))
        self.model.step()  # steps the client scheduler too
        return norm if self.own_clip else float(self.model.get_global_grad_norm())

    # -- full weights ----------------------------------------------------------------------------------
    def _params(self) -> list[tuple[list[str], nn.Parameter]]:
        """Each distinct parameter once, with every name it has (a tied lm_head shares the embedding's)."""
        seen: dict[int, tuple[list[str], nn.Parameter]] = {}
        for name, param in self.inner.named_parameters(remove_duplicate=False):
            seen.setdefault(id(param), ([], param))[0].append(name)
        return list(seen.values())

    def _buffers(self) -> dict[str, torch.Tensor]:
        """State-dict entries that are not parameters (persistent buffers)."""
        params = {n for names, _ in self._params() for n in names}
        return {k: v for k, v in self.inner.state_dict(keep_vars=True).items() if k not in params}

    def _fragmented(self, param: nn.Parameter) -> bool:
        """Whether DeepSpeed holds this parameter's fp32 master and moments in partitions (ZeRO, trainable)."""
        return not self.own_clip and param.requires_grad and (hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"))

    def _gathered(self, params: list[nn.Parameter], modifier_rank: int | None = None):
        """Context in which the listed parameters hold their full values (ZeRO-3 gathers them; with
        ``modifier_rank`` that rank's writes are partitioned back on exit)."""
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def _buckets(self, items: list[tuple[list[str], nn.Parameter]]):
        bucket, size = [], 0
        for item in items:
            numel = item[1].ds_numel if hasattr(item[1], "ds_numel") else item[1].numel()
            if bucket and size + numel * 4 > SYNC_BUCKET_BYTES:
                yield bucket
                bucket, size = [], 0
            bucket.append(item)
            size += numel * 4
        if bucket:
            yield bucket

    def _full_fp32(self, param: nn.Parameter) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param) if self._fragmented(param) else None

    def gather_params(self, select: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        chosen = [(names, p) for names, p in self._params() if any(select(n) for n in names)]
        out = {}
        for bucket in self._buckets(chosen):
            with self._gathered([p for _, p in bucket]):
                if _rank0():
                    for names, p in bucket:
                        for name in names:
                            if select(name):
                                out[name] = p.detach().to("cpu", copy=True)
        return out

    def gather_state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        frozen = []
        for names, param in self._params():
            full = self._full_fp32(param)  # collective on every rank, in the same order
            if full is None:
                frozen.append((names, param))
            elif _rank0():
                for name in names:
                    out[name] = full.detach().float().cpu().clone()
        for bucket in self._buckets(frozen):  # frozen (LoRA base) or plain fp32 parameters: the module's own
            with self._gathered([p for _, p in bucket]):
                if _rank0():
                    for names, p in bucket:
                        for name in names:
                            out[name] = p.detach().float().cpu().clone()
        if _rank0():
            for name, buf in self._buffers().items():
                out[name] = buf.detach().float().cpu().clone() if buf.is_floating_point() else buf.detach().cpu().clone()
        return out

    def scatter_state(self, state: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        for names, param in self._params():
            shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
            value = _broadcast(state.get(names[0]) if _rank0() else None, shape)
            if self._fragmented(param):
                safe_set_full_fp32_param(param, value)  # the fp32 master (partition)
            with self._gathered([param], modifier_rank=0):
                param.data.copy_(value.to(param.dtype).view_as(param.data))  # the compute copy
        for name, buf in self._buffers().items():
            buf.data.copy_(_broadcast(state.get(name) if _rank0() else None, tuple(buf.shape)).to(buf.dtype))

    # -- optimizer state -------------------------------------------------------------------------------
    def _step_count(self) -> float:
        steps = {float(s["step"]) for s in self.base.state.values() if "step" in s}
        return max(steps) if steps else 0.0

    def _moments(self, param: nn.Parameter, key: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_optimizer_state

        if not self._fragmented(param):
            return self.base.state[param][key]  # plain client optimizer (stage 0, fp32): the param's own state
        return safe_get_full_optimizer_state(param, key)

    def gather_optimizer(self) -> dict:
        step = self._step_count()
        state = {}
        for names, param in self._params():
            if not param.requires_grad:
                continue
            entry = {key: self._moments(param, key).detach().float().cpu().clone() for key in ("exp_avg", "exp_avg_sq")}
            if _rank0():
                state[names[0]] = {"step": torch.tensor(step), **entry}
        if not _rank0():
            return {}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                  for g, names in zip(self.base.param_groups, self.group_names, strict=True)]
        return {"state": state, "param_groups": groups}

    def scatter_optimizer(self, state: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        meta = [{"groups": state.get("param_groups"), "step": _saved_step(state)} if _rank0() else None]
        dist.broadcast_object_list(meta, src=0)
        groups, step = meta[0]["groups"], meta[0]["step"]
        for names, param in self._params():
            if not param.requires_grad:
                continue
            shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
            saved = state.get("state", {}).get(names[0], {}) if _rank0() else {}
            for key in ("exp_avg", "exp_avg_sq"):
                # a checkpoint from before any step (FSDP2 writes no state then) means fresh zeros
                value = _broadcast(saved.get(key, torch.zeros(shape)) if _rank0() else None, shape)
                if not self._fragmented(param):
                    self.base.state[param][key].copy_(value)
                else:
                    safe_set_full_optimizer_state(param, value, key)
        for s in self.base.state.values():
            if "step" in s:
                s["step"].fill_(step)
        if groups is not None:
            for group, saved in zip(self.base.param_groups, groups, strict=True):
                group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k != "params"})


def _saved_step(state: dict) -> float:
    steps = {float(s["step"]) for s in state.get("state", {}).values() if "step" in s}
    return max(steps) if steps else 0.0


def _broadcast(value: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """Rank 0's fp32 tensor on every rank."""
    out = value.detach().float().reshape(shape).contiguous() if value is not None else torch.empty(shape)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(out, src=0)
    return out


def wrap(model: nn.Module, cfg: TrainerConfig, groups_fn: GroupsFn, lr_lambda: LrLambda) -> Trainable:
    import deepspeed

    named = trainable_named(model)
    groups = [g for g in groups_fn(named) if g["params"]]
    names_of = {id(p): n for n, p in named}
    group_names = [[names_of[id(p)] for p in g["params"]] for g in groups]
    if cfg.use_gpu and cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, adamw_mode=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    else:
        optimizer, scheduler = adamw(groups, cfg, lr_lambda)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, _hidden_size(model)),
        dist_init_required=False)
    trainable = DeepSpeedTrainable(engine, ds_optimizer, ds_scheduler or scheduler, cfg, group_names)
    _create_optimizer_state(trainable)
    return trainable


def _hidden_size(model: nn.Module) -> int:
    config = model.config  # a peft wrapper forwards .config to the base model's
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd"))


def _create_optimizer_state(t: DeepSpeedTrainable) -> None:
    """One step with zero gradients at zero LR and weight decay, then back to a fresh state (step 0, zero
    moments, the schedule where it was): AdamW's state exists from here on, identical to a new one's."""
    saved_groups = [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in t.base.param_groups]
    saved_schedule = t.scheduler.state_dict()
    for g in t.base.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    device = next(t.inner.parameters()).device
    t.model.train()
    t.model.set_gradient_accumulation_boundary(True)
    out = t.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False).logits.sum()
    if any(VALUE_HEAD in n for n, _ in t.inner.named_parameters()):
        out = out + take_values(t.inner).sum()
    t.model.backward(out * 0.0)
    t.model.step()
    t.scheduler.load_state_dict(saved_schedule)
    for g, saved in zip(t.base.param_groups, saved_groups, strict=True):
        g.update(saved)
    for s in t.base.state.values():
        for key, value in s.items():
            if isinstance(value, torch.Tensor):
                value.zero_()
