"""The per-worker loop of the policy trainer; runs inside each Ray Train (TorchTrainer) worker.

Ray Train starts the workers and the process group once; ``train_loop_per_worker`` then builds the model
and serves commands from this rank's queue until ``Stop``, so no command pays the 20-30 s start again.
Every rank answers every command on the shared reply queue (rank 0 carries the result of single-result
commands), and a failing command answers with its traceback instead of killing the loop.
Commands are checked on every rank before the first collective, so a bad command (unknown loss, bad
batch) fails the same way everywhere and leaves no rank waiting in an all-gather.

Weights: fp32 master copy, fused AdamW, LambdaLR (trainer_math.lr_multiplier); bf16 compute, backward, the
optimizer step and state reads per the backend (train_backends: FSDP2, DDP, DeepSpeed ZeRO). With
``trainer.lora`` the policy carries peft adapters (lora.py) and only they train. The optional reference model
(``ref_model: trainer``) is a frozen bf16 HF model, not sharded, on every rank: reference log-probs need no
collectives (``ref_model: actor`` keeps it in a ReferenceActor instead); with LoRA the reference is the
policy with its adapter disabled, run in lockstep like the policy. Forwards use trainer_math's packed rows: the samples of one prompt share a row.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import ExitStack, nullcontext
import random
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from raylign.actors import trainer_checkpoint as ckpt
from raylign.actors.lora import apply_lora, load_4bit
from raylign.actors.train_backends import TRAIN_BACKENDS
from raylign.actors.trainable import Trainable
from raylign.actors.trainer_commands import (
    READY,
    ExportHF,
    LoadCheckpoint,
    Logprobs,
    Reply,
    SaveCheckpoint,
    SaveWeights,
    SendWeights,
    Stop,
    TrainStep,
    Values,
)
from raylign.actors.trainer_math import (
    check_batch,
    loss_units,
    lr_multiplier,
    model_inputs,
    packing_row_tokens,
    pad_batch,
    sequence_logprobs,
    token_values,
    unpad,
    work_plan,
)
from raylign.actors.value_head import VALUE_HEAD, attach_value_head, take_values
from raylign.actors.weight_sync import WeightBuckets, send_weights
from raylign.algorithms.registry import LOSSES
from raylign.config import ModelConfig, TrainerConfig
from raylign.models import load_hf_model, model_on_this_node
from raylign.types import TrainBatch


@dataclass
class WorkerSpec:
    model_path: str
    model_cfg: ModelConfig
    cfg: TrainerConfig
    seed: int
    total_steps: int | None
    critic: str | None = None  # PPO: "value_head" (on the policy backbone) or "separate" (its own model)
    reference: bool = False  # the algorithm needs a frozen reference and trainer.ref_model is "trainer"
    shared_probe: tuple[str, str] | None = None  # (file, text) the driver wrote in output_dir: can this rank read it?


def _device(cfg: TrainerConfig) -> torch.device:
    if not cfg.use_gpu:
        return torch.device("cpu")
    import ray.train.torch  # CUDA only: Ray Train assigned this worker's GPU

    return ray.train.torch.get_device()


class TrainerWorker:
    def __init__(self, spec: WorkerSpec, rank: int, world: int):
        spec = replace(spec, model_path=model_on_this_node(spec.model_cfg, spec.model_path))
        self.spec, self.cfg, self.rank, self.world = spec, spec.cfg, rank, world
        self.sync_dtype = getattr(torch, spec.model_cfg.dtype)  # what the generators run: syncs and exports use it
        # Ray pins OMP/torch threads to the worker's logical CPUs (often 1); training runs while the generators
        # idle (synchronous mode), so the workers may use every core between them.
        torch.set_num_threads(self.cfg.torch_threads or max(1, (os.cpu_count() or 1) // world))
        torch.manual_seed(spec.seed + rank)
        random.seed(spec.seed + rank)
        np.random.seed(spec.seed + rank)
        self.device = _device(self.cfg)
        if self.cfg.lora.quantize == "4bit":  # QLoRA: a frozen NF4 base on this GPU
            model = load_4bit(spec.model_path, spec.model_cfg.trust_remote_code, self.device)
        else:
            model = load_hf_model(spec.model_path, "float32", spec.model_cfg.trust_remote_code).to(self.device)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.row_tokens = packing_row_tokens(model.config, self.cfg.packed_row_tokens)
        critic_lr = self.cfg.critic_lr or 5 * self.cfg.lr
        if spec.critic == "value_head":
            attach_value_head(model)
        self.lora = self.cfg.lora.enabled
        if self.lora:
            model = apply_lora(model, self.cfg.lora, spec.seed)

        def policy_groups(named):
            return [{"params": [p for n, p in named if VALUE_HEAD not in n.split(".")]},
                    {"params": [p for n, p in named if VALUE_HEAD in n.split(".")], "lr": critic_lr}]

        backend = TRAIN_BACKENDS[self.cfg.backend]
        self.policy: Trainable = backend(model, self.cfg, lambda named: [g for g in policy_groups(named) if g["params"]],
                                         self._lr_lambda)
        # The model whose head gives V(s_t): the policy itself, a separate critic, or none (no PPO).
        self.critic: Trainable | None = self.policy if spec.critic == "value_head" else None
        if spec.critic == "separate":
            critic = load_hf_model(spec.model_path, "float32", spec.model_cfg.trust_remote_code).to(self.device)
            attach_value_head(critic)
            self.critic = backend(critic, self.cfg, lambda named: [{"params": [p for _, p in named], "lr": critic_lr}],
                                  self._lr_lambda)
        self.ref = None
        if spec.reference and not self.lora:
            # bf16 where the policy computes in bf16; fp32 otherwise (trainer.bf16=false: on CPUs without native
            # bf16 a bf16 forward took 2x the whole DPO train step), so a fresh policy equals its reference
            ref_dtype = "bfloat16" if self.cfg.bf16 else "float32"
            self.ref = load_hf_model(spec.model_path, ref_dtype, spec.model_cfg.trust_remote_code).to(self.device)
            self.ref.eval().requires_grad_(False)
        self.steps = 0
        self.handlers = {Logprobs: self.logprobs, Values: self.values, TrainStep: self.train_step,
                         SaveWeights: self.save_weights, SendWeights: self.send_weights,
                         SaveCheckpoint: self.save_checkpoint, LoadCheckpoint: self.load_checkpoint,
                         ExportHF: self.export_hf}
        return_freed_memory()  # the full fp32 copy each rank loaded, before the backend sharded it

    def _lr_lambda(self, step: int) -> float:
        return lr_multiplier(step, self.cfg.lr_schedule, self.cfg.warmup_steps, self.spec.total_steps)

    def _tensors(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in pad_batch(batch, self.pad_id, self.row_tokens).items()}

    def _plan(self, batch: TrainBatch, minibatches: int = 1) -> list[list[list[list[int]]]]:
        return work_plan(batch, self.world, minibatches, self.cfg.micro_batch_tokens, self.row_tokens)

    def _dummy_forward(self, wrapped: Trainable | None = None, values: bool = True) -> torch.Tensor:
        # Keeps this rank in step with ranks that have more micro-batches (FSDP2 all-gathers every forward).
        # ``values``: the real micro-batches use the value head, so the dummy's backward must reach it too
        # (a gradient on one rank and none on another makes the reduce-scatters differ and gloo abort).
        wrapped = wrapped or self.policy
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        out = wrapped.model(input_ids=ids, use_cache=False).logits.sum()
        if wrapped is self.critic:
            head = take_values(wrapped.inner).sum()
            out = out + head if values else out
        return out

    def _critic_values(self, tensors: dict[str, torch.Tensor], forward: bool) -> torch.Tensor:
        """V(s_t) (B, T). ``forward=False``: the policy's own forward already ran and its hook holds the values."""
        if forward:
            self.critic.model(**model_inputs(tensors), logits_to_keep=1)
        return token_values(take_values(self.critic.inner), tensors)

    def values(self, cmd: Values) -> dict[int, list[float]]:
        if self.critic is None:
            raise ValueError("no critic in the trainer (only PPO builds one: algorithm.critic)")
        batch: TrainBatch = ray.get(cmd.batch_ref)
        check_batch(batch)
        plan = [steps[0] for steps in self._plan(batch)]
        mine = plan[self.rank]
        self.critic.model.eval()
        out: dict[int, list[float]] = {}
        with torch.no_grad(), self.critic.compute():
            for k in range(max(len(p) for p in plan)):
                if k >= len(mine):
                    self._dummy_forward(self.critic)
                    continue
                tensors = self._tensors(batch.select(mine[k]))
                values_B_T = self._critic_values(tensors, forward=True)
                out.update(unpad(values_B_T, batch, mine[k]))
        return out

    def logprobs(self, cmd: Logprobs) -> dict[int, list[float]]:
        if cmd.which not in ("policy", "ref"):
            raise ValueError(f"which must be 'policy' or 'ref', got {cmd.which!r}")
        base_ref = cmd.which == "ref" and self.lora  # the policy with its adapter off
        if cmd.which == "ref" and self.ref is None and not base_ref:
            raise ValueError("no reference model in the trainer (built only for algorithms that need one, "
                             "with trainer.ref_model=trainer)")
        batch: TrainBatch = ray.get(cmd.batch_ref)
        check_batch(batch)
        plan = [steps[0] for steps in self._plan(batch)]
        mine = plan[self.rank]
        # The unsharded reference needs no lockstep; the policy (also with its adapter off) does (_dummy_forward).
        rounds = len(mine) if cmd.which == "ref" and not base_ref else max(len(p) for p in plan)
        model = self.ref if cmd.which == "ref" and not base_ref else self.policy.model
        model.eval()
        out: dict[int, list[float]] = {}
        adapter_off = self.policy.inner.disable_adapter() if base_ref else nullcontext()
        with torch.no_grad(), self.policy.compute(), adapter_off:
            for k in range(rounds):
                if k >= len(mine):
                    self._dummy_forward()
                    continue
                logprobs_B_T, _ = sequence_logprobs(model, self._tensors(batch.select(mine[k])),
                                                    temperature=batch.temperature)
                out.update(unpad(logprobs_B_T, batch, mine[k]))
        return out

    def train_step(self, cmd: TrainStep) -> dict:
        """One optimizer step per minibatch. Returns this rank's sums; merge_step_metrics averages them."""
        if cmd.loss_name not in LOSSES:
            raise ValueError(f"unknown loss_name {cmd.loss_name!r}; expected one of {sorted(LOSSES)}")
        if cmd.minibatches < 1:
            raise ValueError(f"minibatches must be >= 1, got {cmd.minibatches}")
        batch: TrainBatch = ray.get(cmd.batch_ref)
        check_batch(batch)
        # A missing field or misspelt kwarg must fail here, on every rank, not inside a micro-batch while a
        # rank with only dummy work waits in a reduce-scatter.
        loss = LOSSES[cmd.loss_name]
        loss.check(cmd.loss_name, set(batch.fields), set(cmd.loss_kwargs))
        wants = loss.outputs
        if "values_B_T" in wants and self.critic is None:
            raise ValueError(f"loss {cmd.loss_name!r} needs a critic; this trainer has none (algorithm.critic)")
        agg = loss.unit(cmd.loss_kwargs)
        plan = self._plan(batch, cmd.minibatches)
        stats = {"sums": {}, "weight": 0.0, "entropy_sum": 0.0, "tokens": 0.0, "grad_norms": [], "lrs": []}
        two_models = self.critic is not None and self.critic is not self.policy and "values_B_T" in wants
        models = [self.policy, self.critic] if two_models else [self.policy]
        for wrapped in models:
            wrapped.model.train()
        for step in range(cmd.minibatches):
            groups = [plan[r][step] for r in range(self.world)]
            rounds = max(len(g) for g in groups)
            if rounds == 0:
                continue  # fewer sequences than minibatches: no rank has work for this step
            total = sum(loss_units(batch, mb, agg) for g in groups for mb in g)
            for wrapped in models:
                wrapped.zero_grad()
            mine = groups[self.rank]
            for k in range(rounds):
                with ExitStack() as sync:
                    for wrapped in models:
                        sync.enter_context(wrapped.grad_sync(k == rounds - 1))
                    if k < len(mine):
                        units = loss_units(batch, mine[k], agg)
                        scale = self.world * units / total if total > 0 else 0.0
                        self._micro_step(batch.select(mine[k]), cmd, wants, scale, units, stats)
                    else:
                        with self.policy.compute():
                            loss = sum(self._dummy_forward(w, "values_B_T" in wants) for w in models) * 0.0
                        self.policy.backward(loss)
            self._optimizer_step(stats, two_models)
        stats["optimizer_steps"] = self.steps
        return stats

    def _micro_step(self, batch: TrainBatch, cmd: TrainStep, wants: frozenset[str], scale: float, units: float,
                    stats: dict) -> None:
        tensors = self._tensors(batch)
        fields = {name: tensors[name] for name in batch.fields}
        entropy_grad = "entropy_B_T" in wants and cmd.loss_kwargs.get("entropy_coef", 0.0) > 0
        with self.policy.compute():
            logprobs_B_T, entropy_B_T = sequence_logprobs(self.policy.model, tensors, with_entropy=True,
                                                          entropy_grad=entropy_grad, temperature=batch.temperature,
                                                          masked_only=True)
            if "values_B_T" in wants:
                fields["values_B_T"] = self._critic_values(tensors, forward=self.critic is not self.policy)
            elif self.critic is self.policy:
                take_values(self.policy.inner)  # computed by the head's hook but unused by this loss
            if "entropy_B_T" in wants:
                fields["entropy_B_T"] = entropy_B_T
            loss, metrics = LOSSES[cmd.loss_name].fn(logprobs_B_T=logprobs_B_T, mask_B_T=tensors["mask_B_T"],
                                                  **fields, **cmd.loss_kwargs)
        self.policy.backward(loss * scale)  # a separate critic's parameters get their gradients from it too
        metrics = {**metrics, "loss/total": loss.item()}
        for key, value in metrics.items():
            stats["sums"][key] = stats["sums"].get(key, 0.0) + units * float(value)
        stats["weight"] += units
        stats["entropy_sum"] += float((entropy_B_T.detach() * tensors["mask_B_T"]).sum())
        stats["tokens"] += float(tensors["mask_B_T"].sum())

    def _optimizer_step(self, stats: dict, with_critic: bool = False) -> None:
        stats["lrs"].append(self.policy.lr())
        stats["grad_norms"].append(self.policy.step(self.cfg.max_grad_norm))
        if with_critic:
            stats.setdefault("critic_grad_norms", []).append(self.critic.step(self.cfg.max_grad_norm))
        self.steps += 1

    def save_weights(self, cmd: SaveWeights) -> int:
        """Bytes written: the whole bf16 model, or with LoRA only the adapter."""
        if self.lora:
            return ckpt.save_adapter(self.policy, self.cfg.lora, self.spec.model_path, cmd.path, self.rank, self.sync_dtype)
        return ckpt.save_weights(self.policy, cmd.path, self.rank, self.sync_dtype)

    def send_weights(self, cmd: SendWeights) -> WeightBuckets | None:
        """The same weights as save_weights, as checksummed buckets in Ray's object store (rank 0; None elsewhere)."""
        return send_weights(self.policy, self.cfg.lora, self.spec.model_path, self.rank, cmd.bucket_bytes,
                            self.sync_dtype)

    def export_hf(self, cmd: ExportHF) -> None:
        ckpt.export_hf(self.policy, self.spec.model_path, cmd.dir, self.rank, self.cfg.lora, self.sync_dtype)

    def save_checkpoint(self, cmd: SaveCheckpoint) -> dict[str, dict] | None:
        return ckpt.save_trainer_checkpoint(self, cmd.dir)

    def load_checkpoint(self, cmd: LoadCheckpoint) -> None:
        ckpt.load_trainer_checkpoint(self, cmd.dir, cmd.sha256)

    def run(self, cmd_id: int, cmd: Any) -> Reply:
        started = time.perf_counter()
        try:
            handler = self.handlers.get(type(cmd))
            if handler is None:
                raise TypeError(f"unknown trainer command {type(cmd).__name__}")
            value = handler(cmd)
            if isinstance(cmd, COPIES_MODEL):
                return_freed_memory()
        except Exception as e:  # the driver re-raises it; this loop keeps serving
            return Reply(cmd_id, self.rank, False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
                         seconds=time.perf_counter() - started)
        return Reply(cmd_id, self.rank, True, value, seconds=time.perf_counter() - started)


