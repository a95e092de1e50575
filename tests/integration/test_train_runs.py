"""Whole training runs through `raylign.train` on the real stack (tiny-random-llama): what a GRPO run logs
to disk and MLflow. (That a resumed run ends with the weights of an uninterrupted one is tested with a
killed driver in test_cli_runs.py.)"""

import json

import mlflow
from mlflow.tracking import MlflowClient

import raylign
from raylign.models import load_tokenizer
from tests.integration.helpers import tiny_config, vowel_reward


def test_grpo_run_logs_everything(ray_session, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tiny_model, tmp_path, f"output_dir={tmp_path}/run", "train.steps=2")
    summary = raylign.train(cfg, reward_fn=vowel_reward)
    assert summary["steps"] == 2 and summary["policy_version"] == 2
    assert 0 <= summary["eval_before"]["accuracy"] <= 1 and 0 <= summary["eval_after"]["accuracy"] <= 1
    assert {"generate", "score", "train", "sync"} <= set(summary["timing"]) and summary["tokens_generated"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run/rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4 and {r["step"] for r in rows} == {1, 2}
    assert {r["policy_version"] for r in rows if r["step"] == 2} == {1}
    tok = load_tokenizer(summary["final_model_dir"])
    assert tok.chat_template and (tmp_path / "run/final_model/config.json").exists()

    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    assert [m.step for m in history] == [1, 2]
    for key in ["loss/policy", "train/grad_norm", "train/entropy", "timing/generate", "timing/train",
                "timing/sync", "perf/tokens_per_s", "response/len_mean", "eval/accuracy"]:
        assert key in run.data.metrics, key
    assert run.data.params["algorithm.name"] == "grpo"
