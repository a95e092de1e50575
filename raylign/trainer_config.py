"""The trainer's config section: the Ray Train workers, their data-parallel backend (FSDP2, DDP or
DeepSpeed ZeRO) and LoRA/QLoRA. Re-exported by raylign.config, which callers import it from."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from raylign.config_base import _Section

# DeepSpeed JSON keys raylign sets from trainer fields; a passthrough naming one is refused with the field to use.
DEEPSPEED_OWNED = {
    "train_batch_size": "the trainer's work plan (algorithm batch sizes)",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_tokens",
    "gradient_accumulation_steps": "trainer.micro_batch_tokens (raylign marks accumulation boundaries itself)",
    "gradient_clipping": "trainer.max_grad_norm",
    "optimizer": "trainer.lr and trainer.weight_decay",
    "scheduler": "trainer.lr_schedule and trainer.warmup_steps",
    "bf16": "trainer.bf16",
    "fp16": "trainer.bf16 (fp16 is not supported)",
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def zero_buckets(stage: int, hidden: int) -> dict:
    """ZeRO's communication buffers sized by the model's hidden size H (elements), as Hugging Face's "auto"
    values do: DeepSpeed's own defaults (5e8-element reduce and all-gather buckets) are a whole fp32 copy of any
    model under 500M parameters per buffer. Measured on SmolLM2-135M, 2 CPU workers, fp32: ZeRO-3's peak RSS per
    worker 5.4 GB with the defaults, 4.0 GB with these. The price is more, smaller collectives: the ZeRO-3 step
    took 22 s against 16 s in the same (loaded) run. trainer.deepspeed.config.zero_optimization sets any of them
    back."""
    if stage == 0:
        return {}
    out = {"reduce_bucket_size": hidden * hidden}
    if stage < 3:
        out["allgather_bucket_size"] = hidden * hidden
    else:
        # and a gathered working set of about two transformer blocks (12 H^2 each): DeepSpeed's 1e9 keeps any
        # smaller model gathered from its forward through its backward, which is ZeRO-2's memory plus the gathers
        out |= {"stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                "stage3_param_persistence_threshold": 10 * hidden,
                "stage3_max_live_parameters": 24 * hidden * hidden, "stage3_max_reuse_distance": 24 * hidden * hidden}
    return out


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also parameters")
    offload_optimizer: bool = Field(False, description="keep optimizer state in CPU memory (stage >= 1); on GPU this uses DeepSpeed's CPU Adam")
    offload_params: bool = Field(False, description="keep parameters in CPU memory between uses (stage 3)")
    config: dict[str, Any] = Field(default_factory=dict, description="extra DeepSpeed JSON merged over raylign's (e.g. zero_optimization.reduce_bucket_size); keys raylign sets from trainer fields are refused")

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"trainer.deepspeed.offload_params needs zero_stage 3 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("trainer.deepspeed.offload_optimizer needs zero_stage >= 1 (stage 0 has no ZeRO optimizer)")
        for key in self.config:
            if key in DEEPSPEED_OWNED:
                raise ValueError(f"trainer.deepspeed.config.{key} is set by raylign from {DEEPSPEED_OWNED[key]}")
        stage = self.config.get("zero_optimization", {}).get("stage")
        if stage is not None and stage != self.zero_stage:
            raise ValueError(f"trainer.deepspeed.config.zero_optimization.stage ({stage}) disagrees with "
                             f"trainer.deepspeed.zero_stage ({self.zero_stage}); set only zero_stage")
        return self


class LoraConfig(_Section):
    enabled: bool = Field(False, description="train LoRA adapters (peft) instead of the full model; the reference is the base with the adapter off")
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="adapter scale numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), description="module names that get adapters (default: attention and MLP projections)")
    quantize: Literal["none", "4bit"] = Field("none", description="QLoRA: 4bit loads the frozen base in bitsandbytes NF4 (GPU only)")

    @model_validator(mode="after")
    def _check(self) -> LoraConfig:
        if not self.target_modules:
            raise ValueError("trainer.lora.target_modules is empty: name at least one module (e.g. q_proj)")
        return self


class TrainerConfig(_Section):
    backend: Literal["fsdp2", "ddp", "deepspeed"] = Field("fsdp2", description="data-parallel backend of the Ray Train workers")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed ZeRO settings (trainer.backend=deepspeed)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA / QLoRA adapters (peft), on any backend")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (processes) for policy updates")
    num_cpus_per_worker: float = Field(1.0, gt=0, description="Ray logical CPUs each trainer worker reserves")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each trainer worker needs, for placement on chosen nodes (e.g. {\"node_b\": 0.01} with `ray start --resources`)")
    use_gpu: bool = Field(False, description="one GPU per trainer worker (nccl); CPU workers use gloo")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker; None: the machine's cores / num_workers (training never overlaps generation)")
    lr: float = Field(1e-6, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    critic_lr: float | None = Field(None, gt=0, description="PPO: learning rate of the critic (value head or separate model); None = 5x lr")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up optimizer steps")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="decay after warm-up")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    micro_batch_tokens: int = Field(4096, ge=64, description="token budget of one forward/backward (grad accumulation)")
    packed_row_tokens: int = Field(1024, ge=0, description="pack the samples of one prompt into rows of at most this many tokens, computing the prompt once per row (0: one sequence per row)")
    bf16: bool = Field(True, description="bf16 autocast for forward/backward where supported (fp32 master weights)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    ref_model: Literal["trainer", "actor"] = Field("trainer", description="where the frozen reference model lives when the algorithm needs one (DPO; KL with kl_beta > 0): a bf16 copy in each trainer worker, or one in its own Ray actor; with LoRA it is the policy with its adapter off, so no copy is loaded")
    weights_dir: str = Field("/dev/shm/raylign", description="where the file transport writes synced weights (read by replicas on the trainer's node)")
    weight_transport: Literal["auto", "file", "ray"] = Field("auto", description="how synced weights reach each replica: a file in weights_dir, checksummed buckets over Ray's object store (any node), or auto: file for replicas on trainer rank 0's node, ray for the others")
    sync_bucket_mb: float = Field(256.0, gt=0, description="ray transport: gathered fp32 MB per bucket; the sender holds about one bucket beyond its shard")
    sync_timeout_s: float = Field(300.0, gt=0, description="ray transport: deadline for one bucket to reach a replica; past it the sync counts as a fault")
    sync_check_every: int = Field(10, ge=0, description="every N syncs (and the first), a canary compares each replica's log-probs on fixed prompts with the trainer's; a mismatch replaces the replica (0: never)")
    sync_check_tol: float = Field(0.3, gt=0, description="canary: largest allowed per-token log-prob gap between a replica and the trainer (vLLM's bf16 kernels and the trainer's bf16 autocast differed by up to 0.18 on SmolLM2 after PPO steps; fp32 end to end stays under 0.01). A looser tolerance lets smaller sync errors through: fp32 runs can set 0.05")

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        if self.lora.quantize == "4bit" and not self.use_gpu:
            raise ValueError("trainer.lora.quantize=4bit (QLoRA, bitsandbytes NF4) needs a GPU: set trainer.use_gpu=true "
                             "or trainer.lora.quantize=none")
        if self.lora.quantize == "4bit" and (self.backend == "fsdp2" or self.backend == "deepspeed" and self.deepspeed.zero_stage == 3):
            raise ValueError("trainer.lora.quantize=4bit runs on trainer.backend=ddp or deepspeed with zero_stage <= 2 "
                             "(FSDP2 and ZeRO-3 shard parameters, and a 4-bit weight cannot be sharded)")
        if self.lora.quantize == "4bit" and not self.lora.enabled:
            raise ValueError("trainer.lora.quantize=4bit needs trainer.lora.enabled=true (only adapters train on a 4-bit base)")
        return self
