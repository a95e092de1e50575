"""`raylign eval`: greedy accuracy (or pass@k when sampling) of a model on an env, through the actors."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from raylign.algorithms.policy_gradient import component_means
from raylign.chat import encode_chat
from raylign.config import Config
from raylign.types import Problem, Score
from raylign.models import load_tokenizer, resolve_model
from raylign.orchestrator.cluster import ray_cluster
from raylign.orchestrator.episodes import CombinedRewards, ToolEpisodes, rollout_stack
from raylign.orchestrator.generator_pool import GeneratorPool
from raylign.orchestrator.lm_service import service_counters, start_services
from raylign.orchestrator.preflight import plan_eval
from raylign.orchestrator.reward_pool import RewardPool
from raylign.orchestrator.tracking import Tracker
from raylign.types import Completion, SamplingSpec


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, eq. 1)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def eval_metrics(groups: list[list[Completion]], scores: list[list[Score]], k: int) -> dict[str, float]:
    flat = [s for group in scores for s in group]
    lengths = [len(c.token_ids) for group in groups for c in group]
    metrics = {
        "accuracy": sum(s.correct for s in flat) / max(1, len(flat)),
        "reward_mean": sum(s.reward for s in flat) / max(1, len(flat)),
        "format_rate": sum(s.format_ok for s in flat) / max(1, len(flat)),
        "response_len_mean": sum(lengths) / max(1, len(lengths)),
        "truncated_rate": sum(c.finish_reason == "length" for g in groups for c in g) / max(1, len(lengths)),
    }
    if k > 1:
        metrics[f"pass_at_{k}"] = sum(pass_at_k(len(g), sum(s.correct for s in g), k) for g in scores) / max(1, len(scores))
    return {**metrics, **component_means(flat), **pipeline_shares(flat)}


def pipeline_shares(scores: list[Score]) -> dict[str, float]:
    """The AutoDSPy pipeline distribution: ``pipeline/<kind>/<pipeline>`` = the share of that question kind's
    samples that chose it, its accuracy as ``pipeline_accuracy/<kind>/<pipeline>``, and each kind's accuracy
    as ``accuracy/<kind>`` (GSM8K vs HotpotQA, arith vs two-hop)."""
    tagged = [(s, s.info["tags"]) for s in scores if "pipeline" in s.info.get("tags", {})]
    out: dict[str, float] = {}
    for kind in sorted({t["kind"] for _, t in tagged}):
        of_kind = [(t["pipeline"], s.correct) for s, t in tagged if t["kind"] == kind]
        out[f"accuracy/{kind}"] = sum(c for _, c in of_kind) / len(of_kind)
        for pipeline in sorted({p for p, _ in of_kind}):
            hits = [c for p, c in of_kind if p == pipeline]
            out[f"pipeline/{kind}/{pipeline}"] = len(hits) / len(of_kind)
            out[f"pipeline_accuracy/{kind}/{pipeline}"] = sum(hits) / len(hits)
    return out


def evaluate(problems: list[Problem], prompts_ids: list[list[int]], gens: GeneratorPool | ToolEpisodes,
             rewards: RewardPool | CombinedRewards,
             spec: SamplingSpec, desc: str = "eval") -> tuple[dict[str, float], list[dict]]:
    """Generate, score and summarise; returns metrics and one record per sample."""
    with tqdm(total=len(problems), desc=desc, unit="prompt") as bar:
        groups = gens.generate(prompts_ids, spec, on_done=bar.update)
    flat = [(p, c.text) for p, group in zip(problems, groups, strict=True) for c in group]
    flat_scores = rewards.score(flat)
    scores = [flat_scores[i * spec.n:(i + 1) * spec.n] for i in range(len(problems))]
    records = [
        {"problem_id": p.id, "sample": j, "prompt": p.messages[-1]["content"], "completion": c.text,
         "prediction": s.prediction, "ground_truth": p.answer, "reward": s.reward, "correct": s.correct,
         "finish_reason": c.finish_reason, "tokens": len(c.token_ids), **s.info.get("tags", {})}
        for p, group, group_scores in zip(problems, groups, scores, strict=True)
        for j, (c, s) in enumerate(zip(group, group_scores, strict=True))
    ]
    return eval_metrics(groups, scores, spec.n), records


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def run_eval(cfg: Config, problems: list[Problem] | None = None) -> dict:
    """The whole `raylign eval` command. Everything that can fail on bad input fails before Ray starts.

    ``problems``: already loaded and checked by ``preflight.plan_eval`` (which also made ``cfg``'s paths
    absolute: no relative path may reach an actor, their working directories differ)."""
    if problems is None:
        cfg, problems = plan_eval(cfg)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    prompts_ids = [encode_chat(tokenizer, p.messages) for p in problems]
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    tracker = Tracker(cfg.tracking, run_name=out_dir.name)
    try:
        tracker.log_config(cfg)
        with ray_cluster(cfg.ray):
            gens = GeneratorPool(model_path, cfg.model, cfg.generator, cfg.fault, placement=cfg.ray.placement)
            services = start_services(cfg)
            rewards = RewardPool(cfg.env, cfg.dataset, cfg.reward, rag_cfg=cfg.rag, fault_cfg=cfg.fault, full_cfg=cfg,
                                 services=services)
            rollouts, rewards = rollout_stack(cfg, gens, rewards, tokenizer)
            metrics, records = evaluate(problems, prompts_ids, rollouts, rewards, gens.spec())
            metrics.update({f"reward_events/{k}": v for k, v in rewards.counters().items()})
            metrics.update(service_counters(services))
        write_jsonl(out_dir / "samples.jsonl", records)
        summary = {**metrics, "n": len(problems), "samples_per_problem": cfg.generator.n, "model": cfg.model.name,
                   "model_path": model_path, "dataset": cfg.dataset.path or f"builtin:{cfg.env.name}",
                   "env": cfg.env.name, "split": cfg.dataset.split, "mlflow_run_id": tracker.run_id,
                   "output_dir": str(out_dir)}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.log_metrics(metrics)
        for name in ("summary.json", "samples.jsonl", "config.yaml"):
            tracker.log_artifact(out_dir / name)
        tracker.close()
    except BaseException:
        tracker.close(status="FAILED")
        raise
    return summary
