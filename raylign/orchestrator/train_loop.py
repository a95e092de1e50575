"""`raylign train`: the RL loop on a local or attached Ray cluster.

eval before -> for each step: next prompts -> ALGORITHMS[name] step (generate, score, advantages, train,
sync) -> log to MLflow + rollouts.jsonl -> checkpoint when due -> final checkpoint, HF export, eval after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from raylign.algorithms.policy_gradient import StepOutput, policy_gradient_step
from raylign.algorithms.ppo import ppo_step
from raylign.algorithms.vineppo import vineppo_step
from raylign.config import Config
from raylign.envs import make_env
from raylign.envs.base import Problem
from raylign.models import load_tokenizer, resolve_model
from raylign.orchestrator.checkpoint import (PromptStream, latest_checkpoint, read_driver_state,
                                             save_checkpoint)
from raylign.orchestrator.cluster import ray_cluster
from raylign.orchestrator.evaluate import evaluate
from raylign.orchestrator.rl_cluster import RayCluster
from raylign.orchestrator.tracking import Tracker

ALGORITHMS = {"grpo": policy_gradient_step, "rloo": policy_gradient_step, "reinforce": policy_gradient_step,
              "ppo": ppo_step, "vineppo": vineppo_step}


def run_eval_phase(cluster: RayCluster, problems: list[Problem], name: str, out_dir: Path) -> dict:
    spec = cluster.generators.spec(n=1, temperature=0.0)
    with cluster.timer.phase(name):
        metrics, records = evaluate(problems, cluster.prompt_ids(problems), cluster.rollouts, cluster.rewards,
                                    spec, desc=name)
    with (out_dir / f"{name}.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return metrics


def rollout_records(step: int, problems: list[Problem], out: StepOutput) -> list[dict]:
    return [
        {"step": step, "prompt_id": p.id, "sample": j, "prompt": p.messages[-1]["content"], "completion": c.text,
         "prediction": s.prediction, "ground_truth": p.answer, "reward": s.reward, "correct": s.correct,
         "advantage": float(out.advantages_P_G[i, j]), "tokens": len(c.token_ids), "policy_version": c.policy_version}
        for i, (p, group, scores) in enumerate(zip(problems, out.groups, out.scores, strict=True))
        for j, (c, s) in enumerate(zip(group, scores, strict=True))
    ]


def _trim_rollouts(path: Path, before_step: int) -> None:
    """On resume, drop rows the interrupted run wrote after its last checkpoint."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= before_step]
        path.write_text("".join(row + "\n" for row in rows))


def train(cfg: Config, reward_fn=None) -> dict:
    """The whole training run; bad config, data or model names fail before Ray starts."""
    started = time.perf_counter()
    env = make_env(cfg.env, cfg.dataset, cfg.rag)
    train_problems = env.problems("train")
    eval_problems = env.problems(cfg.train.eval_split)[:cfg.train.eval_limit]
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    out_dir = cfg.resolved_output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    ckpt = latest_checkpoint(out_dir / "checkpoints") if cfg.train.resume == "auto" else None
    state = read_driver_state(ckpt) if ckpt else {}
    tracker = Tracker(cfg.tracking, run_name=out_dir.name, resume_run_id=state.get("mlflow_run_id"))
    if not ckpt:
        tracker.log_config(cfg)
    stream = PromptStream(train_problems, cfg.algorithm.prompts_per_step, cfg.seed)
    try:
        with ray_cluster(cfg.ray):
            cluster = RayCluster(cfg, model_path, tokenizer, run_id=tracker.run_id or out_dir.name,
                                 storage_dir=str((out_dir / "ray_train").absolute()), reward_fn=reward_fn)
            try:
                summary = _loop(cfg, cluster, stream, eval_problems, tracker, out_dir, ckpt, state)
            finally:
                cluster.shutdown()
        summary["wall_s"] = time.perf_counter() - started
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.log_artifact(out_dir / "summary.json")
        tracker.log_artifact(out_dir / "config.yaml")
        tracker.close()
    except BaseException:
        tracker.close(status="FAILED")
        raise
    return summary


