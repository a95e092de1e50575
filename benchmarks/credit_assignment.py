"""VinePPO's claim at small scale (Kazemnejad et al. 2024): Monte Carlo credit assignment reaches PPO's best
accuracy in fewer gradient steps than PPO's value network, on a multi-step task, from an SFT warm start.

Task: arith difficulty 6, chains of 3-5 operations written one step per line, strict "Final:" reward.
Model: SmolLM2-135M-Instruct after a short SFT on the project's worked solutions (configs/sft_arith_chain.yaml,
run once and kept in runs/bench-credit/sft). From that checkpoint, PPO (value-head critic, GAE with
gamma = lam = 1), VinePPO with K = 3 and K = 9 continuations per step boundary, and GRPO each train for the
same ITERATIONS (the same optimizer steps: every algorithm does 2 epochs x 2 minibatches per batch), with a
wall-clock cap per run (CAP_S, evals and probes not counted), for each seed in SEEDS. Every run is a fresh
process with its own local Ray cluster (1 vLLM generator, 1 Ray Train worker, 1 reward actor). Held-out greedy
accuracy every EVAL_EVERY iterations on the same EVAL_N test problems.

Reported per algorithm and seed: the accuracy curve (iterations, optimizer steps, train seconds), MC tokens
per iteration and the share of the iteration the MC rollouts take; the paper's two ratios per seed (same
seed's PPO run as reference): ``vineppo_steps_to_ppo_best_ratio`` = (iterations VinePPO needs to reach PPO's
best accuracy) / (iterations PPO needs to reach it), and the same in training wall-clock (below 1: VinePPO
is faster; null where VinePPO never reached it), with mean, min and max; ``value_mc_correlation``: at
iteration 0 and every PROBE_EVERY iterations of each PPO run, the critic's V(s) against a K = 9 MC estimate
at the step boundaries of PROBE_PROMPTS x 2 fresh samples (``raylign.algorithms.value_probe``).

Each finished run is saved under benchmarks/results/credit_assignment.parts/ and reused on the next start
(delete the folder to re-measure). Writes benchmarks/results/credit_assignment.json and .png
(RAYLIGN_BENCH_NAME=x: x.parts, x.json, x.png, for a reduced run kept apart).
Here (2 CPU cores): ``python benchmarks/credit_assignment.py`` (defaults below, about 3 hours; a CPU without
bf16 support runs in fp32).
On a GPU (the paper's scale is GSM8K with a 1B+ model): ``RAYLIGN_BENCH_ITERATIONS=200
RAYLIGN_BENCH_PROMPTS=64 RAYLIGN_BENCH_GROUP=8 RAYLIGN_BENCH_CAP_S=7200 RAYLIGN_BENCH_EVAL_N=500
RAYLIGN_BENCH_OVERRIDES="trainer.num_workers=4 generator.num_replicas=2" python benchmarks/credit_assignment.py``
(the gpu extra installs CUDA vLLM; the presets' other settings stay).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parts import FP32_IF_NO_BF16, run_part  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
NAME = os.environ.get("RAYLIGN_BENCH_NAME", "credit_assignment")  # results file stem: a reduced run names its own
PARTS = RESULTS / f"{NAME}.parts"
SFT_DIR = ROOT / "runs/bench-credit/sft"
_env = os.environ.get
ITERATIONS = int(_env("RAYLIGN_BENCH_ITERATIONS", "10"))
CAP_S = float(_env("RAYLIGN_BENCH_CAP_S", "900"))
SEEDS = [int(s) for s in _env("RAYLIGN_BENCH_SEEDS", "0,1,2").split(",")]
EVAL_EVERY = int(_env("RAYLIGN_BENCH_EVAL_EVERY", "2"))
EVAL_N = int(_env("RAYLIGN_BENCH_EVAL_N", "60"))
PROBE_EVERY = int(_env("RAYLIGN_BENCH_PROBE_EVERY", "5"))
PROBE_PROMPTS = int(_env("RAYLIGN_BENCH_PROBE_PROMPTS", "6"))
OVERRIDES = FP32_IF_NO_BF16 + _env("RAYLIGN_BENCH_OVERRIDES", "").split()
# algorithm -> (preset, its own overrides)
VARIANTS = {
    "ppo": ("ppo_arith.yaml", []),
    "vineppo_k3": ("vineppo_arith.yaml", ["algorithm.mc_rollouts=3"]),
    "vineppo_k9": ("vineppo_arith.yaml", ["algorithm.mc_rollouts=9"]),
    "grpo": ("grpo_arith.yaml", []),
}
VINE = ["algorithm.mc_max_new_tokens=80", "algorithm.max_steps_per_response=6", "algorithm.step_split=newline"]
COMMON = ["env.difficulty=6", "env.num_problems=400", f"algorithm.prompts_per_step={_env('RAYLIGN_BENCH_PROMPTS', '6')}",
          f"algorithm.group_size={_env('RAYLIGN_BENCH_GROUP', '4')}", "algorithm.epochs=2", "algorithm.minibatches=2",
          "generator.max_new_tokens=80", "algorithm.temperature=1.0", "trainer.lr=1e-5", "trainer.warmup_steps=1",
          "trainer.num_workers=1", "algorithm.kl_beta=0.0", "tracking.enabled=false",
          "train.steps=1000"]


def sft_checkpoint() -> Path:
    """The warm start: configs/sft_arith_chain.yaml trained once through the CLI, as a user runs it."""
    model = SFT_DIR / "final_model"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "raylign", "train", "configs/sft_arith_chain.yaml",
                        f"output_dir={SFT_DIR.relative_to(ROOT)}", "tracking.enabled=false", *OVERRIDES],
                       cwd=ROOT, check=True)
    return model


def part(spec: str) -> dict:
    """One run, ``algorithm@seed`` (``untuned@0``: only the untuned model's greedy accuracy)."""
    from raylign.algorithms.registry import ALGORITHMS
    from raylign.algorithms.value_probe import critic_vs_mc
    from raylign.config import load_config
    from raylign.envs import make_env
    from raylign.models import load_tokenizer, resolve_model
    from raylign.orchestrator.checkpoint import PromptStream
    from raylign.orchestrator.cluster import ray_cluster
    from raylign.orchestrator.evaluate import evaluate
    from raylign.orchestrator.rl_cluster import RayCluster

    name, seed = spec.split("@")
    preset, extra = VARIANTS[name] if name in VARIANTS else ("grpo_arith.yaml", [])
    start = [] if name == "untuned" else [f"model.name={sft_checkpoint()}"]
    cfg = load_config(ROOT / "configs" / preset, COMMON + extra + (VINE if "vine" in name else []) + start
                      + [f"seed={seed}"] + OVERRIDES)
    path = resolve_model(cfg.model)
    env = make_env(cfg.env, cfg.dataset)
    train_set, held_out = env.problems("train"), env.problems("test")[:EVAL_N]
    stream = PromptStream(train_set, cfg.algorithm.prompts_per_step, cfg.seed)
    probe_set = train_set[-PROBE_PROMPTS:]  # the probe's prompts: a few train ones, rarely trained on here
    curve, probes, iters, state, train_s, it = [], [], [], {}, 0.0, 0
    with ray_cluster(cfg.ray):
        rc = RayCluster(cfg, path, load_tokenizer(path), run_id=f"bench-{name}-{seed}",
                        storage_dir=f"/tmp/raylign-bench-{name}-{seed}")
        greedy = rc.generators.spec(n=1, temperature=0.0)

        def point(optimizer_steps: float) -> None:
            metrics, records = evaluate(held_out, rc.prompt_ids(held_out), rc.generators, rc.rewards, greedy,
                                        desc=spec)
            lines = statistics.mean(r["completion"].count("\n") + 1 for r in records)
            curve.append({"iteration": it, "optimizer_steps": optimizer_steps, "train_s": train_s,
                          "accuracy": metrics["accuracy"], "response_lines": lines})
            print(f"{spec} it={it} t={train_s:.0f}s acc={metrics['accuracy']:.3f}", flush=True)
            if name == "ppo" and (it % PROBE_EVERY == 0 or it == ITERATIONS or train_s >= CAP_S):
                rc.reseed(10_000 + it)
                probe = critic_vs_mc(rc, probe_set, samples=2, mc_rollouts=9, temperature=1.0,
                                     step_split="newline", max_steps=6, mc_max_new_tokens=80)
                probes.append({"iteration": it, **probe})
                print(f"{spec} it={it} critic-vs-MC r={probe['correlation']} states={probe['states']}", flush=True)

        point(0.0)
        while name != "untuned" and it < ITERATIONS and train_s < CAP_S:
            rc.reseed(it)
            rc.timer.pop()
            started = time.perf_counter()
            out = ALGORITHMS[cfg.algorithm.name].step(rc, stream.next(), cfg.algorithm, state)
            step_s = time.perf_counter() - started
            train_s += step_s
            it += 1
            timing = rc.timer.pop()
            iters.append({"iteration": it, "step_s": step_s, "reward": out.metrics["reward/mean"],
                          "mc_tokens": out.metrics.get("tokens/mc_rollouts", 0.0),
                          "mc_s": timing.get("timing/mc_rollouts", 0.0)})
            if it % EVAL_EVERY == 0 or it == ITERATIONS or train_s >= CAP_S:
                point(out.metrics.get("train/optimizer_steps", 0.0))
        rc.shutdown()
    return {"curve": curve, "iterations": iters, "value_probes": probes, "train_s": train_s,
            "model": cfg.model.name if name == "untuned" else "sft", "preset": preset}


def steps_to_reach(curve: list[dict], accuracy: float, key: str = "iteration") -> float | None:
    return next((p[key] for p in curve if p["accuracy"] >= accuracy - 1e-9), None)


def spread(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    return {"mean": statistics.mean(got) if got else None, "min": min(got, default=None),
            "max": max(got, default=None), "per_seed": values, "seeds_reached": len(got)}


def ratios(runs: dict, vine: str, seeds: list[int]) -> dict:
    """Per seed: VinePPO's iterations (and train seconds) to reach that seed's PPO best, over PPO's own."""
    steps, wall = [], []
    for seed in seeds:
        ppo, other = runs["ppo"][seed]["curve"], runs[vine][seed]["curve"]
        best = max(p["accuracy"] for p in ppo)
        ppo_it, ppo_s = steps_to_reach(ppo, best), steps_to_reach(ppo, best, "train_s")
        vine_it, vine_s = steps_to_reach(other, best), steps_to_reach(other, best, "train_s")
        steps.append(vine_it / ppo_it if vine_it is not None and ppo_it else None)
        wall.append(vine_s / ppo_s if vine_s is not None and ppo_s else None)
    return {"steps": spread(steps), "wallclock": spread(wall)}


def value_stats(probes_by_seed: list[list[dict]]) -> dict:
    """Per probed iteration: the critic-vs-MC correlation per seed, and over the pooled states of all seeds."""
    from raylign.algorithms.value_probe import pearson

    out = {}
    for it in sorted({p["iteration"] for probes in probes_by_seed for p in probes}):
        stage = [p for probes in probes_by_seed for p in probes if p["iteration"] == it]
        pairs = [pair for p in stage for pair in p["pairs"]]
        out[str(it)] = {"correlation": spread([p["correlation"] for p in stage]),
                        "pooled_correlation": pearson([a for a, _ in pairs], [b for _, b in pairs]),
                        "mae": statistics.mean(p["mae"] for p in stage), "states": len(pairs)}
    return out


def summarise(runs: dict) -> dict:
    """The table; with runs missing (``--replot`` mid-way), over the seeds every present algorithm finished."""
    algos = [a for a in VARIANTS if a in runs]
    seeds = sorted(set.intersection(*(set(runs[a]) for a in algos)))
    mc = {a: {"tokens_per_iteration": statistics.mean(i["mc_tokens"] for s in seeds for i in runs[a][s]["iterations"]),
              "share_of_iteration": sum(i["mc_s"] for s in seeds for i in runs[a][s]["iterations"])
              / max(1e-9, sum(i["step_s"] for s in seeds for i in runs[a][s]["iterations"]))}
          for a in algos if a.startswith("vineppo")}
    vine = {a: ratios(runs, a, seeds) for a in algos if a.startswith("vineppo")}
    return {
        "config": {"model": "smollm2-135m-instruct + SFT (configs/sft_arith_chain.yaml)",
                   "env": "arith difficulty 6 (3-5 step chains)", "common_overrides": COMMON + OVERRIDES,
                   "vineppo_overrides": VINE, "iterations": ITERATIONS, "cap_s": CAP_S, "seeds": seeds,
                   "command": " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("RAYLIGN_BENCH_"))
                   + " python benchmarks/credit_assignment.py",
                   "eval_every": EVAL_EVERY, "eval_problems": EVAL_N, "probe_prompts": PROBE_PROMPTS},
        "accuracy_untuned": runs["untuned"][0]["curve"][0]["accuracy"] if "untuned" in runs else None,
        "accuracy_after_sft": runs["ppo"][seeds[0]]["curve"][0]["accuracy"],
        "algorithms": {a: {str(s): runs[a][s] for s in seeds} for a in algos},
        "best_accuracy": {a: spread([max(p["accuracy"] for p in runs[a][s]["curve"]) for s in seeds]) for a in algos},
        "vineppo_steps_to_ppo_best_ratio": {a: r["steps"] for a, r in vine.items()},
        "vineppo_wallclock_to_ppo_best_ratio": {a: r["wallclock"] for a, r in vine.items()},
        "seconds_per_iteration": {a: statistics.mean(i["step_s"] for s in seeds for i in runs[a][s]["iterations"])
                                  for a in algos},
        "mc_rollouts": mc,
        "value_mc_correlation": value_stats([runs["ppo"][s]["value_probes"] for s in seeds]),
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, seeds in summary["algorithms"].items():
        for ax, key, scale in ((axes[0], "iteration", 1), (axes[1], "train_s", 60)):
            rows = [[(p[key] / scale, 100 * p["accuracy"]) for p in run["curve"]] for run in seeds.values()]
            n = min(map(len, rows))
            xs = [statistics.mean(r[i][0] for r in rows) for i in range(n)]
            ys = [[r[i][1] for r in rows] for i in range(n)]
            line, = ax.plot(xs, [statistics.mean(y) for y in ys], marker="o", label=name)
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
    axes[0].set_xlabel("training iterations (2 epochs x 2 minibatches each)")
    axes[1].set_xlabel("training wall-clock (min, evals excluded; mean over seeds)")
    for ax in axes:
        ax.set_ylabel("held-out greedy accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"arith chains, SmolLM2-135M after SFT, CPU: mean and min-max band over {len(summary['config']['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", help="one run, algorithm@seed (internal)")
    parser.add_argument("--replot", action="store_true", help="re-summarise and re-plot the saved runs")
    args = parser.parse_args()
    if args.part:
        print("RESULT " + json.dumps(part(args.part)))
        return
    PARTS.mkdir(parents=True, exist_ok=True)
    runs: dict = {}
    for name, seed in [("untuned", 0)] + [(a, s) for s in SEEDS for a in VARIANTS]:
        saved = PARTS / f"{name}@{seed}.json"
        if not saved.is_file():
            if args.replot:
                continue
            sft_checkpoint()
            saved.write_text(json.dumps(run_part(__file__, f"{name}@{seed}")))
        runs.setdefault(name, {})[seed] = json.loads(saved.read_text())
    summary = summarise(runs)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, RESULTS / f"{NAME}.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "algorithms"}, indent=2))


if __name__ == "__main__":
    main()
