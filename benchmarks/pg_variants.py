"""Policy-gradient variants on arith difficulty 2: GRPO, Dr.GRPO, DAPO, GSPO, CISPO and REINFORCE++.

SmolLM2-135M-Instruct, each variant from its preset (configs/<variant>_arith.yaml; Dr.GRPO is grpo_arith with
``normalize_std=false loss_agg=fixed``) with the same seed, task, batch (6 prompts x 8 samples), learning rate
and training wall-clock budget (``--budget-s``, evals not counted). Held-out greedy accuracy on the same
problems every ``--eval-every`` steps. Each variant runs in a fresh process with its own local Ray cluster.
On a CPU without AVX512-BF16 or AMX the model trains and generates in float32 (``_parts.FP32_IF_NO_BF16``:
bf16 is slow there). Writes benchmarks/results/pg_variants.json (per variant: ``accuracy_curve`` against steps and
seconds, ``best_accuracy``, ``seconds_per_step``) and pg_variants.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parts import FP32_IF_NO_BF16, run_part  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "grpo": ("grpo_arith.yaml", []),
    "dr_grpo": ("grpo_arith.yaml", ["algorithm.normalize_std=false", "algorithm.loss_agg=fixed"]),
    "dapo": ("dapo_arith.yaml", []),
    "gspo": ("gspo_arith.yaml", []),
    "cispo": ("cispo_arith.yaml", []),
    "reinforce_pp": ("reinforcepp_arith.yaml", []),
}
COMMON = ["env.difficulty=2", "env.num_problems=400", "algorithm.prompts_per_step=6", "algorithm.group_size=8",
          "generator.max_new_tokens=40", "trainer.lr=2e-5", "trainer.warmup_steps=1", "trainer.num_workers=1",
          "tracking.enabled=false", "seed=0", "train.steps=1000"]


def _settings() -> dict:
    return {"budget_s": float(os.environ.get("RAYLIGN_BENCH_BUDGET_S", "420")),
            "eval_every": int(os.environ.get("RAYLIGN_BENCH_EVAL_EVERY", "2")),
            "eval_n": int(os.environ.get("RAYLIGN_BENCH_EVAL_N", "60")),
            "extra": [a for a in os.environ.get("RAYLIGN_BENCH_EXTRA", "").split() if a]}


def _device_overrides() -> list[str]:
    import torch

    return [] if torch.cuda.is_available() else FP32_IF_NO_BF16


def part(name: str) -> dict:
    from raylign.algorithms.registry import ALGORITHMS
    from raylign.config import load_config
    from raylign.envs import make_env
    from raylign.models import load_tokenizer, resolve_model
    from raylign.orchestrator.checkpoint import PromptStream
    from raylign.orchestrator.cluster import ray_cluster
    from raylign.orchestrator.evaluate import evaluate
    from raylign.orchestrator.rl_cluster import RayCluster

    s = _settings()
    preset, variant = VARIANTS[name]
    cfg = load_config(ROOT / "configs" / preset, [*COMMON, *_device_overrides(), *variant, *s["extra"]])
    path = resolve_model(cfg.model)
    env = make_env(cfg.env, cfg.dataset)
    stream = PromptStream(env.problems("train"), cfg.algorithm.prompts_per_step, cfg.seed)
    held_out = env.problems("test")[:s["eval_n"]]
    curve, step_s, state, train_s, step = [], [], {}, 0.0, 0
    with ray_cluster(cfg.ray):
        rc = RayCluster(cfg, path, load_tokenizer(path), run_id=f"bench-pg-{name}",
                        storage_dir=f"/tmp/raylign-bench-pg-{name}")
        rc.prompt_source = stream.take  # DAPO's dynamic sampling draws its extra prompts here
        greedy = rc.generators.spec(n=1, temperature=0.0)

        def point(metrics: dict) -> None:
            acc, _ = evaluate(held_out, rc.prompt_ids(held_out), rc.rollouts, rc.rewards, greedy, desc=name)
            curve.append({"step": step, "train_s": train_s, "accuracy": acc["accuracy"], **metrics})
            print(f"{name} step={step} t={train_s:.0f}s acc={acc['accuracy']:.3f}", flush=True)

        point({})
        while train_s < s["budget_s"]:
            rc.reseed(step)
            started = time.perf_counter()
            out = ALGORITHMS[cfg.algorithm.name].step(rc, stream.next(), cfg.algorithm, state)
            step_s.append(time.perf_counter() - started)
            train_s += step_s[-1]
            step += 1
            if step % s["eval_every"] == 0 or train_s >= s["budget_s"]:
                point({"reward": out.metrics["reward/mean"],
                       **{k: v for k, v in out.metrics.items() if k.startswith("filter/")}})
        rc.shutdown()
    return {"preset": preset, "overrides": variant, "accuracy_curve": curve, "steps": step, "train_s": train_s,
            "seconds_per_step": train_s / max(1, step), "best_accuracy": max(p["accuracy"] for p in curve),
            "tokens_generated": rc.tokens_generated}


def summarise(results: dict, settings: dict, note: str) -> dict:
    grpo = results.get("grpo", {}).get("best_accuracy")
    return {
        "config": {"model": "smollm2-135m-instruct", "env": "arith difficulty 2", "common_overrides": COMMON,
                   "device_overrides": _device_overrides(), **settings, "note": note},
        "variants": results,
        "best_accuracy": {k: v["best_accuracy"] for k, v in results.items()},
        "seconds_per_step": {k: v["seconds_per_step"] for k, v in results.items()},
        "best_accuracy_minus_grpo": None if grpo is None else {k: v["best_accuracy"] - grpo for k, v in results.items()},
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in summary["variants"].items():
        ys = [100 * p["accuracy"] for p in res["accuracy_curve"]]
        axes[0].plot([p["step"] for p in res["accuracy_curve"]], ys, marker="o", label=name)
        axes[1].plot([p["train_s"] for p in res["accuracy_curve"]], ys, marker="o", label=name)
    axes[0].set_xlabel("training steps (6 prompts x 8 samples)")
    axes[1].set_xlabel("training wall-clock (s, evals excluded)")
    for ax in axes:
        ax.set_ylabel("held-out greedy accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"arith d2, SmolLM2-135M: policy-gradient variants, {summary['config']['budget_s']:.0f} s each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=sorted(VARIANTS))
    parser.add_argument("--budget-s", type=float, help="training seconds per variant (default 420)")
    parser.add_argument("--eval-every", type=int, help="steps between held-out evals (default 2)")
    parser.add_argument("--eval-n", type=int, help="held-out problems (default 60)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--extra", default="", help="more config overrides for every variant, space-separated")
    parser.add_argument("--note", default="", help="stored in the JSON (e.g. how small the run is)")
    parser.add_argument("--merge", action="store_true", help="add to the variants already in pg_variants.json")
    args = parser.parse_args()
    for flag, var in (("budget_s", "BUDGET_S"), ("eval_every", "EVAL_EVERY"), ("eval_n", "EVAL_N")):
        if getattr(args, flag) is not None:
            os.environ[f"RAYLIGN_BENCH_{var}"] = str(getattr(args, flag))
    if args.extra:
        os.environ["RAYLIGN_BENCH_EXTRA"] = args.extra
    if args.part:
        print("RESULT " + json.dumps(part(args.part)))
        return
    saved = RESULTS / "pg_variants.json"
    results = json.loads(saved.read_text())["variants"] if args.merge and saved.exists() else {}
    results.update({name: run_part(__file__, name) for name in args.variants.split(",")})
    summary = summarise(results, _settings(), args.note)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pg_variants.json").write_text(json.dumps(summary, indent=2))
    plot(summary, RESULTS / "pg_variants.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "variants"}, indent=2))


if __name__ == "__main__":
    main()
