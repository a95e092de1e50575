"""`raylign plan CONFIG`: estimated memory of one trainer worker, one generator replica and the reference actor,
from the model's config.json alone (no weights loaded) and the run config. Nothing starts: no Ray, no model.

:func:`model_shape` (model_shape.py) reads a Llama-style HF config into a :class:`Shape` whose parameters
:func:`total_params` and :func:`lora_params` count exactly; :func:`plan` turns a Config and a
Shape into named terms (bytes, and whether they sit in GPU or CPU memory); :func:`format_plan` prints them.
The totals are an upper bound of the peak: every term is counted as held at once, although the activations
are freed before the optimizer step allocates its temporaries. The measured constants (activation and logits
bytes, process overheads) are in the tables below, each with how it was measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from raylign.config import Config, TrainerConfig
from raylign.model_shape import (  # noqa: F401 - re-exported: the plan's callers read shapes from here too
    Shape, block_params, linear_weights, lora_params, model_shape, projections, read_config_json, root_params,
    total_params,
)
from raylign.trainer_config import zero_buckets

GiB, MiB = 2**30, 2**20
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# NF4 as raylign.actors.lora.load_4bit asks for it (blocksize 64, double quantisation): 4 bits a weight, an 8-bit
# absmax per 64 weights and an fp32 scale per 256 of those.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# DeepSpeed's default stage3_max_live_parameters and stage3_max_reuse_distance (elements): a model smaller than this
# stays gathered from its forward through its backward.
DS_MAX_LIVE = 1_000_000_000
# Stage 0 all-reduces through the engine's fixed bucket (deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE, elements).
DS_ALLREDUCE = 500_000_000
# The max_lora_rank values vLLM accepts (vllm.config.lora.MaxLoRARanks); the engine starts with the smallest >= r.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Activation bytes per (token x hidden x layer), by compute mode: (c, c_ckpt with gradient checkpointing). Saved
# part, measured on SmolLM2-135M (H 576, I 1536, 9 heads of 64, 3 kv heads), CPU SDPA, one forward with raylign's
# inputs (input_ids, attention_mask, position_ids) under torch.autograd.graph.saved_tensors_hooks, summing the
# storages of saved non-parameter tensors at 256, 512 and 1024 tokens (linear: no T^2 term): bf16 weights
# (FSDP2 / DeepSpeed mixed precision) 43, fp32 weights under torch.autocast(bf16) (DDP; slope 512 -> 1024, the
# weight-cast cache is a term of its own) 53, fp32 78; checkpointed 2.3 / 4.3 / 4.4. c is the saved part x 1.2 for
# the backward's transients: a whole fp32 train step's peak RSS (one row, fused AdamW, log-probs as
# sequence_logprobs) grew 2.11 GiB from 1024 to 2048 tokens, c = 94 once the logits term is taken off. With
# checkpointing one layer's activations come back during its recompute: T*H*(L*c_ckpt + c).
ACTIVATION_BYTES = {"bf16": (52.0, 2.3), "autocast": (64.0, 4.3), "fp32": (94.0, 4.4)}
# Bytes per (micro-batch token x vocab entry) at the peak of sequence_logprobs' backward: the saved fp32
# log-softmax, its gradient and the logits' gradient (4 each). Measured: peak RSS of LM head + log-softmax + gather
# + backward alone, 12.1 at 4096 tokens (fp32), 12.2 at 1024 (bf16). An upper bound: every token of the
# micro-batch counted as a completion token.
LOGITS_BYTES = {"bf16": 12, "autocast": 12, "fp32": 12}
# Host memory of an idle process (VmRSS after the imports, three runs each, identical to the MiB; Ray not started):
# trainer: python -c "import torch, transformers, transformers.models.llama.modeling_llama, peft, ray, ray.train"
# = 625 MiB (553 without peft and ray); generator: import vllm, vllm.model_executor.models.llama = 729 MiB.
# A started Ray core worker adds its own threads and buffers on top (not measured: that needs Ray running).
HOST_OVERHEAD = {"trainer": 625 * MiB, "generator": 729 * MiB}
PROCESS = {"trainer": "torch, transformers, peft, ray", "generator": "torch, vLLM"}
# GPU memory a process takes before its first tensor (CUDA context, cuBLAS workspace, allocator slack; for vLLM also
# its profiling run's activations): an assumption, not measured (no GPU where this was written).
GPU_OVERHEAD = {"trainer": 512 * MiB, "generator": 1 * GiB}


@dataclass(frozen=True)
class Term:
    name: str
    formula: str  # in the symbols of plan()'s docstring
    bytes: float
    memory: str  # "GPU" or "CPU"


@dataclass(frozen=True)
class Role:
    name: str
    count: int  # processes of this role in the run
    terms: tuple[Term, ...]

    def total(self, memory: str) -> float:
        return sum(t.bytes for t in self.terms if t.memory == memory)


@dataclass(frozen=True)
class Plan:
    title: str
    roles: tuple[Role, ...]
    symbols: dict[str, int]  # the values of the formulas' symbols
    notes: tuple[str, ...]

    def run_total(self, memory: str) -> float:
        return sum(role.count * role.total(memory) for role in self.roles)


@dataclass(frozen=True)
class _Model:
    """Parameter counts of one trained model (the policy, or the separate critic) and where its terms go."""

    p_module: int  # every parameter of the module: base + LoRA + value head
    p_train: int  # the ones the optimizer steps
    p_nf4: int  # base weights stored in NF4 (QLoRA), else 0
    block: int
    root: int
    hidden: int
    n: int
    bf16: bool
    device: str  # "GPU" or "CPU"

    def stored(self, dense_bytes: int) -> tuple[float, str]:
        """Bytes of the module's weights held in dense_bytes each, NF4 ones at NF4_BYTES; with the formula."""
        if not self.p_nf4:
            return dense_bytes * self.p_module, f"{dense_bytes}*Pm"
        return NF4_BYTES * self.p_nf4 + dense_bytes * (self.p_module - self.p_nf4), \
            f"{NF4_BYTES:g}*Pq+{dense_bytes}*(Pm-Pq)"


