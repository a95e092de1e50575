"""AutoDSPy: the learned pipeline choice against every fixed pipeline and a uniformly random one, task-model
throughput with 1 and 2 replicas, and the judge's share of the reward.

SmolLM2-135M-Instruct is the policy, the task model and the judge (the judge shares the task model's pool),
bf16, or fp32 on CPUs without AVX512-BF16/AMX (``_parts.FP32_IF_NO_BF16``: bf16 takes a slow path there). Each part
runs in a fresh process.

- ``fixed``: the eval questions (``--eval-n`` per kind, test split) scored with every action in the space
  (2 modules x 15 signatures) through the real reward actors: accuracy per pipeline (the regex stage's exact
  verdict), ``best_fixed_accuracy`` (the best single pipeline), ``random_accuracy`` (the mean over pipelines:
  the expected accuracy of a uniformly random choice), and the judge's share (judged samples; reward mass
  that came from the judge). ``examples_per_s``: programs scored per second by the reward pool, the first
  ``--speed-n`` actions, with ``dspy.num_replicas`` 1 and 2.
- ``learned``: an SFT warm-up on the action format (``--warmup-steps`` steps on train questions paired with
  uniformly drawn pipelines: the warm policy writes valid actions and chooses at random), then GRPO (the
  autodspy_grpo preset) for ``--steps`` steps on the train split of the same size, then its greedy eval on the
  same test questions as ``fixed``: ``learned_accuracy`` and the chosen-pipeline distribution before and after.

``--data offline`` (arith + synthetic two-hop, the product default) or ``files`` (GSM8K + HotpotQA from
../shared/data). Writes benchmarks/results/autodspy.json (one section per data source) and autodspy_<data>.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parts import FP32_IF_NO_BF16  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SHARED = ROOT.parent / "shared" / "data"
COMMON = [*FP32_IF_NO_BF16, "generator.kv_cache_gb=0.5"]


def data_overrides(data: str, eval_n: int) -> list[str]:
    if data == "offline":
        return [f"dspy.num_math={eval_n}", f"dspy.num_multihop={eval_n}"]
    return [f"dspy.gsm8k_path={SHARED}/gsm8k/{{split}}.jsonl",
            f"dspy.hotpotqa_path={SHARED}/hotpotqa/dev_distractor_sample.jsonl", f"dspy.limit_each={eval_n}",
            "dspy.max_new_tokens=160"]


def part_fixed(args) -> dict:
    from raylign.config import load_config
    from raylign.envs import make_env
    from raylign.envs.dspy.actions import SIGNATURES, module_name
    from raylign.orchestrator.cluster import ray_cluster
    from raylign.orchestrator.lm_service import service_counters, start_services, stop_services
    from raylign.orchestrator.reward_pool import RewardPool

    out: dict = {"per_pipeline": {}, "examples_per_s": {}}
    for replicas in (1, 2):
        cfg = load_config(ROOT / "configs/autodspy_grpo.yaml", [
            *COMMON, *data_overrides(args.data, args.eval_n), f"dspy.num_replicas={replicas}",
            "reward.concurrency=64", "reward.timeout_s=600"]).absolutized()
        problems = make_env(cfg.env, cfg.dataset, cfg.rag, cfg=cfg).problems("test")
        actions = [f"{module_name(m)} | {s}" for m in cfg.dspy.modules for s in SIGNATURES]
        with ray_cluster(cfg.ray):
            services = start_services(cfg)
            pool = RewardPool(cfg.env, cfg.dataset, cfg.reward, full_cfg=cfg, services=services)
            try:
                todo = actions if replicas == 1 else actions[:args.speed_n]
                for action in todo:
                    start = time.perf_counter()
                    scores = pool.score([(p, action) for p in problems])
                    seconds = time.perf_counter() - start
                    if replicas == 1:
                        out["per_pipeline"][action] = summarise(problems, scores, seconds)
                    out["examples_per_s"].setdefault(str(replicas), []).append(len(problems) / seconds)
                out[f"counters_{replicas}_replicas"] = service_counters(services)
            finally:
                pool.shutdown()
                stop_services(services)
    rates = out.pop("examples_per_s")
    # the same first speed_n actions on both layouts
    out["examples_per_s"] = {k: sum(v[:args.speed_n]) / len(v[:args.speed_n]) for k, v in rates.items()}
    per = out["per_pipeline"]
    out["questions"] = {"n": len(problems), "kinds": {k: sum(p.meta["kind"] == k for p in problems)
                                                      for k in ("math", "multihop")}}
    out["best_fixed_pipeline"] = max(per, key=lambda a: per[a]["accuracy"])
    out["best_fixed_accuracy"] = per[out["best_fixed_pipeline"]]["accuracy"]
    out["random_accuracy"] = sum(v["accuracy"] for v in per.values()) / len(per)
    for kind in ("math", "multihop"):
        out[f"best_fixed_{kind}"] = max((v[f"accuracy_{kind}"], a) for a, v in per.items())
    judged = sum(v["judged"] for v in per.values())
    out["judge_share_of_samples"] = judged / sum(v["n"] for v in per.values())
    total = sum(v["reward_sum"] for v in per.values())
    out["judge_share_of_reward"] = sum(v["judge_reward_sum"] for v in per.values()) / total if total else 0.0
    return out


def summarise(problems, scores, seconds: float) -> dict:
    def acc(kind=None):
        picked = [s for p, s in zip(problems, scores) if kind is None or p.meta["kind"] == kind]
        return sum(s.correct for s in picked) / max(1, len(picked))

    comp = [s.info.get("components", {}) for s in scores]
    return {"n": len(scores), "accuracy": acc(), "accuracy_math": acc("math"), "accuracy_multihop": acc("multihop"),
            "reward_mean": sum(s.reward for s in scores) / len(scores),
            "judged": sum(c.get("dspy_judged", 0.0) for c in comp),
            "reward_sum": sum(s.reward for s in scores),
            "judge_reward_sum": sum(s.reward for s, c in zip(scores, comp) if c.get("dspy_judged")),
            "adapter_parse_errors": sum(c.get("dspy_adapter_parse_error", 0.0) for c in comp),
            "seconds": seconds}


def warmup_data(args, path: Path) -> int:
    """SFT rows teaching the action format: each train question with pipelines drawn uniformly from the action
    space (``--warmup-per-question`` per question), so the warm policy is a uniform-random chooser that writes
    valid actions; GRPO then has to learn which pipeline pays. SmolLM2-135M untrained answers the question
    instead of choosing (every action unparsed before and after 10 GRPO steps: reward 0, no signal)."""
    import random

    from raylign.config import load_config
    from raylign.envs import make_env
    from raylign.envs.dspy.actions import SIGNATURES, module_name

    cfg = load_config(ROOT / "configs/autodspy_grpo.yaml", data_overrides(args.data, args.eval_n)).absolutized()
    problems = make_env(cfg.env, cfg.dataset, cfg.rag, cfg=cfg).problems("train")
    actions = [f"{module_name(m)} | {s}" for m in cfg.dspy.modules for s in SIGNATURES]
    rng = random.Random(0)
    rows = [{"prompt": p.messages, "completion": rng.choice(actions)}
            for p in problems for _ in range(args.warmup_per_question)]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def part_learned(args) -> dict:
    import raylign
    from raylign.orchestrator.pipeline_plot import pipeline_table

    work = Path(tempfile.mkdtemp(prefix="raylign-autodspy-"))
    overrides = [*COMMON, *data_overrides(args.data, args.eval_n), f"train.steps={args.steps}",
                 f"train.eval_limit={2 * args.eval_n}", "train.checkpoint_every=0",
                 f"output_dir={work}/run", f"tracking.uri=sqlite:///{work}/mlflow.db"]
    warm_rows = 0
    if args.warmup_steps:
        warm_rows = warmup_data(args, work / "actions.jsonl")
        overrides += [f"train.sft_warmup_steps={args.warmup_steps}", f"train.sft_warmup_data={work}/actions.jsonl",
                      "train.sft_warmup_batch_size=8", f"trainer.lr={args.lr}"]
    start = time.perf_counter()
    summary = raylign.train(str(ROOT / "configs/autodspy_grpo.yaml"), overrides)
    wall = time.perf_counter() - start
    before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
    return {"steps": args.steps, "warmup_steps": args.warmup_steps, "warmup_rows": warm_rows, "lr": args.lr,
            "wall_s": wall, "train_s": summary["timing"].get("train"),
            "learned_accuracy": after.get("accuracy"), "accuracy_before": before.get("accuracy"),
            "eval_n": after.get("n", 2 * args.eval_n),
            "pipelines": pipeline_table({"before": before, "after": after}),
            "reward_curve": history(summary["mlflow_run_id"], f"sqlite:///{work}/mlflow.db", "reward/mean"),
            "parsed_curve": history(summary["mlflow_run_id"], f"sqlite:///{work}/mlflow.db", "reward/dspy_parsed"),
            "judged_curve": history(summary["mlflow_run_id"], f"sqlite:///{work}/mlflow.db", "reward/dspy_judged"),
            "overrides": overrides}


def history(run_id: str, uri: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = result["fixed"]["per_pipeline"]
    names = sorted(fixed, key=lambda a: fixed[a]["accuracy"])
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.barh(names, [fixed[a]["accuracy"] for a in names], color="#999", label="fixed pipeline")
    ax.axvline(result["fixed"]["random_accuracy"], color="k", ls=":", label="uniformly random choice")
    learned = result.get("learned", {}).get("learned_accuracy")
    if learned is not None:
        ax.axvline(learned, color="C3", lw=2, label=f"learned (GRPO, {result['learned']['steps']} steps)")
    ax.set_xlabel("held-out accuracy (regex stage, exact)")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"AutoDSPy on {result['data']} data, SmolLM2-135M policy + task model, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, section: dict, out_path: Path) -> None:
    """The headline keys from the parts run so far, the JSON and the plot."""
    fixed, learned = section.get("fixed", {}), section.get("learned", {})
    section.update({k: fixed[k] for k in ("best_fixed_accuracy", "random_accuracy", "examples_per_s",
                                         "judge_share_of_samples", "judge_share_of_reward") if k in fixed})
    if "learned_accuracy" in learned:
        section["learned_accuracy"] = learned["learned_accuracy"]
    RESULTS.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    if fixed:
        plot(section, RESULTS / f"autodspy_{section['data']}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["fixed", "learned", "all"], default="all")
    parser.add_argument("--data", choices=["offline", "files"], default="offline")
    parser.add_argument("--eval-n", type=int, default=20, help="eval questions per kind (files: per file)")
    parser.add_argument("--speed-n", type=int, default=4, help="actions timed with 1 and 2 task-model replicas")
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps of the learned part")
    parser.add_argument("--warmup-steps", type=int, default=20,
                        help="SFT steps on uniformly drawn valid actions before GRPO (0: none)")
    parser.add_argument("--warmup-per-question", type=int, default=4, help="warm-up rows per train question")
    parser.add_argument("--lr", type=float, default=3e-5, help="trainer.lr of the warm-up and GRPO")
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # one part in this process
        result = part_fixed(args) if args.part == "fixed" else part_learned(args)
        print("RESULT " + json.dumps(result))
        return
    out_path = RESULTS / "autodspy.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    section = results.setdefault(args.data, {"data": args.data})
    for part in (["fixed", "learned"] if args.part == "all" else [args.part]):
        cmd = [sys.executable, __file__, "--side", "--part", part, "--data", args.data, "--eval-n", str(args.eval_n),
               "--speed-n", str(args.speed_n), "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
               "--warmup-per-question", str(args.warmup_per_question), "--lr", str(args.lr)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"part {part} failed:\n{proc.stderr[-4000:]}")
        section[part] = json.loads(lines[-1][len("RESULT "):])
        section.setdefault("commands", {})[part] = "python benchmarks/autodspy.py " + " ".join(sys.argv[1:])
        write(results, section, out_path)  # after each part: a later part's failure keeps the earlier ones
    print(json.dumps({k: v for k, v in section.items() if not isinstance(v, dict) or k == "examples_per_s"}, indent=2))


if __name__ == "__main__":
    main()
