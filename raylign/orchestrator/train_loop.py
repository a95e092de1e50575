"""`raylign train`: any registered algorithm's loop on a local or attached Ray cluster, and its recovery.

eval before -> for each step: next items of the algorithm's data source (prompts, examples or pairs) ->
ALGORITHMS[name].step (e.g. generate, score, advantages, train, sync) -> log to MLflow + rollouts.jsonl ->
checkpoint when due -> final checkpoint, HF export, eval after.

Dead or wedged generator, reward, reference and retriever actors are replaced inside their pools, and the step
goes on. When the trainer workers die or miss a deadline, the group is restarted, loads the last complete
checkpoint, and the loop replays from that step with the prompt stream, algorithm state and policy version
the checkpoint holds (``fault.max_trainer_restarts``; with restarts on, a checkpoint is written at least
every ``fault.max_lost_steps`` steps). Past a limit the run stops with ``RunFailed``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from raylign import storage
from raylign.algorithms.registry import ALGORITHMS
from raylign.config import ALGORITHM_CONFIGS, Config
from raylign.models import load_tokenizer, resolve_model
from raylign.types import Problem
from raylign.orchestrator.checkpoint import (PromptStream, latest_checkpoint, read_driver_state, save_checkpoint,
                                             trainer_hashes, verify_checkpoint)
from raylign.orchestrator.cluster import ray_cluster
from raylign.orchestrator.cost import COUNTERS, cost_metrics, cost_summary, merged_counters
from raylign.orchestrator.evaluate import evaluate
from raylign.orchestrator.faults import RestartLimitError
from raylign.orchestrator.pipeline_plot import plot_pipeline_shares
from raylign.orchestrator.preflight import TrainingPlan, checked_items, plan_training
from raylign.orchestrator.rl_cluster import RayCluster
from raylign.orchestrator.tracking import Tracker
from raylign.orchestrator.trainer_group import TrainerGroupError

log = logging.getLogger(__name__)

PhaseHook = Callable[[str, int, RayCluster], None]  # (phase, step, cluster): called as each phase starts


class RunFailed(RuntimeError):
    """A fault past its limit: the message is one line naming what failed and the last complete checkpoint."""


def run_eval_phase(cluster: RayCluster, problems: list[Problem], name: str, out_dir: Path) -> dict:
    cluster.ensure_synced()  # offline algorithms defer the weight sync to here
    spec = cluster.generators.spec(n=1, temperature=0.0)
    with cluster.timer.phase(name):
        metrics, records = evaluate(problems, cluster.prompt_ids(problems), cluster.rollouts, cluster.rewards,
                                    spec, desc=name)
    cluster.eval_tokens += sum(r["tokens"] for r in records)
    with (out_dir / f"{name}.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return metrics


def _trim_rollouts(path: Path, before_step: int) -> None:
    """On resume or replay, drop rows written after the checkpoint the run continues from."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= before_step]
        path.write_text("".join(row + "\n" for row in rows))


def _write_report(out_dir: Path, tracker: Tracker) -> None:
    """The HTML report of the finished run, logged to MLflow; a failure here only warns: the run's outputs stand."""
    try:
        from raylign.report import write_report

        index = write_report([out_dir])
        tracker.log_artifacts(index.parent, "report")
        log.info("report: %s", index)
    except Exception as e:  # noqa: BLE001 - the report is a view of the run, never a reason to lose it
        log.warning("the HTML report failed (%s: %s); the run's outputs are complete", type(e).__name__, e)


def checkpoint_every(cfg: Config) -> int:
    """Steps between checkpoints: ``train.checkpoint_every``, tightened so a trainer restart loses at most
    ``fault.max_lost_steps`` steps (0: only the final one)."""
    every = cfg.train.checkpoint_every
    if cfg.fault.max_trainer_restarts > 0:
        every = min(every or cfg.fault.max_lost_steps, cfg.fault.max_lost_steps)
    return every