def _fsdp2_terms(m: _Model, cfg: TrainerConfig) -> list[Term]:
    weights, formula = m.stored(4)
    terms = [Term("fp32 weights, sharded", f"({formula})/N", weights / m.n, m.device)]
    if m.bf16:  # (QLoRA, with its NF4 base, is refused on FSDP2 by the config)
        if m.n > 1:  # one block computing, the next one's all-gather prefetched, the root kept for the backward
            terms.append(Term("bf16 compute copy: 2 blocks + root gathered", "2*(2*B+R)",
                              2 * min(m.p_module, 2 * m.block + m.root), m.device))
        else:  # one worker: reshard_after_forward is off, the whole bf16 copy stays
            terms.append(Term("bf16 compute copy (1 worker: kept whole)", "2*Pm", 2 * m.p_module, m.device))
    return terms + [Term("fp32 gradients, sharded", "4*Pt/N", 4 * m.p_train / m.n, m.device),
                    Term("AdamW state, sharded", "8*Pt/N", 8 * m.p_train / m.n, m.device)]


def _ddp_terms(m: _Model, cfg: TrainerConfig) -> list[Term]:
    weights, formula = m.stored(4)
    terms = [Term("fp32 weights", formula, weights, m.device)]
    if m.bf16:  # autocast caches the bf16 casts of trainable leaves for the whole forward; frozen ones per op
        terms.append(Term("bf16 autocast weight cache", "2*Pt", 2 * m.p_train, m.device))
    return terms + [Term("fp32 gradients", "4*Pt", 4 * m.p_train, m.device),
                    Term("DDP gradient buckets (no bucket views)", "4*Pt", 4 * m.p_train, m.device),
                    Term("AdamW state", "8*Pt", 8 * m.p_train, m.device)]


