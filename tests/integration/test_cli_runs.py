"""`raylign train` / `raylign eval` as a user runs them: subprocesses with relative paths, from a working
directory that is not the repository, each starting its own local Ray cluster. The uninterrupted run is the
session's `grpo_cli_run` (test_train_runs.py checks what it logs)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.integration.helpers import CLI_ENV as ENV
from tests.integration.helpers import CLI_GRPO, PRESET, ROOT
from tests.integration.helpers import raylign_cli as _raylign


def _mlflow_run_ids(db: Path, name: str) -> list[str]:
    client = MlflowClient(f"sqlite:///{db}")
    return [r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == name]


def test_relative_paths_eval_and_a_killed_driver_resuming_to_identical_weights(grpo_cli_run):
    """One straight run (the fixture's) and one whose driver is SIGKILLed after a random step, both with relative
    paths: the straight run's files and its `raylign eval`, a refused resume that leaves it as it was, and the
    killed run resumed to bit-identical weights and the same samples (transformers generate: deterministic on CPU)."""
    common, tmp_path, run, summary = CLI_GRPO, grpo_cli_run["cwd"], grpo_cli_run["run"], grpo_cli_run["summary"]
    assert summary["final_model_dir"] == str(run / "final_model")
    assert (run / "final_model/model.safetensors").is_file() and (run / "final_model/config.json").is_file()
    ckpt = Path(summary["final_checkpoint"])
    assert ckpt == run / "checkpoints/step-000003"
    assert {"trainer_model.safetensors", "driver_state.json", "manifest.json"} <= {p.name for p in ckpt.iterdir()}
    assert not list(ckpt.glob("*.pt"))  # nothing pickled
    assert (tmp_path / "mlflow.db").is_file()

    _raylign(tmp_path, "eval", str(ROOT / "configs/eval_arith.yaml"), "model.name=runs/straight/final_model",
             "dataset.limit=4", "generator.max_new_tokens=8", "output_dir=runs/eval", "ray.num_cpus=4",
             "generator.backend=hf", "tracking.uri=sqlite:///mlflow.db")
    evaluated = json.loads((tmp_path / "runs/eval/summary.json").read_text())
    assert evaluated["model_path"] == str(run / "final_model") and evaluated["n"] == 4

    # A resume that cannot work (here: another algorithm) stops before Ray and leaves the finished run as it was.
    bad = subprocess.run([sys.executable, "-m", "raylign", "train", str(PRESET), *common, "output_dir=runs/straight",
                          "train.steps=4", "algorithm.name=rloo", "--resume"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "algorithm.name='rloo'" in bad.stderr
    mlflow_runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert mlflow_runs.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"

    kill_after = random.Random(os.getpid()).choice([1, 2])  # a random step, seen through its checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "raylign", "train", str(PRESET), *common, "output_dir=runs/cut"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / f"runs/cut/checkpoints/step-{kill_after:06d}/manifest.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [cut_run_id] = _mlflow_run_ids(tmp_path / "mlflow.db", "cut")
    resumed_proc = _raylign(tmp_path, "train", str(PRESET), *common, "output_dir=runs/cut", "--resume")
    resumed = json.loads((tmp_path / "runs/cut/summary.json").read_text())
    assert resumed["steps"] == 3 and resumed["policy_version"] == 3 and resumed["mlflow_run_id"] == cut_run_id
    assert "held-out greedy accuracy" in resumed_proc.stdout
    assert mlflow_runs.get_run(cut_run_id).info.status == "FINISHED"
    a = load_file(run / "final_model/model.safetensors")
    b = load_file(tmp_path / "runs/cut/final_model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed after step {kill_after}"
    straight = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    cut = [json.loads(x) for x in (tmp_path / "runs/cut/rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in cut}) == [1, 2, 3]
    assert [r["completion"] for r in cut] == [r["completion"] for r in straight]
    # cost totals survive the resume: the same samples and batches as the straight run
    for key in ("rollouts", "eval"):
        assert resumed["cost"]["tokens_generated"][key] == summary["cost"]["tokens_generated"][key], key
    assert resumed["cost"]["tokens_trained"] == summary["cost"]["tokens_trained"]
    metric_steps = [json.loads(x)["step"] for x in (tmp_path / "runs/cut/metrics.jsonl").read_text().splitlines()]
    assert metric_steps == [0, 1, 2, 3, 3]  # eval_before, the steps once each (rows past the checkpoint trimmed), eval_after