def _loop(cfg, cluster: RayCluster, stream: PromptStream, eval_problems, tracker: Tracker, out_dir: Path,
          ckpt: Path | None, state: dict) -> dict:
    algo_state: dict = state.get("algorithm", {})
    start_step = state.get("step", 0)
    evals = state.get("evals", {})
    if ckpt:
        cluster.trainer.load_checkpoint(str(ckpt))
        stream.load_state_dict(state["data"])
        cluster.push_weights(state["policy_version"])
        cluster.tokens_generated = state.get("tokens_generated", 0)
    elif cfg.train.eval_before:
        evals["eval_before"] = run_eval_phase(cluster, eval_problems, "eval_before", out_dir)
        tracker.log_metrics({f"eval/{k}": v for k, v in evals["eval_before"].items()}, step=0)
    rollouts = out_dir / "rollouts.jsonl"
    _trim_rollouts(rollouts, start_step)
    timing_totals: dict[str, float] = dict(state.get("timing", {}))

    def driver_state(step: int) -> dict:
        return {"policy_version": cluster.version, "data": stream.state_dict(), "algorithm": algo_state,
                "mlflow_run_id": tracker.run_id, "evals": evals, "tokens_generated": cluster.tokens_generated,
                "timing": timing_totals}

    bar = tqdm(range(start_step, cfg.train.steps), desc="train", unit="step", initial=start_step, total=cfg.train.steps)
    for step in bar:
        problems = stream.next()
        cluster.reseed(step)
        step_start, tokens_before = time.perf_counter(), cluster.tokens_generated
        out = ALGORITHMS[cfg.algorithm.name](cluster, problems, cfg.algorithm, algo_state)
        step_s = time.perf_counter() - step_start
        phases = cluster.timer.pop()
        for k, v in phases.items():
            timing_totals[k] = timing_totals.get(k, 0.0) + v
        metrics = {**out.metrics, **phases, "timing/step": step_s,
                   "timing/overhead": step_s - sum(phases.values()),
                   "perf/tokens_per_s": (cluster.tokens_generated - tokens_before) / step_s}
        tracker.log_metrics(metrics, step=step + 1)
        with rollouts.open("a") as f:
            for r in rollout_records(step + 1, problems, out):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['accuracy/train']:.2f}")
        due = cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0
        if due and step + 1 < cfg.train.steps:
            save_checkpoint(out_dir / "checkpoints", step + 1, cluster.trainer.save_checkpoint,
                            driver_state(step + 1), cfg.train.keep_checkpoints)
    final_ckpt = save_checkpoint(out_dir / "checkpoints", cfg.train.steps, cluster.trainer.save_checkpoint,
                                 driver_state(cfg.train.steps), cfg.train.keep_checkpoints)
    final_model = out_dir / "final_model"
    cluster.trainer.export_hf(str(final_model))
    if cfg.train.eval_after:
        evals["eval_after"] = run_eval_phase(cluster, eval_problems, "eval_after", out_dir)
        tracker.log_metrics({f"eval/{k}": v for k, v in evals["eval_after"].items()}, step=cfg.train.steps)
    for k, v in cluster.timer.pop().items():
        timing_totals[k] = timing_totals.get(k, 0.0) + v
    return {"steps": cfg.train.steps, "algorithm": cfg.algorithm.name, "model": cfg.model.name, **evals,
            "timing": {k.removeprefix("timing/"): v for k, v in timing_totals.items()},
            "tokens_generated": cluster.tokens_generated, "policy_version": cluster.version,
            "mlflow_run_id": tracker.run_id, "final_model_dir": str(final_model.absolute()),
            "final_checkpoint": str(final_ckpt), "rollouts": str(out_dir / "rollouts.jsonl"),
            "reward_events": cluster.rewards.counters()}