def train(cfg: Config | TrainingPlan, reward_fn=None, on_phase: PhaseHook | None = None) -> dict:
    """The whole training run; bad config, data, model names and checkpoints fail before Ray starts."""
    started = time.perf_counter()
    plan = cfg if isinstance(cfg, TrainingPlan) else plan_training(cfg)
    cfg, ckpt, state = plan.cfg, plan.ckpt, plan.state
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    train_items, skipped = checked_items(plan.train_problems, cfg, tokenizer)  # now with token lengths
    skipped += plan.skipped_rows
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    (out_dir / "command.json").write_text(json.dumps({"argv": sys.argv, "cwd": os.getcwd()}, indent=2))
    tracker = Tracker(cfg.tracking, run_name=out_dir.name, resume_run_id=state.get("mlflow_run_id"))
    if not ckpt:
        tracker.log_config(cfg)
    try:
        with ray_cluster(cfg.ray):
            cluster = RayCluster(cfg, model_path, tokenizer, run_id=tracker.run_id or out_dir.name,
                                 storage_dir=str(out_dir / "ray_train"), reward_fn=reward_fn)
            if on_phase is not None:
                cluster.timer.on_enter = lambda name: on_phase(name, cluster.step, cluster)
            try:
                run = TrainingRun(cfg, cluster, train_items, plan.eval_problems, tracker, out_dir, plan.warmup)
                summary = run.run(ckpt, state)
                summary["data/skipped_rows"] = skipped
            finally:
                cluster.shutdown()
        summary["wall_s"] = time.perf_counter() - started
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.log_artifact(out_dir / "summary.json")
        tracker.log_artifact(out_dir / "config.yaml")
        if cfg.train.report:
            _write_report(out_dir, tracker)
        tracker.close()
    except BaseException as e:
        tracker.fail(e)
        raise
    return summary


