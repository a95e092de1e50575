"""A whole GRPO training run as a user starts it (`raylign train`, the session's `grpo_cli_run` fixture: 3 steps on
tiny-random-llama): what it logs to disk and MLflow. (That a resumed run ends with the weights of an
uninterrupted one is tested with a killed driver in test_cli_runs.py, from the same run.)"""

import json

from mlflow.tracking import MlflowClient

from raylign.models import load_tokenizer


def test_grpo_run_logs_everything(grpo_cli_run):
    summary, run, cwd = grpo_cli_run["summary"], grpo_cli_run["run"], grpo_cli_run["cwd"]
    assert summary["steps"] == 3 and summary["policy_version"] == 3
    assert 0 <= summary["eval_before"]["accuracy"] <= 1 and 0 <= summary["eval_after"]["accuracy"] <= 1
    assert {"generate", "score", "train", "sync"} <= set(summary["timing"]) and summary["tokens_generated"] > 0
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * 4 and {r["step"] for r in rows} == {1, 2, 3}
    assert {r["policy_version"] for r in rows if r["step"] == 2} == {1}
    tok = load_tokenizer(summary["final_model_dir"])
    assert tok.chat_template and (run / "final_model/config.json").exists()
    assert "held-out greedy accuracy" in grpo_cli_run["stdout"]

    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")  # tracking.uri=sqlite:///mlflow.db, relative to the run's cwd
    mlflow_run = client.get_run(summary["mlflow_run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "straight"
    history = client.get_metric_history(mlflow_run.info.run_id, "reward/mean")
    assert [m.step for m in history] == [1, 2, 3]
    for key in ["loss/policy", "train/grad_norm", "train/entropy", "timing/generate", "timing/train",
                "timing/sync", "perf/tokens_per_s", "response/len_mean", "eval/accuracy"]:
        assert key in mlflow_run.data.metrics, key
    assert mlflow_run.data.params["algorithm.name"] == "grpo"