def _deepspeed_terms(m: _Model, cfg: TrainerConfig) -> list[Term]:
    """Stage 0 is raylign's plain path (fp32 weights, client AdamW, autocast); stages 1-3 are DeepSpeed's ZeRO
    optimizer with bf16 weights and grad_accum_dtype fp32 (deepspeed_backend.deepspeed_config)."""
    ds = cfg.deepspeed
    if ds.zero_stage == 0:
        weights, formula = m.stored(4)
        terms = [Term("fp32 weights", formula, weights, m.device)]
        if m.bf16:
            terms.append(Term("bf16 autocast weight cache", "2*Pt", 2 * m.p_train, m.device))
        return terms + [Term("fp32 gradients", "4*Pt", 4 * m.p_train, m.device),
                        Term("allreduce bucket", "4*min(Pt,5e8)", 4 * min(m.p_train, DS_ALLREDUCE), m.device),
                        Term("AdamW state", "8*Pt", 8 * m.p_train, m.device)]
    opt_mem = "CPU" if ds.offload_optimizer else m.device
    dense, dtype = (2, "bf16") if m.bf16 else (4, "fp32")  # the engine casts the module to bf16
    weights, formula = m.stored(dense)
    sharded = ds.zero_stage == 3
    zero = _zero(cfg, m.hidden)
    bucket = zero["reduce_bucket_size"]
    terms = [Term(f"{dtype} weights" + (", partitioned" if sharded else ""), f"({formula})/N" if sharded else formula,
                  weights / (m.n if sharded else 1), "CPU" if ds.offload_params else m.device)]
    if sharded:
        live = min(zero.get("stage3_max_live_parameters", DS_MAX_LIVE), zero.get("stage3_max_reuse_distance", DS_MAX_LIVE))
        terms.append(Term("ZeRO-3 gathered working set", f"{dense}*min(Pm,max(2*B+R,Z))",
                          dense * min(m.p_module, max(2 * m.block + m.root, live)), m.device))
    # bf16 at stage 1 without offload runs DeepSpeed's BF16_Optimizer: fp32 gradients accumulate at full size
    whole = m.bf16 and ds.zero_stage == 1 and not ds.offload_optimizer
    accumulate = Term("fp32 gradient accumulation" + ("" if whole else ", partitioned"), "4*Pt" if whole else "4*Pt/N",
                      4 * m.p_train / (1 if whole else m.n), m.device if whole else opt_mem)
    return terms + [Term("fp32 master weights, partitioned", "4*Pt/N", 4 * m.p_train / m.n, opt_mem),
                    Term(f"{dtype} gradients in the reduce bucket", f"{dense}*min(Pt,K)",
                         dense * min(m.p_train, bucket), m.device), accumulate,
                    Term("AdamW state, partitioned", "8*Pt/N", 8 * m.p_train / m.n, opt_mem)]


def _zero(cfg: TrainerConfig, hidden: int) -> dict:
    """ZeRO's buffer sizes as the engine gets them: raylign's from the hidden size, the passthrough's over them."""
    return {**zero_buckets(cfg.deepspeed.zero_stage, hidden), **cfg.deepspeed.config.get("zero_optimization", {})}


# trainer.backend -> the terms of one trained model's weights, gradients and optimizer state.
STATE_TERMS: dict[str, Callable[[_Model, TrainerConfig], list[Term]]] = {
    "fsdp2": _fsdp2_terms,
    "ddp": _ddp_terms,
    "deepspeed": _deepspeed_terms,
}


def _compute_mode(t: TrainerConfig) -> str:
    autocast = t.backend == "ddp" or t.backend == "deepspeed" and t.deepspeed.zero_stage == 0
    return "fp32" if not t.bf16 else "autocast" if autocast else "bf16"


def _overhead(role: str, device: str) -> list[Term]:
    terms = [Term(f"process: {PROCESS[role]} imported", "const", HOST_OVERHEAD[role], "CPU")]
    if device == "GPU":
        terms.append(Term("CUDA context + workspace (assumed)", "const", GPU_OVERHEAD[role], "GPU"))
    return terms


