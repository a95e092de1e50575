"""raylign.memory_plan: exact parameter counts against transformers and peft, the plan's terms against the formula
written out by hand, and `raylign plan` as a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raylign.config import ConfigError, ModelConfig, load_config
from raylign.memory_plan import (
    GPU_OVERHEAD, HOST_OVERHEAD, GiB, NF4_BYTES, Shape, block_params, format_plan, linear_weights, lora_params,
    model_shape, plan, root_params, total_params,
)
from raylign.models import ModelError, load_hf_model, resolve_model
from raylign.trainer_config import LORA_TARGETS

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_P = 134_515_008  # hand count below; equals transformers' count (test_smollm2_count_matches_the_model)
# SmolLM2-135M: H 576, L 30, V 49152, I 1536, 9 heads x 64, 3 kv heads, tied embeddings.
SMOLLM2 = Shape("llama", hidden=576, layers=30, vocab=49152, intermediate=1536, heads=9, kv_heads=3, head_dim=64,
                tied=True)


def _cfg(*overrides: str, preset: str = "grpo_arith"):
    return load_config(REPO / f"configs/{preset}.yaml", ["trainer.num_workers=2", *overrides])


def _terms(p, role: str = "trainer worker") -> dict[str, float]:
    return {t.name: t.bytes for r in p.roles if r.name == role for t in r.terms}


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return Path(resolve_model(ModelConfig(name="smollm2-135m-instruct")))


def test_smollm2_hand_count():
    # per block: q 576*576 + k,v 576*192 each + o 576*576 + gate,up,down 576*1536 each + 2 norms of 576
    block = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert block_params(SMOLLM2) == block == 3_540_096
    assert root_params(SMOLLM2) == 49152 * 576 + 576  # tied: one embedding matrix, the final norm
    assert total_params(SMOLLM2) == 30 * block + 49152 * 576 + 576 == SMOLLM2_P


def test_smollm2_count_matches_the_model(smollm2_dir):
    shape = model_shape(json.loads((smollm2_dir / "config.json").read_text()))
    assert shape == SMOLLM2
    model = load_hf_model(str(smollm2_dir), "bfloat16")
    assert total_params(shape) == sum(p.numel() for p in model.parameters()) == SMOLLM2_P


def test_lora_count_matches_peft(smollm2_dir):
    from peft import LoraConfig, get_peft_model

    model = load_hf_model(str(smollm2_dir), "bfloat16")
    trainable, _ = get_peft_model(model, LoraConfig(r=8, target_modules=LORA_TARGETS)).get_nb_trainable_parameters()
    # r * (in + out) per projection: q,o 8*1152, k,v 8*768, gate,up,down 8*2112; 30 layers
    assert lora_params(SMOLLM2, 8, LORA_TARGETS) == trainable == 30 * 8 * (2 * 1152 + 2 * 768 + 3 * 2112) == 2_442_240


@pytest.mark.parametrize("kind, extra", [("llama", {"attention_bias": True, "mlp_bias": True}), ("mistral", {}),
                                         ("qwen2", {}), ("qwen3", {"head_dim": 24})])
def test_llama_style_families_match_transformers(kind, extra):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **extra)
    model = AutoModelForCausalLM.from_config(config)
    shape = model_shape(config.to_dict())
    assert total_params(shape) == sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert lora_params(shape, 4, ["q_proj", "down_proj"]) == peft.get_nb_trainable_parameters()[0]


def test_unknown_target_and_architecture_are_named():
    with pytest.raises(ConfigError, match="lm_head not a projection of a llama block"):
        lora_params(SMOLLM2, 8, ["q_proj", "lm_head"])
    with pytest.raises(ModelError, match="model_type 'gpt2' is not a Llama-style"):
        model_shape({"model_type": "gpt2"})


def test_fsdp2_terms_follow_the_formula():
    p = plan(_cfg(), SMOLLM2)
    t = _terms(p)
    P, N = SMOLLM2_P, 2
    assert t["fp32 weights, sharded"] == 4 * P / N
    assert t["fp32 gradients, sharded"] == 4 * P / N
    assert t["AdamW state, sharded"] == 2 * t["fp32 gradients, sharded"] == 8 * P / N
    assert t["bf16 compute copy: 2 blocks + root gathered"] == 2 * (2 * 3_540_096 + 49152 * 576 + 576)
    assert t["activations (c=52)"] == 4096 * 576 * 30 * 52
    assert t["logits + log-softmax (12 B/entry)"] == 4096 * 49152 * 12
    one = _terms(plan(_cfg("trainer.num_workers=1"), SMOLLM2))
    assert one["fp32 weights, sharded"] == 2 * t["fp32 weights, sharded"]
    assert one["bf16 compute copy (1 worker: kept whole)"] == 2 * P  # reshard_after_forward off with one rank


def test_ddp_keeps_everything_whole():
    t = _terms(plan(_cfg("trainer.backend=ddp"), SMOLLM2))
    P = SMOLLM2_P
    assert (t["fp32 weights"], t["bf16 autocast weight cache"], t["fp32 gradients"],
            t["DDP gradient buckets (no bucket views)"], t["AdamW state"]) == (4 * P, 2 * P, 4 * P, 4 * P, 8 * P)
    assert t["activations (c=64)"] == 4096 * 576 * 30 * 64  # autocast: the residual stream stays fp32


def test_zero_stages_shard_in_order():
    P, N = SMOLLM2_P, 2
    totals, state = {}, {}
    for stage in range(4):
        p = plan(_cfg("trainer.backend=deepspeed", f"trainer.deepspeed.zero_stage={stage}"), SMOLLM2)
        totals[stage] = p.roles[0].total("CPU")
        state[stage] = _terms(p)
    assert totals[3] < totals[2] < totals[1] < totals[0]
    # stage 0: raylign's plain path, as DDP but DeepSpeed's allreduce bucket (K = 5e8 elements holds all of P)
    assert (state[0]["fp32 weights"], state[0]["fp32 gradients"], state[0]["allreduce bucket"],
            state[0]["AdamW state"]) == (4 * P, 4 * P, 4 * P, 8 * P)
    assert state[1]["bf16 weights"] == 2 * P and state[3]["bf16 weights, partitioned"] == 2 * P / N
    for stage in (1, 2, 3):
        assert state[stage]["AdamW state, partitioned"] == 8 * P / N
        assert state[stage]["fp32 master weights, partitioned"] == 4 * P / N
        assert state[stage]["bf16 gradients in the reduce bucket"] == 2 * 576 * 576  # K = H^2, not DeepSpeed's 5e8
    assert state[1]["fp32 gradient accumulation"] == 4 * P  # BF16_Optimizer accumulates at full size
    assert state[2]["fp32 gradient accumulation, partitioned"] == 4 * P / N
    # ZeRO-1 -> 2 halves the fp32 accumulation; 2 -> 3 the bf16 weights, less the gathered working set
    assert totals[1] - totals[2] == 2 * P
    gathered = state[3]["ZeRO-3 gathered working set"]  # 2 blocks + root: bigger than Z = 24 H^2 for SmolLM2
    assert totals[2] - totals[3] == P - gathered and gathered == 2 * (2 * block_params(SMOLLM2) + root_params(SMOLLM2))
    whole = _terms(plan(_cfg("trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=3", "trainer.deepspeed.config="
                             "{zero_optimization: {stage3_max_live_parameters: 1000000000, stage3_max_reuse_distance: 1000000000}}"),
                         SMOLLM2))
    assert whole["ZeRO-3 gathered working set"] == 2 * P  # DeepSpeed's default Z keeps all of a small model
    small = _terms(plan(_cfg("trainer.backend=deepspeed", "trainer.deepspeed.config={zero_optimization: "
                             "{reduce_bucket_size: 1000000}}"), SMOLLM2))
    assert small["bf16 gradients in the reduce bucket"] == 2 * 1_000_000


def test_offload_moves_optimizer_state_to_cpu_on_gpu_only():
    base = ["trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=2", "trainer.deepspeed.offload_optimizer=true"]
    gpu = plan(_cfg(*base, "trainer.use_gpu=true"), SMOLLM2)
    where = {t.name: t.memory for t in gpu.roles[0].terms}
    assert where["AdamW state, partitioned"] == where["fp32 master weights, partitioned"] == "CPU"
    assert where["fp32 gradient accumulation, partitioned"] == "CPU"
    assert where["bf16 gradients in the reduce bucket"] == where["bf16 weights"] == "GPU"
    cpu = plan(_cfg(*base), SMOLLM2)
    assert cpu.roles[0].total("GPU") == 0
    assert cpu.roles[0].total("CPU") == gpu.roles[0].total("CPU") + gpu.roles[0].total("GPU") - GPU_OVERHEAD["trainer"]
    assert any("changes nothing on CPU workers" in n for n in cpu.notes)


def test_lora_trains_only_the_adapters_and_drops_the_reference():
    full = _terms(plan(_cfg(preset="dpo_arith"), SMOLLM2))
    assert full["reference model (bf16)"] == 2 * SMOLLM2_P
    lora = plan(_cfg("trainer.lora.enabled=true", preset="dpo_arith"), SMOLLM2)
    t, pl = _terms(lora), 2_442_240
    assert "reference model (bf16)" not in t
    assert t["AdamW state, sharded"] == 8 * pl / 2 and t["fp32 gradients, sharded"] == 4 * pl / 2
    assert t["fp32 weights, sharded"] == 4 * (SMOLLM2_P + pl) / 2  # the frozen base stays fp32 in the module
    # vLLM: one slot at max_lora_rank 8 on every projection (here all seven are targeted, so it equals Pl)
    assert _terms(lora, "generator replica")["LoRA slot (vLLM max_lora_rank=8, all projections)"] == 2 * pl
    hf = _terms(plan(_cfg("trainer.lora.enabled=true", "trainer.lora.r=4", "trainer.lora.target_modules=[q_proj]",
                          "generator.backend=hf", preset="dpo_arith"), SMOLLM2), "generator replica")
    assert hf["pristine copy of the adapted weights (HF merge)"] == 2 * 30 * 576 * 576
    actor = plan(_cfg("trainer.ref_model=actor", preset="dpo_arith"), SMOLLM2)
    assert "reference model (bf16)" not in _terms(actor)
    assert _terms(actor, "reference actor")["reference model (bf16)"] == 2 * SMOLLM2_P


def test_qlora_stores_the_projections_in_nf4():
    qlora = ["trainer.use_gpu=true", "trainer.lora.enabled=true", "trainer.lora.quantize=4bit"]
    t = _terms(plan(_cfg(*qlora, "trainer.backend=ddp"), SMOLLM2))
    pq, pl = linear_weights(SMOLLM2), 2_442_240
    assert pq == 30 * (3_540_096 - 2 * 576)
    assert NF4_BYTES == 0.5 + 1 / 64 + 4 / (64 * 256)  # double quantisation, as load_4bit asks
    # embeddings and norms in fp32 (prepare_model_for_kbit_training), adapters fp32, projections NF4
    assert t["fp32 weights"] == NF4_BYTES * pq + 4 * (SMOLLM2_P + pl - pq)
    assert t["AdamW state"] == 8 * pl
    ds = _terms(plan(_cfg(*qlora, "trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=2"), SMOLLM2))
    assert ds["bf16 weights"] == NF4_BYTES * pq + 2 * (SMOLLM2_P + pl - pq)


def test_critics_and_checkpointing():
    head = _terms(plan(_cfg(preset="ppo_arith"), SMOLLM2))
    assert head["AdamW state, sharded"] == 8 * (SMOLLM2_P + 577) / 2  # the value head trains with the policy
    sep = _terms(plan(_cfg("algorithm.critic=separate", preset="ppo_arith"), SMOLLM2))
    assert sep["AdamW state, sharded"] == 8 * SMOLLM2_P / 2  # the head is on the critic, its own full model
    critic_adamw = sep["critic: AdamW state, sharded"]
    assert critic_adamw == 2 * sep["critic: fp32 gradients, sharded"] == 8 * (SMOLLM2_P + 577) / 2
    ckpt = _terms(plan(_cfg("trainer.gradient_checkpointing=true"), SMOLLM2))
    assert ckpt["activations, checkpointed (c=2.3, +1 layer c=52)"] == 4096 * 576 * (30 * 2.3 + 52)


def test_generator_replicas_and_format():
    p = plan(_cfg("generator.num_replicas=3", "generator.kv_cache_gb=2"), SMOLLM2)
    gen = p.roles[1]
    assert (gen.name, gen.count) == ("generator replica", 3)
    assert gen.total("CPU") == 2 * SMOLLM2_P + 2 * GiB + HOST_OVERHEAD["generator"]
    assert p.run_total("CPU") == 2 * p.roles[0].total("CPU") + 3 * gen.total("CPU")
    text = format_plan(p)
    assert f"whole run (2 x trainer worker + 3 x generator replica): CPU {p.run_total('CPU') / GiB:.2f} GiB" in text
    assert "formula: generator replica = 2*P + kv_cache_gb + const" in text
    sft = plan(_cfg("train.eval_before=false", "train.eval_after=false", preset="sft_arith"), SMOLLM2)
    assert sft.roles[1].count == 0 and any("no generator replicas" in n for n in sft.notes)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raylign", "plan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_prints_the_zero3_plan():
    out = _cli("configs/grpo_arith.yaml", "trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=3",
               "trainer.num_workers=2")
    assert out.returncode == 0, out.stderr
    lines = {line[2:54].strip(): line for line in out.stdout.splitlines() if line.startswith("  ")}
    # 8 * 134,515,008 / 2 B = 513.1 MiB; 2 * 134,515,008 / 2 = 128.3 MiB; 4 * P / 2 = 256.6 MiB
    assert lines["AdamW state, partitioned"].endswith("513.1 MiB")
    assert lines["bf16 weights, partitioned"].endswith("128.3 MiB")
    assert lines["fp32 master weights, partitioned"].endswith("256.6 MiB")
    assert "deepspeed ZeRO-3 x 2 workers" in out.stdout
    worker = plan(_cfg("trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=3"), SMOLLM2).roles[0].total("CPU")
    assert lines["total per worker"].endswith(f"CPU {worker / GiB:.2f} GiB")


def test_cli_bad_value_is_one_line():
    out = _cli("configs/grpo_arith.yaml", "trainer.backend=zero")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith("raylign: config error: override 'trainer.backend=zero': field 'trainer.backend'")
