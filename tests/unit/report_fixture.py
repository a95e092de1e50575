"""A recorded run folder written by the tests: the files `raylign train` leaves, with known values."""

from __future__ import annotations

import json
from pathlib import Path

TOOL = "\n<results>[d1] Paris is the capital.</results>\n"


def _rollout(step: int, prompt: int, sample: int, kind: str) -> dict:
    """Prompt p is correct on sample j when (p + j + step) is even, except prompt 0 (learns: right from step 2)
    and prompt 1 (gets worse: wrong from step 2)."""
    correct = (prompt + sample + step) % 2 == 0
    if prompt == 0:
        correct = step >= 2
    if prompt == 1:
        correct = step < 2
    row = {"step": step, "algorithm": "grpo", "prompt_id": f"p{prompt}", "sample": sample,
           "prompt": f"What is {prompt} + {prompt}?", "completion": f"<answer>{2 * prompt if correct else -1}</answer>",
           "prediction": str(2 * prompt), "ground_truth": str(2 * prompt), "reward": float(correct),
           "correct": correct, "advantage": 0.5 if correct else -0.5, "tokens": 7, "policy_version": step - 1,
           "finish_reason": "stop"}
    if kind == "rag":
        search = "<search>capital of France</search>"
        row["completion"] = search + TOOL + "<answer>Paris</answer>"
        row["tool_spans"] = [[len(search), len(search) + len(TOOL)]]
        row["components"] = {"mrr": 0.5, "format": 1.0}
    return row


def _step_metrics(step: int, rows: list[dict], kind: str) -> dict:
    rewards = [r["reward"] for r in rows]
    metrics = {"reward/mean": sum(rewards) / len(rewards), "reward/std": 0.5, "accuracy/train": sum(rewards) / len(rewards),
               "response/len_mean": 7.0, "response/truncated": 0.0, "kl/mean": 0.01 * step, "train/entropy": 2.0,
               "timing/generate": 1.0 + step, "timing/train": 2.0, "timing/sync": 0.5, "timing/step": 4.0 + step}
    if kind == "rag":
        metrics.update({"reward/mrr": 0.5, "reward/format": 1.0})
    return metrics


def _dpo_metrics(step: int) -> dict:
    return {"loss/dpo": 0.69 - 0.01 * step, "dpo/reward_accuracy": 0.5 + 0.05 * step, "dpo/margin": 0.1 * step,
            "timing/train": 2.0, "timing/step": 2.5}


def write_run(folder: Path, steps: int = 3, prompts: int = 4, group: int = 2, kind: str = "grpo",
              before: float = 0.25, after: float = 0.75) -> Path:
    """A run of ``steps`` steps, ``prompts`` prompts sampled every step, ``group`` samples each."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(f"name: fixture\nalgorithm:\n  name: {'dpo' if kind == 'dpo' else 'grpo'}\n")
    (folder / "command.json").write_text(json.dumps({"argv": ["raylign", "train", "configs/grpo_arith.yaml",
                                                              "train.steps=3"], "cwd": "/home/user"}))
    metric_rows = [{"step": 0, "kind": "eval_before", "metrics": {"accuracy": before}}]
    rollouts = []
    for step in range(1, steps + 1):
        if kind == "dpo":
            rows = [{"step": step, "algorithm": "dpo", "pair_id": f"pair{step}", "source": "pairs.jsonl:1",
                     "chosen": "good", "rejected": "bad"}]
            metrics = _dpo_metrics(step)
        else:
            rows = [_rollout(step, p, j, kind) for p in range(prompts) for j in range(group)]
            metrics = _step_metrics(step, rows, kind)
        rollouts += rows
        metric_rows.append({"step": step, "kind": "dpo" if kind == "dpo" else "grpo", "metrics": metrics})
    metric_rows.append({"step": steps, "kind": "eval_after", "metrics": {"accuracy": after}})
    _write_jsonl(folder / "rollouts.jsonl", rollouts)
    _write_jsonl(folder / "metrics.jsonl", metric_rows)
    _write_jsonl(folder / "eval_before.jsonl", [{"problem_id": "e0", "sample": 0, "correct": False},
                                                {"problem_id": "e1", "sample": 0, "correct": True}])
    _write_jsonl(folder / "eval_after.jsonl", [{"problem_id": "e0", "sample": 0, "correct": True},
                                               {"problem_id": "e1", "sample": 0, "correct": True}])
    summary = {"steps": steps, "algorithm": "dpo" if kind == "dpo" else "grpo", "model": "tiny-random-llama",
               "eval_before": {"accuracy": before}, "eval_after": {"accuracy": after}, "wall_s": 120.0,
               "timing": {"generate": 10.0, "train": 6.0}, "tokens_generated": 1234}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# Prompt -> step -> correctness of its samples that step; each prompt is drawn at some steps only.
SPARSE = {"s": {1: [False, False], 3: [True, False], 5: [True, True]},  # 0 -> 0.5 -> 1: learned
          "t": {2: [True, True], 4: [False, True]},  # 1 -> 0.5: got worse
          "u": {step: [True, False] for step in range(1, 6)},  # 0.5 at every step: stuck
          "v": {4: [False, True]}}  # seen once


def write_sparse_run(folder: Path) -> Path:
    """A 5-step run whose rollouts.jsonl holds the samples of ``SPARSE`` (the other files as ``write_run``)."""
    write_run(folder, steps=5, prompts=2, group=2)
    rows = [{"step": step, "algorithm": "grpo", "prompt_id": pid, "sample": j, "prompt": f"prompt {pid}",
             "completion": "yes" if ok else "no", "reward": float(ok), "correct": ok}
            for pid, by_step in SPARSE.items() for step, hits in by_step.items() for j, ok in enumerate(hits)]
    _write_jsonl(folder / "rollouts.jsonl", sorted(rows, key=lambda r: r["step"]))
    return folder