def _activation_terms(t: TrainerConfig, shape: Shape, device: str) -> list[Term]:
    mode = _compute_mode(t)
    c, c_ckpt = ACTIVATION_BYTES[mode]
    tokens, h, layers = t.micro_batch_tokens, shape.hidden, shape.layers
    if t.gradient_checkpointing:
        act = Term(f"activations, checkpointed (c={c_ckpt:g}, +1 layer c={c:g})", "T*H*(L*c_ckpt+c)",
                   tokens * h * (layers * c_ckpt + c), device)
    else:
        act = Term(f"activations (c={c:g})", "T*H*L*c", tokens * h * layers * c, device)
    return [act, Term(f"logits + log-softmax ({LOGITS_BYTES[mode]} B/entry)", f"T*V*{LOGITS_BYTES[mode]}",
                      tokens * shape.vocab * LOGITS_BYTES[mode], device)]


def plan(cfg: Config, shape: Shape) -> Plan:
    """Bytes per trainer worker, generator replica and reference actor. Symbols: N = trainer.num_workers,
    P = total_params(shape), Pl = LoRA params, Pv = value head (H+1, PPO critic=value_head), Pm = P + Pl + Pv (the
    policy module), Pt = trainable (Pl + Pv with LoRA, else Pm), Pq = block projection weights (NF4 with QLoRA,
    else 0), B = block_params, R = root_params, K = ZeRO's reduce bucket (H^2 elements unless
    trainer.deepspeed.config sets it), Z = min(stage3_max_live_parameters, stage3_max_reuse_distance) (1e9), T =
    trainer.micro_batch_tokens, H, L, V from the shape.

    Trainer worker = model state (by trainer.backend) + reference + separate critic + activations + overhead:
      fsdp2:       4Pm/N fp32 + 2(2B+R) bf16 gathered (2Pm with N=1: kept whole) + 4Pt/N grads + 8Pt/N AdamW
      ddp:         4Pm fp32 + 2Pt autocast cache + 4Pt grads + 4Pt DDP buckets + 8Pt AdamW
      ZeRO-0:      4Pm fp32 + 2Pt autocast cache + 4Pt grads + 4min(Pt,5e8) allreduce bucket + 8Pt AdamW
      ZeRO-1/2/3:  2Pm bf16 weights (/N and + 2min(Pm,max(2B+R,Z)) gathered at stage 3; CPU with offload_params)
                   + 4Pt/N fp32 master + 2min(Pt,K) bf16 reduce bucket + 4Pt/N fp32 grad accumulation (4Pt at
                   stage 1 without offload: BF16_Optimizer) + 8Pt/N AdamW; master, accumulation and AdamW move to
                   CPU with offload_optimizer on GPU; bf16=false: 4 B weights and bucket
      QLoRA:       Pq at NF4_BYTES (0.516 B) in place of their dense bytes: no fp32 master, no bf16 copy of the base
      reference:   2P (bf16) or 4P, unsharded, when the algorithm needs one, LoRA is off and trainer.ref_model=trainer
      critic:      algorithm.critic=separate: the state terms again for a full model + value head (Pc = P + H + 1)
      activations: T*H*L*c (T*H*(L*c_ckpt + c) checkpointed) + logits T*V*12; c, c_ckpt by compute mode
      overhead:    host process memory (+ CUDA context on GPU)
    Generator replica = model.dtype bytes x P + kv_cache_gb + overhead; with LoRA also vLLM's adapter slot (all
    projections at max_lora_rank) or the HF backend's pristine copy of the adapted weights.
    Reference actor (trainer.ref_model=actor, no LoRA) = 2P or 4P + overhead.
    """
    t, algo = cfg.trainer, _algorithm(cfg)
    device = "GPU" if t.use_gpu else "CPU"
    p, critic = total_params(shape), algo.critic(cfg.algorithm)
    p_lora = lora_params(shape, t.lora.r, t.lora.target_modules) if t.lora.enabled else 0
    p_head = shape.hidden + 1 if critic == "value_head" else 0
    common = dict(block=block_params(shape), root=root_params(shape), hidden=shape.hidden, n=t.num_workers,
                  bf16=t.bf16, device=device)
    policy = _Model(p_module=p + p_lora + p_head, p_train=(p_lora + p_head) if t.lora.enabled else p + p_head,
                    p_nf4=linear_weights(shape) if t.lora.quantize == "4bit" else 0, **common)
    terms = STATE_TERMS[t.backend](policy, t)
    needs_ref = algo.reference(cfg.algorithm) and not t.lora.enabled  # with LoRA: the policy, adapter off
    ref_width = 2 if t.bf16 else 4
    reference = Term(f"reference model ({'bf16' if t.bf16 else 'fp32'})", f"{ref_width}*P", ref_width * p, device)
    if needs_ref and t.ref_model == "trainer":
        terms.append(reference)
    p_critic = p + shape.hidden + 1 if critic == "separate" else 0
    if p_critic:  # a full fp32 model + head, trained in full even with LoRA (trainer_worker builds it so)
        state = STATE_TERMS[t.backend](_Model(p_module=p_critic, p_train=p_critic, p_nf4=0, **common), t)
        terms += [Term(f"critic: {x.name}", x.formula.replace("Pm", "Pc").replace("Pt", "Pc"), x.bytes, x.memory)
                  for x in state]
    terms += _activation_terms(t, shape, device) + _overhead("trainer", device)
    roles = [Role("trainer worker", t.num_workers, tuple(terms)), _generator_role(cfg, shape, algo)]
    if needs_ref and t.ref_model == "actor":
        roles.append(Role("reference actor", 1, (reference, *_overhead("trainer", device))))
    symbols = {"P": p, "Pl": p_lora, "Pm": policy.p_module, "Pt": policy.p_train, "Pq": policy.p_nf4, "Pc": p_critic,
               "B": common["block"], "R": common["root"], "K": _zero(t, shape.hidden).get("reduce_bucket_size", 0)
               if t.backend == "deepspeed" else 0,
               "N": t.num_workers, "T": t.micro_batch_tokens, "H": shape.hidden, "L": shape.layers, "V": shape.vocab,
               "TP": cfg.generator.tensor_parallel_size if cfg.generator.tensor_parallel_size > 1 else 0}
    return Plan(title=_title(cfg, shape, p, policy.p_train), roles=tuple(roles),
                symbols={k: v for k, v in symbols.items() if v}, notes=tuple(_notes(cfg, roles[1].count)))


