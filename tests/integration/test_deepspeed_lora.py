"""DeepSpeed ZeRO and LoRA in the real Ray Train workers (2 ranks, gloo) on tiny-random-llama.

Four groups start once (together): FSDP2 and ZeRO-2 on the full model, FSDP2 and ZeRO-3 with LoRA. Each
pair gets the same batches, so DeepSpeed is checked against FSDP2 on the first step (loss, gradient norm) and
after it (log-probs); each DeepSpeed group resumes a checkpoint bit-exactly; a LoRA step changes only adapter
tensors and its sync writes only them; a vLLM generator serving the synced adapter gives the trainer's log-probs.
"""

import json
import os
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from raylign.config import GeneratorConfig, ModelConfig, TrainerConfig
from raylign.orchestrator.generator_pool import GeneratorPool
from raylign.orchestrator.trainer_group import TrainerGroup
from raylign.types import TrainBatch
from tests.integration.test_trainer_group import BF16_ATOL, make_batch, max_diff, pg_batch

# 4 groups x 2 workers x 0.5 CPU leave half of the 8 logical CPUs for the generator test
CFG = dict(num_workers=2, lr=5e-3, warmup_steps=2, lr_schedule="linear", micro_batch_tokens=64, num_cpus_per_worker=0.5)
LORA = {"enabled": True, "r": 8, "alpha": 16}
ADVANTAGES = ([1.0, -1.0, 1.0, 0.0, -1.0], [-1.0, 1.0, 0.5, 1.0, 0.0])


def start(tiny_model, storage, **cfg) -> TrainerGroup:
    return TrainerGroup(tiny_model, ModelConfig(name=tiny_model), TrainerConfig(**CFG, **cfg), seed=0,
                        storage_dir=str(storage), total_steps=40, reference=True)


@pytest.fixture(scope="module")
def groups(ray_session, tiny_model, tmp_path_factory):
    """All four start at once (a start is mostly waiting on Ray Train, not computing)."""
    configs = {"fsdp2": dict(backend="fsdp2"), "zero2": dict(backend="deepspeed", deepspeed={"zero_stage": 2}),
               "fsdp2_lora": dict(backend="fsdp2", lora=LORA),
               "zero3_lora": dict(backend="deepspeed", deepspeed={"zero_stage": 3}, lora=LORA)}
    started = time.monotonic()
    with ThreadPoolExecutor(len(configs)) as pool:
        futures = {k: pool.submit(start, tiny_model, tmp_path_factory.mktemp("rt"), **c) for k, c in configs.items()}
        out = {k: f.result() for k, f in futures.items()}
    print(f"\nfour groups started in {time.monotonic() - started:.1f}s")
    yield out
    for g in out.values():
        g.shutdown()


@pytest.fixture(scope="module")
def full(groups):
    return groups["fsdp2"], groups["zero2"]


@pytest.fixture(scope="module")
def lora(groups):
    return groups["fsdp2_lora"], groups["zero3_lora"]


def weights(group, folder) -> dict[str, torch.Tensor]:
    group.save_checkpoint(str(folder))
    return load_file(str(folder / "trainer_model.safetensors"))


def two_steps(group, batch):
    return [group.train_step(pg_batch(group, batch, adv), "policy_gradient", {"agg": "token"}) for adv in ADVANTAGES]


def assert_parity(fsdp2, ds, batch):
    """First step: same loss and gradient norm (bf16 compute on both); after it, the same log-probs."""
    assert max_diff(ds.logprobs(batch), fsdp2.logprobs(batch)) < BF16_ATOL
    first = [g.train_step(pg_batch(g, batch, ADVANTAGES[0]), "policy_gradient", {"agg": "token"}) for g in (fsdp2, ds)]
    print("first step fsdp2 vs deepspeed:", {k: (first[0][k], first[1][k]) for k in ("loss/total", "train/grad_norm")})
    assert first[1]["train/grad_norm"] == pytest.approx(first[0]["train/grad_norm"], rel=1e-3)
    assert first[1]["loss/total"] == pytest.approx(first[0]["loss/total"], abs=1e-3)
    assert first[1]["train/lr"] == first[0]["train/lr"] and first[1]["train/optimizer_steps"] == 1
    after = max_diff(ds.logprobs(batch), fsdp2.logprobs(batch))
    print(f"log-probs after one step differ by {after:.4f}")
    assert after < BF16_ATOL


