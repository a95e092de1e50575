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


def test_the_run_gets_a_report_naming_its_accuracy(grpo_cli_run):
    """train.report=true (the default): the report is written at the end, names the summary's before/after
    accuracy, embeds every rollout, is logged to MLflow; metrics.jsonl and the cost section are there for it."""
    summary, run, cwd = grpo_cli_run["summary"], grpo_cli_run["run"], grpo_cli_run["cwd"]
    text = (run / "report/index.html").read_text()
    before, after = (f"{100 * summary[k]['accuracy']:.1f}%" for k in ("eval_before", "eval_after"))
    assert f'<b id="acc-before">{before}</b>' in text and f'<b id="acc-after">{after}</b>' in text
    assert text.count('"step":') == 3 * 2 * 4 and (run / "report/reward.png").stat().st_size > 5000
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in rows] == [(0, "eval_before"), (1, "grpo"), (2, "grpo"), (3, "grpo"),
                                                     (3, "eval_after")]
    assert rows[-1]["metrics"]["accuracy"] == summary["eval_after"]["accuracy"]
    assert "timing/startup" not in rows[1]["metrics"] and rows[1]["metrics"]["timing/overhead"] >= 0
    cost = summary["cost"]
    assert cost["tokens_generated"]["rollouts"] == summary["tokens_generated"] > 0
    assert cost["tokens_generated"]["eval"] > 0 and cost["tokens_trained"] > 0
    assert 0 < cost["roles"]["trainer"]["busy_s"] < cost["total_s"] and cost["roles"]["generators"]["tokens_per_s"] > 0
    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "report")}
    assert {"report/index.html", "report/reward.png"} <= artifacts
    assert "cost/tokens/rollouts" in client.get_run(summary["mlflow_run_id"]).data.metrics
    assert "report:      runs/straight/report/index.html" in grpo_cli_run["stdout"]