def _generator_role(cfg: Config, shape: Shape, algo) -> Role:
    """Replicas exist when the algorithm samples or an eval runs; each holds model.dtype weights and its KV cache.
    With tensor parallelism the unit is one GPU of a replica: 1/TP of the weights and a KV cache of its own
    (vLLM's kv_cache_memory_bytes is per GPU), one process each."""
    g = cfg.generator
    replicas = g.num_replicas if algo.generation(cfg.algorithm) or cfg.train.eval_before or cfg.train.eval_after else 0
    device, width, tp = "GPU" if g.num_gpus > 0 else "CPU", DTYPE_BYTES[cfg.model.dtype], g.tensor_parallel_size
    split = ("", "") if tp == 1 else (", 1/TP of them", "/TP")
    terms = [Term(f"weights ({cfg.model.dtype}){split[0]}", f"{width}*P{split[1]}", width * total_params(shape) / tp,
                  device)]
    if cfg.trainer.lora.enabled:
        terms.append(_generator_lora(cfg, shape, width, device))
    terms.append(Term("KV cache (generator.kv_cache_gb)", "kv_cache_gb", g.kv_cache_gb * GiB, device))
    return Role("generator replica" if tp == 1 else "generator GPU", replicas * tp,
                tuple(terms + _overhead("generator", device)))


def _generator_lora(cfg: Config, shape: Shape, width: int, device: str) -> Term:
    """vLLM preallocates one adapter slot at max_lora_rank for every projection it can adapt; the HF backend merges
    the adapter into its weights and keeps a pristine copy of each adapted weight (actors/backends/hf_backend.py)."""
    lora = cfg.trainer.lora
    if cfg.generator.backend == "vllm":
        rank = min((r for r in VLLM_LORA_RANKS if r >= lora.r), default=lora.r)
        return Term(f"LoRA slot (vLLM max_lora_rank={rank}, all projections)", f"{width}*Pl(r={rank})",
                    width * lora_params(shape, rank, list(projections(shape))), device)
    adapted = shape.layers * sum(i * o for name, (i, o) in projections(shape).items() if name in lora.target_modules)
    return Term("pristine copy of the adapted weights (HF merge)", f"{width}*Pa", width * adapted, device)


