"""Shared settings for the training integration tests."""

import os
import subprocess
import sys
from pathlib import Path

from raylign.config import load_config

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs/grpo_arith.yaml"

TINY = ["env.num_problems=16", "algorithm.prompts_per_step=2", "algorithm.group_size=4",
        "generator.max_new_tokens=8", "generator.kv_cache_gb=0.25", "trainer.lr=1e-3", "trainer.micro_batch_tokens=256",
        "trainer.num_cpus_per_worker=1", "trainer.num_workers=2", "train.eval_limit=4", "seed=3"]

# `raylign` subprocesses start their own local Ray cluster: never the test session's.
CLI_ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
# The GRPO CLI runs (test_cli_runs.py, test_train_runs.py). Relative on purpose: resolved against the
# subprocess's working directory, never the trainer workers'. transformers generate: deterministic on CPU.
CLI_GRPO = ["model.name=tiny-random-llama", *TINY, "ray.num_cpus=6", "tracking.uri=sqlite:///mlflow.db",
            "train.checkpoint_every=1", "generator.backend=hf", "train.steps=3"]


def raylign_cli(cwd: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """`python -m raylign ARGS` in cwd; asserts it exited 0."""
    proc = subprocess.run([sys.executable, "-m", "raylign", *args], cwd=cwd, env=CLI_ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tiny_config(tiny_model, tmp_path, *extra):
    return load_config(PRESET, [f"model.name={tiny_model}", *TINY,
                                                    f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra], environ={})


def vowel_reward(problem, completion):
    """Random text from the tiny model varies in its share of vowels: a reward with signal, unlike arith's."""
    from raylign.types import Score

    share = sum(ch in "aeiou" for ch in completion) / max(1, len(completion))
    return Score(reward=share, correct=share > 0.3, prediction=None, format_ok=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray_node(env: dict, head_port: int | None = None, num_cpus: int = 8, resources: dict | None = None,
                   gcs_port: int | None = None, dashboard_port: int | None = None):
    """`ray start --block` for one node on 127.0.0.1 (the head when head_port is None, else a worker joining it),
    with its own ports and a short --temp-dir (Ray's unix sockets must stay under ~107 characters). Every
    port is its own: the test session's Ray cluster holds the default agent ports. --block keeps the node in
    this process group so a test stops exactly this node (never `ray stop`). Returns (Popen, temp_dir)."""
    import json as _json
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--temp-dir={temp_dir}"]
    if resources:
        cmd.append(f"--resources={_json.dumps(resources)}")
    if head_port is None:
        cmd += ["--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    else:
        cmd.append(f"--address=127.0.0.1:{head_port}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{temp_dir}.log", "w"),
                            start_new_session=True)
    return proc, temp_dir


def stop_ray_node(proc, temp_dir: str) -> None:
    import shutil
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # a node never finished a SIGTERM within 30 s here: it only cost the wait
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)
