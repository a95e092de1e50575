"""Chaos: the demo's 16-step GRPO run on arith (SmolLM2-135M-Instruct) with a generator replica, a trainer
worker and a reward actor SIGKILLed at seeded random steps, against the same run unfaulted.

Each run is a fresh process with its own local Ray cluster (`raylign.train` on configs/grpo_arith.yaml, the
`make demo` preset; tracking off). Faults, each on its own step, chosen by ``random.Random(SEED)``:
- generator: the replica's process is killed 1 s into the step's generate call;
- trainer: the worker's process is killed 0.5 s into the step's train call;
- reward: the actor's process is killed as the step's score call starts.
Seconds lost per fault: how much longer the faulted step took, from its first start to its last completion
(replayed steps included), than the same step of the unfaulted run. Writes benchmarks/results/chaos.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parts import cpu_has_bf16, run_part  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SEED = int(os.environ.get("RAYLIGN_CHAOS_SEED", "0"))
STEPS = 16
OVERRIDES = [f"train.steps={STEPS}", "tracking.enabled=false", "seed=0"]


if not cpu_has_bf16():
    OVERRIDES += ["model.dtype=float32", "trainer.bf16=false"]
# Extra overrides for both runs, e.g. RAYLIGN_CHAOS_EXTRA="fault.max_lost_steps=1"; results then go to
# chaos_<overrides>.json
EXTRA = os.environ.get("RAYLIGN_CHAOS_EXTRA", "").split()
OVERRIDES += EXTRA


def fault_plan(seed: int) -> dict[str, int]:
    """Step (1-based) at which each role is killed: distinct steps, not the first (nothing to lose yet)."""
    steps = random.Random(seed).sample(range(2, STEPS), 3)
    return dict(zip(["generator", "trainer", "reward"], steps, strict=True))


def _kill_later(pid: int, delay_s: float) -> None:
    threading.Timer(delay_s, os.kill, (pid, signal.SIGKILL)).start()


def part(name: str) -> dict:
    import ray

    import raylign

    plan = fault_plan(SEED) if name == "faulted" else {}
    events: list[tuple[float, str, int]] = []
    killed: dict[str, float] = {}

    def hook(phase: str, step: int, cluster) -> None:
        events.append((time.monotonic(), phase, step))
        for role, at in plan.items():
            if step != at or role in killed:
                continue
            if role == "generator" and phase == "generate":
                killed[role] = time.monotonic()
                _kill_later(ray.get(cluster.generators.actors[0].pid.remote()), 1.0)
            elif role == "trainer" and phase == "train":
                killed[role] = time.monotonic()
                _kill_later(cluster.trainer.worker_pids[0], 0.5)
            elif role == "reward" and phase == "score":
                killed[role] = time.monotonic()
                os.kill(ray.get(cluster.rewards.actors[0].pid.remote()), signal.SIGKILL)

    out_dir = f"/tmp/raylign-chaos-{name}-{os.getpid()}"
    started = time.monotonic()
    summary = raylign.train(str(ROOT / "configs/grpo_arith.yaml"), [*OVERRIDES, f"output_dir={out_dir}"],
                            on_phase=hook)
    return {"wall_s": time.monotonic() - started, "steps": summary["steps"], "plan": plan, "faults": summary["faults"],
            "accuracy_before": summary["eval_before"]["accuracy"], "accuracy_after": summary["eval_after"]["accuracy"],
            "step_spans": step_spans(events), "killed_at": killed}


def step_spans(events: list[tuple[float, str, int]]) -> dict[int, float]:
    """Seconds from a step's first start to its last completion (the last start of the next step, or the final
    checkpoint for the last one)."""
    first: dict[int, float] = {}
    last_start: dict[int, float] = {}
    previous = None
    for t, phase, step in events:
        if phase.startswith("eval") or step == 0:
            continue
        if step != previous:
            first.setdefault(step, t)
            last_start[step] = t
            previous = step
    end = max(t for t, _, _ in events)
    spans = {}
    for step, t0 in first.items():
        spans[step] = (last_start.get(step + 1, end)) - t0
    return spans


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part")
    args = parser.parse_args()
    if args.part:
        print("RESULT " + json.dumps(part(args.part)))
        return
    clean = run_part(__file__, "clean")
    faulted = run_part(__file__, "faulted")
    lost = {role: faulted["step_spans"][str(step)] - clean["step_spans"][str(step)]
            for role, step in faulted["plan"].items()}
    result = {
        "preset": "configs/grpo_arith.yaml", "overrides": OVERRIDES, "steps": STEPS, "seed": SEED, "fault_steps": faulted["plan"],
        "steps_completed": faulted["steps"], "restarts": faulted["faults"],
        "seconds_lost_per_fault": lost, "wall_s": {"clean": clean["wall_s"], "faulted": faulted["wall_s"]},
        "seconds_lost_total": faulted["wall_s"] - clean["wall_s"],
        "accuracy_after": {"clean": clean["accuracy_after"], "faulted": faulted["accuracy_after"]},
        "accuracy_before": clean["accuracy_before"],
        "accuracy_gap_points": 100 * (clean["accuracy_after"] - faulted["accuracy_after"]),
        "targets": {"all_steps": faulted["steps"] == STEPS,
                    "accuracy_within_5_points": round(abs(clean["accuracy_after"] - faulted["accuracy_after"]), 6) <= 0.05,
                    "under_60_s_lost_per_fault": all(v < 60 for v in lost.values())},
        "step_spans": {"clean": clean["step_spans"], "faulted": faulted["step_spans"]},
    }
    RESULTS.mkdir(exist_ok=True)
    name = "chaos" + "".join(f"_{o.replace('fault.', '').replace('=', '_')}" for o in EXTRA)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("steps_completed", "restarts", "seconds_lost_per_fault",
                                             "accuracy_after", "targets")}, indent=2))


if __name__ == "__main__":
    main()
