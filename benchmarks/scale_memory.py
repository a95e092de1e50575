"""Memory and speed of the trainer backends on CPU: SmolLM2-135M under FSDP2, DeepSpeed ZeRO-0/2/3, with and
without LoRA, on 1 and 2 Ray Train workers; plus sync bytes and time, full weights vs adapter.

Each configuration starts its own TrainerGroup (the real Ray Train workers) inside one local Ray cluster, runs
``--steps`` GRPO-loss train steps on a fixed batch (``--seqs`` sequences of 64 prompt + 64 completion tokens),
then writes the weights for sync once. Peak RSS per worker is the kernel's high-water mark (VmHWM in
/proc/<pid>/status) of each worker process at the end, so it covers model load, DeepSpeed's start and the
steps. Training runs in the default bf16 where the CPU computes it natively (AVX512-BF16 or AMX) and in fp32
(``trainer.bf16=false``) elsewhere, where bf16 compute is several times slower; the JSON says which.

    .venv/bin/python benchmarks/scale_memory.py            # all configurations (~20 min here)
    .venv/bin/python benchmarks/scale_memory.py --only zero3_lora_w2 fsdp2_w2

Writes benchmarks/results/scale_memory.json after each configuration and scale_memory.png at the end.
Targets: LoRA sync bytes < 5% of a full sync; ZeRO-3 peak RSS per worker <= 0.6x ZeRO-0's with 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks/results"
LORA = {"enabled": True, "r": 8, "alpha": 16}
sys.path.insert(0, str(ROOT / "benchmarks"))
from _parts import cpu_has_bf16  # noqa: E402

BF16 = cpu_has_bf16()
DTYPE = "bfloat16" if BF16 else "float32"


def configurations() -> dict[str, dict]:
    out = {}
    for workers in (1, 2):
        for name, trainer in (("fsdp2", {"backend": "fsdp2"}),
                              ("zero0", {"backend": "deepspeed", "deepspeed": {"zero_stage": 0}}),
                              ("zero2", {"backend": "deepspeed", "deepspeed": {"zero_stage": 2}}),
                              ("zero3", {"backend": "deepspeed", "deepspeed": {"zero_stage": 3}})):
            for lora in (False, True):
                if lora and name == "zero0":
                    continue
                key = f"{name}{'_lora' if lora else ''}_w{workers}"
                out[key] = {**trainer, "num_workers": workers, **({"lora": LORA} if lora else {})}
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def make_batch(n: int, seed: int = 0):
    import torch

    from raylign.types import TrainBatch

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 40000, (64,), generator=gen).tolist() for _ in range(n)]
    completions = [torch.randint(10, 40000, (64,), generator=gen).tolist() for _ in range(n)]
    return TrainBatch(prompts, completions, [[1] * 64 for _ in range(n)])


def run_one(key: str, trainer: dict, model_path: str, steps: int, seqs: int, storage: str) -> dict:
    from raylign.config import ModelConfig, TrainerConfig
    from raylign.orchestrator.trainer_group import TrainerGroup
    from raylign.types import TrainBatch

    cfg = TrainerConfig(**trainer, lr=1e-5, bf16=BF16, micro_batch_tokens=4096, num_cpus_per_worker=1)
    started = time.monotonic()
    group = TrainerGroup(model_path, ModelConfig(name=model_path, dtype=DTYPE), cfg, seed=0,
                         storage_dir=storage, total_steps=steps)
    start_s = time.monotonic() - started
    try:
        batch = make_batch(seqs)
        step_s = []
        for k in range(steps):
            old = group.logprobs(batch)
            advantages = [1.0 if i % 2 else -1.0 for i in range(seqs)]
            pg = TrainBatch(batch.prompt_ids, batch.completion_ids, batch.loss_mask,
                            fields={"advantages_B": advantages, "old_logprobs_B_T": old})
            t = time.monotonic()
            metrics = group.train_step(pg, "policy_gradient", {"agg": "token"})
            step_s.append(time.monotonic() - t)
        sync_dir = Path(tempfile.mkdtemp(prefix="raylign-sync-", dir="/dev/shm"))
        target = sync_dir / ("adapter" if "lora" in trainer else "policy.safetensors")
        sync_s = group.save_weights(str(target))
        sync_bytes = group.last_sync_bytes
        rss = [peak_rss_mb(pid) for pid in group.worker_pids]
    finally:
        group.shutdown()
    return {"key": key, "trainer": trainer, "workers": trainer["num_workers"], "start_s": round(start_s, 1),
            "step_s": step_s, "step_s_median": statistics.median(step_s[1:] or step_s),
            "peak_rss_mb_per_worker": rss, "peak_rss_mb_max": max(rss), "sync_s": round(sync_s, 3),
            "sync_bytes": sync_bytes, "grad_norm_last": metrics["train/grad_norm"],
            "planned_mb_per_worker": round(planned_mb(trainer, seqs), 1)}


def planned_mb(trainer: dict, seqs: int) -> float:
    """`raylign plan`'s trainer-worker total for this configuration, with the tokens one rank gets."""
    from raylign.config import load_config
    from raylign.memory_plan import model_shape, plan, read_config_json

    tokens = max(64, seqs * 128 // trainer["num_workers"])
    cfg = load_config(overrides=[f"model.dtype={DTYPE}", f"trainer.bf16={BF16}", f"trainer.micro_batch_tokens={tokens}",
                                 "algorithm.kl_beta=0"], environ={})
    cfg = cfg.model_copy(update={"trainer": type(cfg.trainer).model_validate(
        {**cfg.trainer.model_dump(), **trainer, "bf16": BF16, "micro_batch_tokens": tokens})})
    result = plan(cfg, model_shape(read_config_json(cfg.model)))
    [role] = [r for r in result.roles if r.name.startswith("trainer")]
    return role.total("CPU") / 2**20


def targets(results: dict) -> dict:
    out = {}
    full, lora = results.get("zero3_w2"), results.get("zero3_lora_w2")
    if full and lora:
        out["lora_sync_bytes_ratio"] = lora["sync_bytes"] / full["sync_bytes"]
        out["lora_sync_bytes_target_met"] = out["lora_sync_bytes_ratio"] < 0.05
    zero0, zero3 = results.get("zero0_w2"), results.get("zero3_w2")
    if zero0 and zero3:
        out["zero3_vs_zero0_peak_rss_ratio_w2"] = zero3["peak_rss_mb_max"] / zero0["peak_rss_mb_max"]
        out["zero3_peak_rss_target_met"] = out["zero3_vs_zero0_peak_rss_ratio_w2"] <= 0.6
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    a.bar(keys, [results[k]["peak_rss_mb_max"] for k in keys], color="tab:blue")
    a.set_ylabel("peak RSS per worker (MB)")
    b.bar(keys, [results[k]["step_s_median"] for k in keys], color="tab:orange")
    b.set_ylabel("train step (s)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=70, labelsize=8)
    fig.suptitle(f"SmolLM2-135M on CPU ({DTYPE}): trainer backends, LoRA, 1 vs 2 workers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="configuration keys to run (default: all)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seqs", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from raylign.config import ModelConfig, RayConfig
    from raylign.models import resolve_model
    from raylign.orchestrator.cluster import ray_cluster

    model_path = resolve_model(ModelConfig(name="smollm2-135m-instruct"))
    path = OUT / "scale_memory.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    previous = saved.get("results", {}) if saved.get("dtype") == DTYPE else {}  # never mix dtypes in one table
    results = dict(previous)
    chosen = {k: v for k, v in configurations().items() if not args.only or k in args.only}
    with ray_cluster(RayConfig(num_cpus=8)), tempfile.TemporaryDirectory() as storage:
        for key, trainer in chosen.items():
            print(f"== {key}", flush=True)
            results[key] = run_one(key, trainer, model_path, args.steps, args.seqs, storage)
            print(json.dumps(results[key]), flush=True)
            path.write_text(json.dumps({"model": "smollm2-135m-instruct", "dtype": DTYPE, "steps": args.steps,
                                        "seqs": args.seqs, "results": results, "targets": targets(results)},
                                       indent=2))
    plot(results, OUT / "scale_memory.png")
    print(json.dumps(targets(results), indent=2))


if __name__ == "__main__":
    main()