# Commands that build a whole-model copy (weights, checkpoint state) on a rank and free it when done.
COPIES_MODEL = (SaveWeights, SendWeights, ExportHF, SaveCheckpoint, LoadCheckpoint)


def return_freed_memory() -> None:
    """Hand memory freed by Python back to the OS (glibc ``malloc_trim``; a no-op elsewhere). glibc keeps freed
    heap pages for reuse, so a full model copy freed after sharding or after a sync stays in the worker's RSS:
    measured on SmolLM2-135M fp32 ZeRO-3, 2 workers, 620 MB per rank returned right after ``deepspeed.initialize``.
    (MALLOC_MMAP_THRESHOLD_ does it for every allocation but made the CPU train step 3x slower.)"""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reads(probe: tuple[str, str] | None) -> bool:
    """Whether this node sees the driver's file with the driver's text (None: nothing to check)."""
    if probe is None:
        return True
    try:
        return open(probe[0]).read() == probe[1]
    except OSError:
        return False


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: build, say READY, then serve commands until Stop."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    commands, replies = config["command_queues"][rank], config["reply_queue"]
    try:
        try:
            worker = TrainerWorker(config["spec"], rank, world)
        except Exception as e:
            replies.put(Reply(READY, rank, False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            raise
        # pid: for tests and the chaos benchmark; actor: so the driver can kill a wedged group (TrainerGroup.abort)
        replies.put(Reply(READY, rank, True, {"packed_row_tokens": worker.row_tokens, "pid": os.getpid(),
                                              "node_id": ray.get_runtime_context().get_node_id(),
                                              "sees_shared_dir": _reads(config["spec"].shared_probe),
                                              "actor": ray.get_runtime_context().current_actor}))
        while True:
            cmd_id, cmd = commands.get()
            if isinstance(cmd, Stop):
                replies.put(Reply(cmd_id, rank, True))
                return
            replies.put(worker.run(cmd_id, cmd))
    finally:
        # Ray Train destroys the group too but checks is_initialized() first, so this is not a double destroy.
        if dist.is_initialized():
            dist.destroy_process_group()