def assert_resumes_exactly(group, batch, tmp_path):
    group.save_checkpoint(str(tmp_path / "S"))
    metrics1, w1 = two_steps(group, batch), weights(group, tmp_path / "A")
    group.load_checkpoint(str(tmp_path / "S"))
    metrics2, w2 = two_steps(group, batch), weights(group, tmp_path / "B")
    assert metrics1 == metrics2
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    return load_file(str(tmp_path / "S" / "trainer_model.safetensors")), w1


def test_zero2_equals_fsdp2_and_resumes_exactly(full, tmp_path):
    fsdp2, zero2 = full
    batch = make_batch(seed=1)
    assert_parity(fsdp2, zero2, batch)
    saved, w1 = assert_resumes_exactly(zero2, batch, tmp_path)
    assert any(not torch.equal(saved[k], w1[k]) for k in saved)
    # the checkpoint layout is shared: FSDP2's weights load into the DeepSpeed group and come back unchanged
    theirs = weights(fsdp2, tmp_path / "F")
    zero2.load_checkpoint(str(tmp_path / "F"))
    assert all(torch.equal(theirs[k], v) for k, v in weights(zero2, tmp_path / "G").items())


def test_lora_on_fsdp2_and_zero3_trains_only_adapters(lora, tmp_path):
    fsdp2, zero3 = lora
    batch = make_batch(seed=2)
    start_w = weights(zero3, tmp_path / "0")
    assert_parity(fsdp2, zero3, batch)
    # the reference is the policy with its adapter off: still the base model after a step
    assert max_diff(zero3.logprobs(batch, which="ref"), fsdp2.logprobs(batch, which="ref")) < BF16_ATOL
    assert max_diff(zero3.logprobs(batch, which="ref"), zero3.logprobs(batch)) > 1e-3
    saved, w1 = assert_resumes_exactly(zero3, batch, tmp_path)
    changed = {k for k in start_w if not torch.equal(start_w[k], w1[k])}
    assert changed and all(".lora_" in k for k in changed)  # (lora_A moves once lora_B is non-zero)
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)


def test_adapter_sync_is_small_and_vllm_serves_the_trainers_log_probs(lora, tiny_model, tmp_path):
    fsdp2, zero3 = lora
    full_bytes = sum(t.numel() * 2 for t in load_file(f"{tiny_model}/model.safetensors").values())
    for group in (fsdp2, zero3):
        group.save_weights(str(tmp_path / "adapter"))
        assert 0 < group.last_sync_bytes < 0.05 * full_bytes
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors"}
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum(t.numel() * t.element_size() for t in adapter.values()) == zero3.last_sync_bytes

    cfg = GeneratorConfig(max_new_tokens=8, temperature=0.0, n=1, kv_cache_gb=0.25)
    pool = GeneratorPool(tiny_model, ModelConfig(name=tiny_model), cfg, lora_rank=8)
    try:
        pool.load_weights(str(tmp_path / "adapter"), 1)
        assert pool.policy_versions() == [1]
        prompts = [p for p in make_batch(seed=3).prompt_ids[:3]]
        groups = pool.generate(prompts, pool.spec(), on_done=lambda n: None)
        completions = [g[0] for g in groups]
        served = TrainBatch(prompts, [c.token_ids for c in completions], [[1] * len(c.token_ids) for c in completions])
        trainer = zero3.logprobs(served)
        gap = max_diff([c.logprobs for c in completions], trainer)
        print(f"vLLM with the synced adapter vs the trainer: max |logp diff| {gap:.4f}")
        assert gap < 0.15  # bf16 engine vs bf16 trainer, the tolerance of the full-weight sync test
        base = max_diff([c.logprobs for c in completions], zero3.logprobs(served, which="ref"))
        assert base > gap  # the adapter is what the engine serves, not the base weights
    finally:
        pool.shutdown()