class TrainingRun:
    """The step loop's state (prompt stream, algorithm state, evals, timing, fault counts) and its recovery."""

    def __init__(self, cfg: Config, cluster: RayCluster, train_problems: list, eval_problems: list[Problem],
                 tracker: Tracker, out_dir: Path, warmup: list | None = None):
        self.cfg, self.cluster, self.tracker, self.out_dir = cfg, cluster, tracker, out_dir
        self.train_problems, self.eval_problems, self.warmup = train_problems, eval_problems, warmup or []
        self.total = cfg.total_steps
        self.stream = PromptStream(train_problems, cfg.algorithm.items_per_step, cfg.seed)
        self.warmup_stream = PromptStream(self.warmup, cfg.train.sft_warmup_batch_size, cfg.seed)
        self.warmup_cfg = ALGORITHM_CONFIGS["sft"](batch_size=cfg.train.sft_warmup_batch_size)
        self.algo_state: dict = {}
        self.evals: dict = {}
        self.timing: dict[str, float] = {}
        self.saved_services: dict[str, float] = {}  # LM-service tokens of the run before this process (resume)
        self.faults: Counter[str] = Counter({"fault/trainer_restarts": 0, "fault/replayed_steps": 0})
        self.rollouts = out_dir / "rollouts.jsonl"
        self.metrics_log = out_dir / "metrics.jsonl"  # one row per step and per eval: the report reads it
        self.checkpoints = storage.join(cfg.storage_root(), "checkpoints")  # train.storage, else output_dir
        # the step's extra prompts (dynamic sampling) come from the same checkpointed stream, whichever it is now
        cluster.prompt_source = lambda n: self.stream.take(n)
        if getattr(cfg.algorithm, "max_staleness", 0) > 0:  # async: the generators sample the next steps ahead
            cluster.start_prefetch(lambda k: self.stream.peek_batches(k), cfg.algorithm.max_staleness)

    def run(self, ckpt: str | None, state: dict) -> dict:
        step = state.get("step", 0)
        self.bar = tqdm(total=self.total, desc="train", unit="step", initial=step)
        started, failure = False, None
        while True:
            try:
                if failure is not None:  # inside the try: a fault while recovering is one more restart
                    step, failure = self.recover(failure, step), None
                elif not started:
                    step = self.restore(ckpt, state) if ckpt else self.begin()
                started = True
                while step < self.total:
                    self.step(step)
                    step += 1
                    self.maybe_checkpoint(step)
                return self.finish()
            except TrainerGroupError as e:
                failure, started = e, True
            except RestartLimitError as e:
                ckpt = latest_checkpoint(self.checkpoints)
                raise RunFailed(f"{e} (at step {step + 1}); last complete checkpoint: {ckpt or 'none'}") from e

    def begin(self) -> int:
        if self.cfg.train.eval_before:
            self.evals["eval_before"] = run_eval_phase(self.cluster, self.eval_problems, "eval_before", self.out_dir)
            self.tracker.log_metrics({f"eval/{k}": v for k, v in self.evals["eval_before"].items()}, step=0)
        _trim_rollouts(self.rollouts, 0)
        _trim_rollouts(self.metrics_log, -1)  # a fresh start: nothing of an earlier run in this folder stays
        if "eval_before" in self.evals:
            self.log_row(0, "eval_before", self.evals["eval_before"])
        return 0

    def restore(self, ckpt: str, state: dict, resuming: bool = True) -> int:
        """Load a complete checkpoint into the trainer, the generators and this loop; returns its step.
        ``resuming`` (a new process): the cost counters continue from the checkpoint's; a recovery inside the
        run keeps its own, which count the replayed work too."""
        self.cluster.trainer.load_checkpoint(str(ckpt), trainer_hashes(ckpt))
        self.stream.load_state_dict(state["data"])
        if "warmup_data" in state:
            self.warmup_stream.load_state_dict(state["warmup_data"])
        self.algo_state = copy.deepcopy(state.get("algorithm", {}))
        self.evals = {**state.get("evals", {}), **self.evals}
        self.timing = {**state.get("timing", {}), **self.timing}
        self.cluster.push_weights(state["policy_version"])
        if resuming:
            for key, value in {"tokens_generated": state.get("tokens_generated", 0), **state.get("counters", {})}.items():
                setattr(self.cluster, key, value)
            self.saved_services = state.get("service_tokens", {})
        _trim_rollouts(self.rollouts, state["step"])
        _trim_rollouts(self.metrics_log, state["step"])
        return state["step"]

    def recover(self, error: TrainerGroupError, step: int) -> int:
        """Restart the trainer workers and go back to the last complete checkpoint (or the start)."""
        self.faults["fault/trainer_restarts"] += 1
        ckpt = latest_checkpoint(self.checkpoints)
        if self.faults["fault/trainer_restarts"] > self.cfg.fault.max_trainer_restarts:
            raise RunFailed(f"trainer workers failed {self.faults['fault/trainer_restarts']} times "
                            f"(fault.max_trainer_restarts={self.cfg.fault.max_trainer_restarts}) at step {step + 1}: "
                            f"{str(error).splitlines()[0]}; last complete checkpoint: {ckpt or 'none'}") from error
        log.warning("trainer workers failed at step %d (%s); restarting from %s", step + 1,
                    str(error).splitlines()[0], ckpt or "the initial weights")
        self.cluster.restart_trainer()
        if ckpt is None:  # nothing saved yet: the fresh workers hold the initial weights
            self.stream = PromptStream(self.train_problems, self.cfg.algorithm.items_per_step, self.cfg.seed)
            self.warmup_stream = PromptStream(self.warmup, self.cfg.train.sft_warmup_batch_size, self.cfg.seed)
            self.algo_state = {}
            self.cluster.push_weights(0)
            _trim_rollouts(self.rollouts, 0)
            _trim_rollouts(self.metrics_log, 0)
            back = 0
        else:
            verify_checkpoint(ckpt)  # a damaged checkpoint stops the run rather than loading (rank 0 hashes the rest)
            back = self.restore(ckpt, read_driver_state(ckpt), resuming=False)
        self.faults["fault/replayed_steps"] += step - back
        self.bar.n = back
        self.bar.refresh()
        return back

    def step(self, step: int) -> None:
        cluster, cfg = self.cluster, self.cfg
        warming = step < cfg.train.sft_warmup_steps  # the SFT warm-up comes first, in the same run
        algo_cfg, stream, state = ((self.warmup_cfg, self.warmup_stream, {}) if warming
                                   else (cfg.algorithm, self.stream, self.algo_state))
        name = algo_cfg.name
        algorithm = ALGORITHMS[name]
        items = stream.next()
        cluster.step = step + 1
        cluster.reseed(step)
        self.add_timing(cluster.timer.pop())  # startup, evals, checkpoints: before this step, not in it
        step_start, tokens_before = time.perf_counter(), cluster.tokens_generated
        out = algorithm.step(cluster, items, algo_cfg, state)
        step_s = time.perf_counter() - step_start
        phases = cluster.timer.pop()
        phases["timing/overhead"] = step_s - sum(phases.values())
        self.add_timing(phases)
        if getattr(cluster, "prefetch", None) is not None:
            phases.update(cluster.prefetch.pop_metrics())
        metrics = {**out.metrics, **phases, **self.fault_counters(), "timing/step": step_s,
                   "perf/tokens_per_s": (cluster.tokens_generated - tokens_before) / step_s}
        self.tracker.log_metrics(metrics, step=step + 1)
        self.log_row(step + 1, name, metrics)
        with self.rollouts.open("a") as f:
            for r in out.records:
                f.write(json.dumps({"step": step + 1, "algorithm": name, **r}, ensure_ascii=False) + "\n")
        shown = {k.split("/")[-1]: metrics[k] for k in algorithm.headline if k in metrics}
        log.info("step %d/%d (%s): %s, %.1f s", step + 1, self.total, name,
                 ", ".join(f"{k} {v:.3f}" for k, v in shown.items()), step_s)
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})

    def add_timing(self, phases: dict[str, float]) -> None:
        for k, v in phases.items():
            self.timing[k] = self.timing.get(k, 0.0) + v

    def counters(self) -> dict[str, float]:
        """The run's cost counters so far (driver and LM services), resumed parts included."""
        driver = {k: float(getattr(self.cluster, k)) for k in COUNTERS}
        return merged_counters(driver, self.cluster.fault_counters(), self.saved_services)

    def log_row(self, step: int, kind: str, metrics: dict) -> None:
        """One metrics.jsonl row: a step's metrics (kind: the algorithm) or an eval's (kind: its name)."""
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        with self.metrics_log.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, "metrics": numbers}) + "\n")

    def fault_counters(self) -> dict[str, float]:
        return {**self.cluster.fault_counters(), **self.faults}

    def maybe_checkpoint(self, step: int) -> str | None:
        every = checkpoint_every(self.cfg)
        if every and step % every == 0 and step < self.total:
            return self.save(step)
        return None

    def save(self, step: int) -> str:
        state = {"policy_version": self.cluster.version, "data": self.stream.state_dict(),
                 "warmup_data": self.warmup_stream.state_dict(),
                 "algorithm": self.algo_state, "mlflow_run_id": self.tracker.run_id, "evals": self.evals,
                 "tokens_generated": self.cluster.tokens_generated, "timing": self.timing,
                 "counters": {k: getattr(self.cluster, k) for k in COUNTERS},
                 "service_tokens": {k: v for k, v in self.counters().items() if k.endswith("_model/tokens")},
                 "config": self.cfg.model_dump(mode="json")}
        meta = {"world_size": self.cfg.trainer.num_workers, "model": self.cfg.model.name}
        with self.cluster.timer.phase("checkpoint"):
            return save_checkpoint(self.checkpoints, step, self.cluster.trainer.save_checkpoint, state,
                                   self.cfg.train.keep_checkpoints, meta=meta)

    def finish(self) -> dict:
        cfg, cluster = self.cfg, self.cluster
        final_ckpt = self.save(self.total)
        final_model = storage.join(cfg.storage_root(), "final_model")
        cluster.trainer.export_hf(final_model)
        if cfg.train.eval_after:
            self.evals["eval_after"] = run_eval_phase(cluster, self.eval_problems, "eval_after", self.out_dir)
            self.tracker.log_metrics({f"eval/{k}": v for k, v in self.evals["eval_after"].items()}, step=self.total)
            self.log_row(self.total, "eval_after", self.evals["eval_after"])
        plot = plot_pipeline_shares(self.evals, self.out_dir / "pipelines.png")  # env.name=dspy
        if plot is not None:
            self.tracker.log_artifact(plot)
        self.add_timing(cluster.timer.pop())
        faults = self.fault_counters()
        self.tracker.log_metrics(faults, step=self.total)
        cost = cost_summary({k.removeprefix("timing/"): v for k, v in self.timing.items()}, self.counters())
        self.tracker.log_metrics(cost_metrics(cost), step=self.total)
        return {"steps": self.total, "sft_warmup_steps": cfg.train.sft_warmup_steps, "algorithm": cfg.algorithm.name,
                "model": cfg.model.name, **self.evals,
                "timing": {k.removeprefix("timing/"): v for k, v in self.timing.items()},
                "tokens_generated": cluster.tokens_generated, "mc_tokens": cluster.mc_tokens,
                "judge_tokens": cluster.judge_tokens, "policy_version": cluster.version,
                "mlflow_run_id": self.tracker.run_id, "final_model_dir": final_model,
                "final_checkpoint": str(final_ckpt), "rollouts": str(self.rollouts),
                "reward_events": cluster.rewards.counters() if cluster.rewards is not None else {}, "faults": faults,
                "weight_sync": cluster.sync_layout, "cost": cost}
