"""Runs that survive: dead trainer workers are restarted from the last complete checkpoint and the steps since
are replayed, a wedged reward function costs its samples only; past the limit the run stops with one line,
MLflow says FAILED, the checkpoint still loads."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import raylign
from raylign.orchestrator.checkpoint import latest_checkpoint, verify_checkpoint
from raylign.orchestrator.train_loop import RunFailed
from tests.integration.helpers import tiny_config, vowel_reward

# transformers generate (hf): the trainer's recovery is under test, and the hf actor starts in half vLLM's time
FAST = ["train.eval_before=false", "train.eval_after=false", "fault.max_lost_steps=2", "generator.backend=hf"]


def _kill_trainer_rank(cluster, rank: int, delay_s: float = 0.0) -> None:
    pid = cluster.trainer.worker_pids[rank]
    if delay_s:  # "during train_step": after the command went out, before the workers answer it
        threading.Timer(delay_s, os.kill, (pid, signal.SIGKILL)).start()
    else:
        os.kill(pid, signal.SIGKILL)


def test_killed_trainer_workers_are_restarted_and_the_lost_steps_replayed(ray_session, tiny_model, tmp_path):
    kills = []

    def chaos(phase: str, step: int, cluster) -> None:
        # step 2: rank 1 dies during train_step, before any checkpoint (back to the start, 1 step replayed);
        # step 4: rank 0 dies between steps, after the checkpoint at step 2 (step 3 replayed)
        if (phase, step) == ("train", 2) and not kills:
            kills.append(step)
            _kill_trainer_rank(cluster, 1, delay_s=0.05)
        elif (phase, step) == ("generate", 4) and len(kills) == 1:
            kills.append(step)
            _kill_trainer_rank(cluster, 0)

    def wedged_on_one_problem(problem, completion):
        if problem.id.endswith("-0"):
            time.sleep(30)  # past reward.timeout_s: the sample scores 0, counted, and the run goes on
        return vowel_reward(problem, completion)

    cfg = tiny_config(tiny_model, tmp_path, f"output_dir={tmp_path}/run", "train.steps=4", *FAST,
                      "reward.timeout_s=1", "train.eval_after=true")
    summary = raylign.train(cfg, reward_fn=wedged_on_one_problem, on_phase=chaos)
    assert kills == [2, 4]
    assert summary["reward_events"]["timeout"] >= 1  # eval_after poses test problem 0
    assert summary["steps"] == 4 and summary["policy_version"] == 4
    assert summary["faults"]["fault/trainer_restarts"] == 2
    assert summary["faults"]["fault/replayed_steps"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run/rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in (1, 2, 3, 4) for _ in range(2 * 4)]  # each step once
    assert [r["policy_version"] for r in rows if r["step"] == 4] == [3] * 8
    run = MlflowClient(cfg.tracking.uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["fault/trainer_restarts"] == 2
    assert (tmp_path / "run/final_model/model.safetensors").is_file()


def test_past_the_restart_limit_the_run_stops_failed_with_a_loadable_checkpoint(ray_session, tiny_model, tmp_path):
    def chaos(phase: str, step: int, cluster) -> None:
        if (phase, step) == ("generate", 3):
            _kill_trainer_rank(cluster, 1)

    cfg = tiny_config(tiny_model, tmp_path, f"output_dir={tmp_path}/run", "train.steps=4", *FAST,
                      "fault.max_trainer_restarts=0", "train.checkpoint_every=2")
    started = time.monotonic()
    with pytest.raises(RunFailed) as info:
        raylign.train(cfg, reward_fn=vowel_reward, on_phase=chaos)
    ckpt = latest_checkpoint(tmp_path / "run/checkpoints")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("trainer workers failed 1 times (fault.max_trainer_restarts=0) at step 3: ")
    assert message.endswith(f"last complete checkpoint: {ckpt}")
    assert Path(ckpt).name == "step-000002" and verify_checkpoint(ckpt)["meta"]["world_size"] == 2
    assert time.monotonic() - started < 240  # a dead rank is seen within Ray Train's health-check interval
    runs = MlflowClient(cfg.tracking.uri).search_runs(["0", *[e.experiment_id for e in MlflowClient(
        cfg.tracking.uri).search_experiments()]])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["raylign.error"].startswith("RunFailed: trainer workers failed 1 times")
