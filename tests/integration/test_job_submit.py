"""`ray job submit` against a real head node (`ray start --head` on 127.0.0.1, token auth left on)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.helpers import free_port, start_ray_node, stop_ray_node

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head_node():
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc, temp_dir = start_ray_node(env, gcs_port=gcs, dashboard_port=dash)
    deadline = time.time() + 90
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", dash)) == 0:
                break
        time.sleep(1)
    else:
        stop_ray_node(proc, temp_dir)
        pytest.fail(f"ray head did not start within 90 s: {Path(f'{temp_dir}.log').read_text()[-2000:]}")
    yield {"dashboard": f"http://127.0.0.1:{dash}", "env": env}
    stop_ray_node(proc, temp_dir)


def _submit(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still registering.

    The dashboard port opens before the node's dashboard agent has joined; a submit in that window fails
    with "No available agent to submit job, please try again later" (seen in CI), so retry that one error.
    """
    deadline = time.time() + 120
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            return proc
        time.sleep(3)


def test_job_submit_runs_training(head_node, tiny_model, tmp_path):
    out = tmp_path / "job-run"
    env = {**head_node["env"], "RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": head_node["dashboard"]}
    cmd = [str(BIN / "ray"), "job", "submit", "--working-dir", str(ROOT), "--",
           "python", "-m", "raylign.train", "configs/grpo_arith.yaml", f"model.name={tiny_model}",
           "train.steps=1", "algorithm.prompts_per_step=2", "algorithm.group_size=2", "train.eval_limit=2",
           "generator.max_new_tokens=6", "generator.kv_cache_gb=0.25", "trainer.micro_batch_tokens=512",
           # the submission is under test: hf generate starts in half vLLM's time, one eval (after) is enough
           "generator.backend=hf", "train.eval_before=false",
           f"output_dir={out}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    proc = _submit(cmd, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["policy_version"] == 1
    assert Path(summary["final_model_dir"], "model.safetensors").exists()


def test_job_submit_without_token_mode_is_refused(head_node):
    env = {**head_node["env"], "RAY_AUTH_MODE": "disabled", "RAY_API_SERVER_ADDRESS": head_node["dashboard"]}
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--", "python", "-c", "print(1)"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Authentication" in proc.stdout + proc.stderr
