"""Scale-out: weight sync by transport, the sender's memory while syncing, and asynchronous against synchronous
training, on SmolLM2-135M-Instruct (CPU).

Parts, each a fresh process:
- ``sync_file`` / ``sync_ray``: a local cluster (1 Ray Train worker, 1 vLLM generator) syncs SYNCS times with
  trainer.weight_transport=file, then =ray (object store, trainer.sync_bucket_mb buckets). Per sync: seconds
  (save + load), and the trainer worker's peak RSS during it (VmHWM reset before each sync) over its RSS
  before, against the model's bf16 size. Medians over the syncs after the first, and over the later half
  (``RAYLIGN_BENCH_SYNCS``, default 4): the sender's first syncs run long while it maps fresh pages.
- ``sync_two_nodes``: the same with ``ray`` across two Ray nodes on this machine (`ray start --head` plus a
  worker with its own temp dir; trainer pinned to the head, generator to the worker): each raylet has its own
  object store, so the buckets travel between them as between machines (over loopback here).
- ``async_0`` / ``async_1`` / ``async_2``: the demo's GRPO run (configs/grpo_arith.yaml, STEPS steps) with
  algorithm.max_staleness 0 (synchronous), 1 and 2 (tis_cap 2.0): steps/s over the steps after the first,
  the time generators and trainer each sat idle, and held-out greedy accuracy after the run.
Ray Direct Transport is not measured: Ray Train's worker class cannot declare the tensor_transport method
the receiving side needs (README, "More than one machine"). Writes benchmarks/results/scale_out.json and .png.
Run: ``python benchmarks/scale_out.py`` (about 25 minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _parts import FP32_IF_NO_BF16, run_part  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SYNCS = int(os.environ.get("RAYLIGN_BENCH_SYNCS", "4"))
STEPS = int(os.environ.get("RAYLIGN_BENCH_STEPS", "8"))
BASE = ["tracking.enabled=false", "seed=0", "train.checkpoint_every=0", "trainer.num_workers=1", *FP32_IF_NO_BF16]
PARTS = ["sync_file", "sync_ray", "sync_two_nodes", "async_0", "async_1", "async_2"]


def _rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def sync_part(transport: str, address: str | None = None, placement: list[str] = ()) -> dict:
    from raylign.config import load_config
    from raylign.models import load_tokenizer, resolve_model
    from raylign.orchestrator.cluster import ray_cluster
    from raylign.orchestrator.rl_cluster import RayCluster

    extra = [f"ray.address={address}"] if address else []
    cfg = load_config(ROOT / "configs/grpo_arith.yaml", BASE + extra + list(placement) + [
        f"trainer.weight_transport={transport}", "trainer.sync_check_every=0", "train.eval_before=false"])
    path = resolve_model(cfg.model)
    model_mb = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 2**20
    with ray_cluster(cfg.ray):
        rc = RayCluster(cfg, path, load_tokenizer(path), run_id=f"bench-sync-{transport}",
                        storage_dir=f"/tmp/raylign-bench-sync-{transport}")
        pid, syncs = rc.trainer.worker_pids[0], []
        for _ in range(SYNCS):
            before = _rss_mb(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            started = time.perf_counter()
            metrics = rc.sync_weights()
            syncs.append({"seconds": time.perf_counter() - started, "save_s": metrics["sync/save_s"],
                          "load_s": metrics["sync/load_s"], "peak_extra_mb": _rss_mb(pid, "VmHWM") - before})
        layout = rc.sync_layout
        rc.shutdown()
    steady = syncs[1:]  # the first pays one-off costs (first object-store pages, engine warm-up)
    # The sender's first few syncs also run long (fresh object-store and heap pages): the later half is what a
    # run of hundreds of syncs sees.
    late = syncs[len(syncs) // 2:]
    return {"transport": transport, "model_bf16_mb": model_mb, "syncs": syncs, "layout": layout,
            "seconds_median": statistics.median(s["seconds"] for s in steady),
            "seconds_median_later_half": statistics.median(s["seconds"] for s in late),
            "peak_extra_mb_max": max(s["peak_extra_mb"] for s in steady)}


def two_node_part() -> dict:
    from tests.integration.helpers import free_port, start_ray_node, stop_ray_node

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    os.environ["RAY_AUTH_MODE"] = "token"
    gcs = free_port()
    nodes = [start_ray_node(env, num_cpus=4, resources={"node_a": 1}, gcs_port=gcs, dashboard_port=free_port())]
    try:
        time.sleep(8)
        nodes.append(start_ray_node(env, head_port=gcs, num_cpus=4, resources={"node_b": 1}))
        time.sleep(8)
        return sync_part("ray", f"127.0.0.1:{gcs}", ["trainer.resources_per_worker={node_a: 0.01}",
                                                     "generator.resources={node_b: 0.01}", "reward.resources={node_a: 0.01}"])
    finally:
        for proc, temp_dir in reversed(nodes):
            stop_ray_node(proc, temp_dir)


def async_part(k: int) -> dict:
    from raylign.config import load_config
    from raylign.train import train

    out = Path(f"/tmp/raylign-bench-async-{k}")
    overrides = BASE + [f"train.steps={STEPS}", f"output_dir={out}", "train.eval_before=false", "train.report=false"]
    if k:
        overrides += [f"algorithm.max_staleness={k}", "algorithm.tis_cap=2.0"]
    summary = train(load_config(ROOT / "configs/grpo_arith.yaml", overrides))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["metrics"] for r in rows if r["kind"] == "grpo"]
    later = steps[1:]
    return {"max_staleness": k, "steps": STEPS, "step_s": [m["timing/step"] for m in steps],
            "steps_per_s": len(later) / sum(m["timing/step"] for m in later),
            "trainer_wait_s": sum(m.get("async/trainer_wait_s", m.get("timing/generate", 0.0)) for m in later),
            "generate_ahead_s": sum(m.get("async/generate_ahead_s", 0.0) for m in later),
            "staleness_mean": statistics.mean(m.get("async/staleness_mean", 0.0) for m in later),
            "reward_mean": [m["reward/mean"] for m in steps], "accuracy_after": summary["eval_after"]["accuracy"]}


def part(name: str) -> dict:
    if name.startswith("sync_") and name != "sync_two_nodes":
        return sync_part(name.removeprefix("sync_"))
    if name == "sync_two_nodes":
        return two_node_part()
    return async_part(int(name.removeprefix("async_")))


def summarise(parts: dict) -> dict:
    out = {"config": {"model": "smollm2-135m-instruct", "preset": "configs/grpo_arith.yaml", "base_overrides": BASE,
                      "syncs": SYNCS, "async_steps": STEPS, "command": "python benchmarks/scale_out.py"},
           "parts": parts}
    out["sync_seconds"] = {k: v["seconds_median"] for k, v in parts.items() if k.startswith("sync_")}
    out["sync_seconds_later_half"] = {k: v["seconds_median_later_half"] for k, v in parts.items()
                                      if k.startswith("sync_") and "seconds_median_later_half" in v}
    out["sync_peak_extra_mb_over_model_mb"] = {k: v["peak_extra_mb_max"] / v["model_bf16_mb"]
                                               for k, v in parts.items() if k.startswith("sync_")}
    sync_speed = parts.get("async_0", {}).get("steps_per_s")
    out["async_speedup"] = {k: v["steps_per_s"] / sync_speed for k, v in parts.items()
                            if k.startswith("async_") and sync_speed}
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(summary["sync_seconds"])
    axes[0].bar(names, [summary["sync_seconds"][n] for n in names])
    axes[0].set_ylabel("seconds per sync (median)")
    axes[0].set_title("SmolLM2-135M weight sync by transport")
    runs = {k: v for k, v in summary["parts"].items() if k.startswith("async_")}
    for name, run in runs.items():
        axes[1].plot(range(1, len(run["step_s"]) + 1), run["step_s"], marker="o", label=f"max_staleness={run['max_staleness']}")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("step seconds")
    axes[1].set_title("GRPO demo run: synchronous vs asynchronous")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=PARTS)
    parser.add_argument("--only", nargs="*", choices=PARTS, help="measure these parts (default: all)")
    args = parser.parse_args()
    if args.part:
        print("RESULT " + json.dumps(part(args.part)))
        return
    saved = RESULTS / "scale_out.json"
    parts = json.loads(saved.read_text())["parts"] if saved.is_file() and args.only else {}
    for name in args.only or PARTS:
        parts[name] = run_part(__file__, name)
        print(name, json.dumps({k: v for k, v in parts[name].items() if not isinstance(v, (list, dict))}), flush=True)
    summary = summarise(parts)
    RESULTS.mkdir(exist_ok=True)
    saved.write_text(json.dumps(summary, indent=2))
    plot(summary, RESULTS / "scale_out.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "parts"}, indent=2))


if __name__ == "__main__":
    main()