def _algorithm(cfg: Config):
    from raylign.algorithms.registry import ALGORITHMS  # imports the algorithms (torch): only when planning

    return ALGORITHMS[cfg.algorithm.name]


def _title(cfg: Config, shape: Shape, p: int, p_train: int) -> str:
    t = cfg.trainer
    backend = f"deepspeed ZeRO-{t.deepspeed.zero_stage}" if t.backend == "deepspeed" else t.backend
    lora = f", LoRA r={t.lora.r}" + (" 4-bit base" if t.lora.quantize == "4bit" else "") if t.lora.enabled else ""
    return (f"{cfg.model.name} ({shape.model_type}, {p:,} params, {p_train:,} trainable), "
            f"algorithm {cfg.algorithm.name}, {backend} x {t.num_workers} workers "
            f"({'bf16' if t.bf16 else 'fp32'}, {'GPU' if t.use_gpu else 'CPU'}{lora})")


def _notes(cfg: Config, replicas: int) -> list[str]:
    t = cfg.trainer
    notes = ["totals are an upper bound: every term counted as held at once"]
    offload = t.backend == "deepspeed" and (t.deepspeed.offload_optimizer or t.deepspeed.offload_params)
    if offload and not t.use_gpu:
        notes.append("trainer.deepspeed offload changes nothing on CPU workers: the offloaded state stays in the "
                     "same RAM")
    if t.lora.enabled and _algorithm(cfg).reference(cfg.algorithm):
        notes.append("LoRA: the reference is the policy with its adapter off, so no reference copy is loaded")
    if not replicas:
        notes.append("no generator replicas: the algorithm does not sample and the evals are off")
    if cfg.generator.tensor_parallel_size > 1:
        notes.append(f"generator.tensor_parallel_size={cfg.generator.tensor_parallel_size}: each replica is that "
                     "many generator GPUs, each a process with 1/TP of the weights")
    if cfg.generator.gpu_memory_utilization is not None:
        notes.append(f"generator.gpu_memory_utilization={cfg.generator.gpu_memory_utilization:g}: vLLM takes that "
                     "share of each GPU and gives the KV cache what the weights leave; the KV term uses kv_cache_gb")
    if cfg.reward.judge.model or cfg.env.name == "dspy" or getattr(cfg.algorithm, "judge_model", None):
        notes.append("judge / task-model generator actors are not counted")
    return notes


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def format_plan(p: Plan) -> str:
    """The plan as a table (term, formula, memory, size), totals per role and for the run, and the notes."""
    lines = [f"memory plan: {p.title}", ""]
    for role in p.roles:
        lines.append(f"{role.name} (x{role.count})")
        lines += [f"  {t.name:<52} {t.formula:<22} {t.memory:<4} {_size(t.bytes):>11}" for t in role.terms]
        totals = [f"{m} {_size(role.total(m))}" for m in ("GPU", "CPU") if role.total(m)]
        lines += [f"  {'total per ' + role.name.split()[-1]:<52} {', '.join(totals)}", ""]
    count = " + ".join(f"{r.count} x {r.name}" for r in p.roles)
    totals = ", ".join(f"{m} {_size(p.run_total(m))}" for m in ("GPU", "CPU") if p.run_total(m))
    lines += [f"whole run ({count}): {totals}", ""]
    lines += [f"formula: {role.name} = {' + '.join(t.formula for t in role.terms)}" for role in p.roles if role.count]
    lines.append("  with " + ", ".join(f"{k}={v:,}" for k, v in p.symbols.items()) + " (see raylign.memory_plan.plan)")
    return "\n".join(lines + [f"note: {n}" for n in p.notes])


def plan_for(cfg: Config) -> str:
    """`raylign plan`: the formatted plan of a loaded config."""
    return format_plan(plan(cfg, model_shape(read_config_json(cfg.model))))
