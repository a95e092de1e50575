"""Cost accounting: seconds per role from phase timing, tokens per purpose, and totals across a resume."""

import hashlib
import os

import pytest

from raylign.orchestrator.cost import cost_metrics, cost_summary, merged_counters, role_seconds

TIMING = {"startup": 10.0, "eval_before": 6.0, "generate": 20.0, "score": 4.0, "train": 30.0, "sync": 5.0,
          "ref_logprobs": 3.0, "checkpoint": 2.0, "overhead": 20.0}  # 100 s in all


def test_role_seconds_busy_and_idle_over_the_whole_run():
    roles = role_seconds(TIMING, search_s=0.0)
    assert roles["generators"] == {"busy_s": 26.0, "idle_s": 74.0}  # generate + eval_before
    assert roles["trainer"] == {"busy_s": 37.0, "idle_s": 63.0}  # train + sync + checkpoint
    assert roles["reference"] == {"busy_s": 3.0, "idle_s": 97.0}
    assert roles["reward"] == {"busy_s": 4.0, "idle_s": 96.0}
    assert "judge" not in roles  # no judge phase ran: no judge role in the summary or the report
    sft = role_seconds({"train": 9.0, "checkpoint": 1.0}, search_s=0.0)
    assert set(sft) == {"generators", "trainer"} and sft["generators"] == {"busy_s": 0.0, "idle_s": 10.0}
    assert "retriever" not in roles


def test_retriever_seconds_move_from_the_generators():
    roles = role_seconds(TIMING, search_s=8.0)
    assert roles["retriever"] == {"busy_s": 8.0, "idle_s": 92.0}
    assert roles["generators"]["busy_s"] == 18.0


def test_cost_summary_tokens_per_purpose_and_per_second():
    counters = {"tokens_generated": 520.0, "mc_tokens": 0.0, "judge_tokens": 0.0, "eval_tokens": 0.0,
                "tokens_trained": 600.0, "search_s": 0.0, "task_model/tokens": 40.0}
    cost = cost_summary(TIMING, counters)
    assert cost["tokens_generated"] == {"rollouts": 520.0, "mc_continuations": 0.0, "judge": 0.0, "eval": 0.0,
                                        "dspy_task_model": 40.0, "reward_judge_model": 0.0}
    assert cost["tokens_trained"] == 600.0 and cost["total_s"] == 100.0
    assert cost["roles"]["generators"]["tokens_per_s"] == pytest.approx(520 / 26)
    assert cost["roles"]["trainer"]["tokens_per_s"] == pytest.approx(600 / 37)
    flat = cost_metrics(cost)
    assert flat["cost/tokens/rollouts"] == 520.0 and flat["cost/tokens/trained"] == 600.0
    assert flat["cost/trainer/idle_s"] == 63.0


def test_totals_across_a_resume():
    """The first process checkpointed 300 task-model tokens; the resumed process's service has made 50 since it
    started. The driver's counters were restored from the checkpoint and kept counting."""
    saved = {"task_model/tokens": 300.0}
    driver = {"tokens_generated": 900.0, "tokens_trained": 800.0}
    merged = merged_counters(driver, {"task_model/tokens": 50.0, "fault/task_model_restarts": 0.0}, saved)
    assert merged == {"tokens_generated": 900.0, "tokens_trained": 800.0, "task_model/tokens": 350.0}
    assert merged_counters(driver, {}, {}) == driver  # no LM services: nothing added


class _Trainer:
    def save_checkpoint(self, path):
        os.makedirs(path)
        open(f"{path}/weights.bin", "w").write("w")
        return {"weights.bin": {"bytes": 1, "sha256": hashlib.sha256(b"w").hexdigest()}}

    def load_checkpoint(self, path, sha256=None):
        pass


class _Cluster:
    """What TrainingRun.save/restore touch of RayCluster: the counters, a trainer, the timer, weight pushes."""

    def __init__(self, service_tokens: float, **counters):
        from raylign.orchestrator.metrics import PhaseTimer

        self.tokens_generated = self.mc_tokens = self.judge_tokens = self.eval_tokens = self.tokens_trained = 0
        self.search_s, self.version, self.trainer, self.timer = 0.0, 0, _Trainer(), PhaseTimer()
        self.service_tokens = service_tokens
        for k, v in counters.items():
            setattr(self, k, v)

    def fault_counters(self):
        return {"task_model/tokens": self.service_tokens}

    def push_weights(self, version):
        self.version = version


def test_training_run_counters_survive_a_resume(tmp_path):
    from raylign.config import Config
    from raylign.orchestrator.checkpoint import read_driver_state
    from raylign.orchestrator.tracking import Tracker
    from raylign.orchestrator.train_loop import TrainingRun

    cfg = Config(output_dir=str(tmp_path), tracking={"enabled": False})
    tracker = Tracker(cfg.tracking, "t")
    first = TrainingRun(cfg, _Cluster(300.0, tokens_generated=900, mc_tokens=70, tokens_trained=800, search_s=2.5),
                        [1, 2, 3], [], tracker, tmp_path)
    first.timing = {"timing/generate": 5.0}
    ckpt = first.save(2)
    resumed = TrainingRun(cfg, _Cluster(50.0), [1, 2, 3], [], tracker, tmp_path)
    assert resumed.restore(ckpt, read_driver_state(ckpt)) == 2
    counters = resumed.counters()
    assert (counters["tokens_generated"], counters["mc_tokens"], counters["tokens_trained"]) == (900, 70, 800)
    assert counters["search_s"] == 2.5 and counters["task_model/tokens"] == 350.0  # 300 saved + 50 since
    assert resumed.timing["timing/generate"] == 5.0
    recovering = TrainingRun(cfg, _Cluster(0.0, tokens_generated=1000), [1, 2, 3], [], tracker, tmp_path)
    recovering.restore(ckpt, read_driver_state(ckpt), resuming=False)  # in-process recovery keeps its own count
    assert recovering.cluster.tokens_generated == 1000


def test_step_one_overhead_no_longer_absorbs_startup_and_eval(tmp_path, monkeypatch):
    import json

    from tqdm import tqdm

    from raylign.algorithms import registry
    from raylign.algorithms.protocol import StepOutput
    from raylign.config import Config
    from raylign.orchestrator.tracking import Tracker
    from raylign.orchestrator.train_loop import TrainingRun

    def fake_step(cluster, items, cfg, state):
        with cluster.timer.phase("train"):
            pass
        return StepOutput({"loss/policy": 1.0})

    monkeypatch.setitem(registry.ALGORITHMS, "grpo", registry.ALGORITHMS["grpo"].__class__(fake_step, "prompts"))
    cluster = _Cluster(0.0)
    cluster.reseed = lambda step: None
    cluster.timer.seconds.update({"startup": 40.0, "eval_before": 9.0})  # before step 1, as RayCluster + begin() leave it
    cfg = Config(output_dir=str(tmp_path), tracking={"enabled": False})
    run = TrainingRun(cfg, cluster, [1, 2, 3, 4, 5, 6, 7, 8], [], Tracker(cfg.tracking, "t"), tmp_path)
    run.bar = tqdm(disable=True)
    run.step(0)
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "timing/startup" not in row["metrics"] and "timing/eval_before" not in row["metrics"]
    assert 0.0 <= row["metrics"]["timing/overhead"] < 1.0 and row["metrics"]["timing/step"] < 1.0
    assert (run.timing["timing/startup"], run.timing["timing/eval_before"]) == (40.0, 9.0)
