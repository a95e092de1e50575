"""Credit assignment on arith: PPO (value-head critic, GAE), VinePPO (Monte Carlo step values) and GRPO.

SmolLM2-135M-Instruct on CPU, arith difficulty 1 (the demo's task: base greedy accuracy about 45%, and GRPO
reaches about 90% in 16 steps, so a few minutes show a curve), 8 prompts x 4 samples per iteration, 40 new
tokens, the same seed, learning rate
and batch for all three. Each algorithm gets the same training wall-clock budget (BUDGET_S, evals not
counted) and is evaluated greedily on the same held-out problems every EVAL_EVERY iterations. Each runs in
a fresh process with its own local Ray cluster (1 vLLM-cpu generator, 1 Ray Train worker, 1 reward actor).

Reported: accuracy against iterations, optimizer steps and wall-clock; tokens generated for training and,
for VinePPO, tokens spent on MC rollouts (never trained on); and ``vineppo_steps_to_ppo_best_ratio`` =
(iterations PPO needed to reach its best accuracy) / (iterations VinePPO needed to reach that accuracy);
above 1 means VinePPO got there in fewer steps, null if it never did. Writes
benchmarks/results/credit_assignment.json and credit_assignment.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parts import run_part  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_S = float(os.environ.get("RAYLIGN_BENCH_BUDGET_S", "420"))
EVAL_EVERY = int(os.environ.get("RAYLIGN_BENCH_EVAL_EVERY", "2"))
EVAL_N = int(os.environ.get("RAYLIGN_BENCH_EVAL_N", "60"))
PRESETS = {"ppo": "ppo_arith.yaml", "vineppo": "vineppo_arith.yaml", "grpo": "grpo_arith.yaml"}
COMMON = ["env.difficulty=1", "env.num_problems=400", "algorithm.prompts_per_step=8", "algorithm.group_size=4",
          "generator.max_new_tokens=40", "algorithm.temperature=1.0",
          "trainer.lr=2e-5", "trainer.warmup_steps=1", "trainer.num_workers=1",
          "algorithm.kl_beta=0.0", "tracking.enabled=false", "seed=0", "train.steps=1000"]


def part(name: str) -> dict:
    from raylign.config import load_config
    from raylign.envs import make_env
    from raylign.models import load_tokenizer, resolve_model
    from raylign.orchestrator.checkpoint import PromptStream
    from raylign.orchestrator.cluster import ray_cluster
    from raylign.orchestrator.evaluate import evaluate
    from raylign.orchestrator.rl_cluster import RayCluster
    from raylign.algorithms.registry import ALGORITHMS

    extra = ["algorithm.mc_max_new_tokens=40"] if name == "vineppo" else []
    cfg = load_config(ROOT / "configs" / PRESETS[name], COMMON + extra)
    path = resolve_model(cfg.model)
    env = make_env(cfg.env, cfg.dataset)
    stream, held_out = PromptStream(env.problems("train"), cfg.algorithm.prompts_per_step, cfg.seed), \
        env.problems("test")[:EVAL_N]
    curve, state, train_s, it = [], {}, 0.0, 0
    with ray_cluster(cfg.ray):
        rc = RayCluster(cfg, path, load_tokenizer(path), run_id=f"bench-{name}", storage_dir=f"/tmp/raylign-bench-{name}")
        greedy = rc.generators.spec(n=1, temperature=0.0)

        def point(extra: dict) -> None:
            metrics, _ = evaluate(held_out, rc.prompt_ids(held_out), rc.generators, rc.rewards, greedy, desc=name)
            curve.append({"iteration": it, "train_s": train_s, "accuracy": metrics["accuracy"],
                          "tokens_train": rc.tokens_generated, "tokens_mc": rc.mc_tokens, **extra})
            print(f"{name} it={it} t={train_s:.0f}s acc={metrics['accuracy']:.3f}", flush=True)

        point({"optimizer_steps": 0})
        while train_s < BUDGET_S:
            rc.reseed(it)
            started = time.perf_counter()
            out = ALGORITHMS[name].step(rc, stream.next(), cfg.algorithm, state)
            train_s += time.perf_counter() - started
            it += 1
            if it % EVAL_EVERY == 0 or train_s >= BUDGET_S:
                point({"optimizer_steps": out.metrics.get("train/optimizer_steps", 0.0),
                       "reward": out.metrics["reward/mean"]})
        rc.shutdown()
    return {"curve": curve, "iterations": it, "train_s": train_s, "tokens_train": curve[-1]["tokens_train"],
            "tokens_mc_rollouts": curve[-1]["tokens_mc"], "config": PRESETS[name]}


def steps_to_reach(curve: list[dict], accuracy: float) -> int | None:
    return next((p["iteration"] for p in curve if p["accuracy"] >= accuracy), None)


def summarise(results: dict) -> dict:
    ppo_best = max(p["accuracy"] for p in results["ppo"]["curve"])
    ppo_steps = steps_to_reach(results["ppo"]["curve"], ppo_best)
    vine_steps = steps_to_reach(results["vineppo"]["curve"], ppo_best)
    ratio = ppo_steps / vine_steps if vine_steps else None
    # Under a short budget VinePPO may stop before PPO's best; compare at the best accuracy both reached too.
    common = max(a for a in {p["accuracy"] for p in results["ppo"]["curve"]}
                 if steps_to_reach(results["vineppo"]["curve"], a) is not None)
    common_ratio = steps_to_reach(results["ppo"]["curve"], common) / max(1, steps_to_reach(results["vineppo"]["curve"], common))
    vine = results["vineppo"]
    return {
        "config": {"model": "smollm2-135m-instruct", "env": "arith difficulty 1", "common_overrides": COMMON,
                   "budget_s": BUDGET_S, "eval_every": EVAL_EVERY, "eval_problems": EVAL_N},
        "algorithms": results,
        "ppo_best_accuracy": ppo_best, "ppo_steps_to_best": ppo_steps, "vineppo_steps_to_ppo_best": vine_steps,
        "vineppo_steps_to_ppo_best_ratio": ratio,
        "best_common_accuracy": common, "vineppo_steps_ratio_at_best_common_accuracy": common_ratio,
        "seconds_per_iteration": {k: v["train_s"] / max(1, v["iterations"]) for k, v in results.items()},
        "vineppo_mc_token_overhead": vine["tokens_mc_rollouts"] / max(1, vine["tokens_train"]),
        "best_accuracy": {k: max(p["accuracy"] for p in v["curve"]) for k, v in results.items()},
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in summary["algorithms"].items():
        xs = [p["iteration"] for p in res["curve"]]
        ts = [p["train_s"] / 60 for p in res["curve"]]
        ys = [100 * p["accuracy"] for p in res["curve"]]
        axes[0].plot(xs, ys, marker="o", label=name)
        axes[1].plot(ts, ys, marker="o", label=name)
    axes[0].set_xlabel("training iterations (32 samples each; PPO and VinePPO: 2 epochs x 2 minibatches)")
    axes[1].set_xlabel("training wall-clock (min, evals excluded)")
    for ax in axes:
        ax.set_ylabel("held-out greedy accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("arith d1, SmolLM2-135M, CPU: PPO vs VinePPO vs GRPO, same wall-clock budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=sorted(PRESETS))
    parser.add_argument("--replot", action="store_true", help="re-summarise and re-plot the saved results")
    args = parser.parse_args()
    if args.part:
        print("RESULT " + json.dumps(part(args.part)))
        return
    saved = json.loads((RESULTS / "credit_assignment.json").read_text()) if args.replot else None
    results = saved["algorithms"] if saved else {name: run_part(__file__, name) for name in ("ppo", "vineppo", "grpo")}
    summary = summarise(results)
    if saved:
        summary["config"] = saved["config"]  # the settings the saved curves were measured with
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "credit_assignment.json").write_text(json.dumps(summary, indent=2))
    plot(summary, RESULTS / "credit_assignment.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "algorithms"}, indent=2))


if __name__ == "__main__":
    main()
