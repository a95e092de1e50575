"""`ray job submit` against a real head node (`ray start --head` on 127.0.0.1, token auth left on)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node():
    gcs, dash, agent, agent_grpc, metrics, runtime_env = (_free_port() for _ in range(6))
    # Ray's unix sockets live under --temp-dir and must stay under ~107 characters: keep the path short.
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # --block keeps the head in this process group, so the test stops exactly this cluster (never `ray stop`,
    # which would kill every Ray cluster on the machine).
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=8", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # The test session's own Ray cluster already holds the default agent ports (52365 ...); a head whose
         # dashboard agent cannot bind never gets one, and every submit answers "No available agent".
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(f"{temp_dir}.log", "w"), start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", dash)) == 0:
                break
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"ray head did not start within 90 s: {Path(f'{temp_dir}.log').read_text()[-2000:]}")
    yield {"dashboard": f"http://127.0.0.1:{dash}", "env": env}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # the head never finished a SIGTERM within 30 s here: it only cost the wait
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


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