@pytest.mark.gpu
def test_qlora_trains_a_4bit_base(ray_session, tiny_model, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("QLoRA (bitsandbytes NF4) needs a GPU")
    group = TrainerGroup(tiny_model, ModelConfig(name=tiny_model),
                         TrainerConfig(**{**CFG, "num_workers": 1}, backend="ddp", use_gpu=True,
                                       lora={**LORA, "quantize": "4bit"}), seed=0,
                         storage_dir=str(tmp_path / "rt"), total_steps=40, reference=True)
    try:
        batch = make_batch(seed=4)
        before = weights(group, tmp_path / "0")
        metrics = two_steps(group, batch)
        after = weights(group, tmp_path / "1")
        assert metrics[-1]["train/optimizer_steps"] == 2 and metrics[-1]["train/grad_norm"] > 0
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(".lora_" in k for k in changed)
    finally:
        group.shutdown()


def test_cli_zero3_lora_run_syncs_adapters_and_exports_both_forms(tmp_path):
    """`raylign train` with ZeRO-3 + LoRA from relative paths, then `raylign export --merge` and `--adapter`:
    the merged folder and base + adapter both reproduce the trained (fp32 checkpoint) policy in transformers."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient
    from peft import PeftModel

    from raylign.actors.lora import apply_lora
    from raylign.config import LoraConfig
    from raylign.models import load_hf_model, resolve_model
    from tests.integration.helpers import PRESET, TINY

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def _raylign(cwd, *args, timeout=400):
        proc = subprocess.run([sys.executable, "-m", "raylign", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc
    from tests.integration.test_trainer_group import hf_logprobs

    run_args = ["model.name=tiny-random-llama", *TINY, "ray.num_cpus=6", "tracking.uri=sqlite:///mlflow.db",
                "train.checkpoint_every=1"]  # relative: resolved in the subprocess's working directory
    _raylign(tmp_path, "train", str(PRESET), *run_args, "train.steps=2", "train.eval_before=false",
             "trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=3", "trainer.lora.enabled=true",
             "trainer.lora.r=8", "trainer.lora.alpha=16", "trainer.lr=0.02", "generator.backend=vllm",
             "train.sft_warmup_steps=2",  # the tiny model never earns an arith reward: SFT moves the adapter
             "output_dir=runs/lora", timeout=600)
    run = tmp_path / "runs/lora"
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["eval_after"]["accuracy"] <= 1  # the eval ran on the generators serving the adapter
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [mlflow_run] = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    synced = [m.value for m in client.get_metric_history(mlflow_run.info.run_id, "sync/bytes")]
    tiny = resolve_model(ModelConfig(name="tiny-random-llama"))
    full_bytes = sum(t.numel() * 2 for t in load_file(f"{tiny}/model.safetensors").values())
    assert len(synced) >= 2 and all(0 < b < 0.05 * full_bytes for b in synced)

    _raylign(tmp_path, "export", "runs/lora", "--merge", "--out", "runs/lora/merged")
    _raylign(tmp_path, "export", "runs/lora", "--adapter")
    assert {p.name for p in (run / "export-adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    bad = subprocess.run([sys.executable, "-m", "raylign", "export", "runs/nope"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "runs/nope: no complete checkpoint" in bad.stderr

    trained = apply_lora(load_hf_model(tiny, "float32"), LoraConfig(enabled=True, r=8, alpha=16), seed=0)
    trained.load_state_dict(load_file(str(Path(summary["final_checkpoint"]) / "trainer_model.safetensors")))
    batch = make_batch(seed=6)
    want = hf_logprobs(trained.eval(), batch)
    moved = max_diff(hf_logprobs(load_hf_model(tiny, "float32").eval(), batch), want)
    merged_gap = max_diff(hf_logprobs(load_hf_model(str(run / "merged"), "float32").eval(), batch), want)
    adapted = PeftModel.from_pretrained(load_hf_model(tiny, "float32"), str(run / "export-adapter"))
    adapter_gap = max_diff(hf_logprobs(adapted.eval(), batch), want)
    print(f"training moved log-probs by {moved:.4f}; export gaps: merged {merged_gap:.4f}, adapter {adapter_gap:.4f}")
    # bf16 files read in fp32: the gaps are rounding, far below what two steps changed
    assert moved > 0.1 and merged_gap < 0.25 * moved and adapter_gap < 0.25 * moved
