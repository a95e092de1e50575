"""Driver-side handle on the policy trainer: N Ray Train workers that stay alive and serve commands.

``TorchTrainer.fit()`` blocks until the workers' loop returns, so it runs in a daemon thread; the driver
talks to the workers through Ray queues (one command queue per rank, one shared reply queue). A command
goes to every rank and returns when every rank has replied, or raises ``TrainerCommandError`` carrying the
worker traceback; the workers keep serving after an error. If a worker dies (its actor is gone, or fit()
returns or raises) or a command runs past ``command_timeout_s``, a waiting call raises ``TrainerGroupError``
within about 2 x POLL_S instead of hanging; the driver then restarts the group (train_loop.TrainingRun).

Resources: num_workers x num_cpus_per_worker logical CPUs (+1 GPU each with use_gpu) in a placement group;
the queues and Ray Train's controller take 0 CPUs. Ray Train writes its run folder under ``storage_dir``.
Commands are serialised by a lock (one in flight). ``shutdown()`` (or ``with TrainerGroup(...)``) stops
the workers, which destroy their process group, and joins the fit thread.
"""

from __future__ import annotations

import itertools
import os
import queue as std_queue
import threading
import time
import uuid
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from raylign.actors.trainer_math import merge_step_metrics
from raylign.actors.trainer_commands import (
    READY,
    ExportHF,
    LoadCheckpoint,
    Logprobs,
    Reply,
    SaveCheckpoint,
    SaveWeights,
    SendWeights,
    Stop,
    TrainStep,
    Values,
)
from raylign.actors.trainer_worker import WorkerSpec, train_loop_per_worker
from raylign.actors.weight_sync import WeightBuckets
from raylign.config import ModelConfig, TrainerConfig
from raylign.orchestrator.placement import trainer_strategy
from raylign.types import TrainBatch

POLL_S = 1.0  # how often a waiting call checks that the workers are still alive
ERROR_GRACE_S = 30.0  # after one rank failed, how long to wait for the others before declaring the group stuck


class TrainerCommandError(RuntimeError):
    """A command failed on one or more workers; the message holds the first worker traceback."""


class TrainerGroupError(RuntimeError):
    """The workers are gone or stuck; the group cannot serve more commands."""


def write_probe(folder: str) -> tuple[str, str]:
    """A file with a fresh random text in ``folder``, for the workers to read back (``shared_dir``)."""
    os.makedirs(folder, exist_ok=True)
    path, text = os.path.join(folder, ".raylign-shared-probe"), uuid.uuid4().hex
    with open(path, "w") as f:
        f.write(text)
    return path, text


class TrainerGroup:
    def __init__(self, model_path: str, model_cfg: ModelConfig, cfg: TrainerConfig, seed: int, storage_dir: str,
                 total_steps: int | None = None, command_timeout_s: float | None = None, critic: str | None = None,
                 reference: bool = False, shared_dir: str | None = None, placement: str = "default"):
        """Start the workers and wait until each has built its model (raises if one fails to).

        critic: None, or "value_head" / "separate" to build a PPO critic beside the policy.
        reference: load a frozen bf16 reference copy into every worker (for ``logprobs(which="ref")``).
        total_steps: optimizer steps of the whole run; needed by the cosine/linear LR schedules.
        command_timeout_s: give up on a command after this long (None: wait while the workers live).
        shared_dir: the run's output_dir, where the workers write checkpoints and the final model and the driver
            writes beside them: every rank must see the driver's files there (one folder on every node), checked
            before any step.
        placement: ray.placement; ``spread`` asks Ray Train to spread the workers over the nodes (else it packs).
        """
        if cfg.lr_schedule != "constant" and total_steps is None:
            raise ValueError(f"trainer.lr_schedule={cfg.lr_schedule!r} needs total_steps")
        self.cfg, self.world = cfg, cfg.num_workers
        self.command_timeout_s = command_timeout_s
        self.last_sync_bytes = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()  # one command in flight: replies of a second one would be dropped
        self._broken: str | None = None
        self._closed = False
        self._fit_error: BaseException | None = None
        self.last_timing: dict[str, float] = {}  # of the last command: round trip vs slowest rank's handler
        # Queues are tiny actors; 0 CPUs so they never compete with the workers for logical CPUs.
        self._commands = [Queue(actor_options={"num_cpus": 0}) for _ in range(self.world)]
        self._replies = Queue(actor_options={"num_cpus": 0})
        probe = write_probe(shared_dir) if shared_dir else None
        spec = WorkerSpec(model_path, model_cfg, cfg, seed, total_steps, critic, reference, probe)
        self._trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec, "command_queues": self._commands, "reply_queue": self._replies},
            scaling_config=ScalingConfig(num_workers=self.world, use_gpu=cfg.use_gpu,
                                         placement_strategy=trainer_strategy(placement),
                                         resources_per_worker={"CPU": cfg.num_cpus_per_worker, **cfg.resources_per_worker}),
            run_config=RunConfig(name=f"trainer-{uuid.uuid4().hex[:8]}", storage_path=storage_dir,
                                 failure_config=FailureConfig(max_failures=0)),
        )
        self.worker_pids: list[int] = []
        self._worker_actors: list = []
        started = time.monotonic()
        self._thread = threading.Thread(target=self._fit, name="raylign-trainer-fit", daemon=True)
        self._thread.start()
        try:
            # 0 when the model's attention cannot take the packed rows' 4D mask (trainer_math.packing_row_tokens)
            ready = self._collect(READY, "start", command_timeout_s)
            self.packed_row_tokens = ready[0]["packed_row_tokens"]
            self.worker_pids = [r["pid"] for r in ready]
            self.node_id = ready[0]["node_id"]  # rank 0's: where save_weights writes and send_weights puts
            self._worker_actors = [r["actor"] for r in ready]
            blind = [rank for rank, r in enumerate(ready) if not r["sees_shared_dir"]]
            if blind:
                raise TrainerGroupError(
                    f"output_dir {shared_dir}: trainer rank {blind[0]} (node {ready[blind[0]]['node_id'][:12]}) "
                    "cannot read the files the driver writes there, so checkpoints and the final model would be "
                    "split across machines; put output_dir on storage every node mounts at the same path (NFS), "
                    "or pin the trainer to the driver's node (trainer.resources_per_worker)")
            if probe:
                os.remove(probe[0])
            # The first command pays one-off costs (FSDP lazy init, first object fetch, queue paths: ~3-6 s);
            # pay them here so start_s holds them and step timings do not.
            self.logprobs(TrainBatch([[0]], [[0]], [[1]]))
        except BaseException:
            self.shutdown()
            raise
        self.start_s = time.monotonic() - started

    def _fit(self) -> None:
        try:
            self._trainer.fit()
        except BaseException as e:  # surfaced by the next waiting call
            self._fit_error = e

    # ---- commands ----------------------------------------------------------------------------------------

    def logprobs(self, batch: TrainBatch | ray.ObjectRef, which: str = "policy") -> list[list[float]]:
        """Per sequence, in batch order: log p of each completion token (temperature 1)."""
        batch_ref = self._put(batch)
        per_rank: list[dict[int, list[float]]] = self._call(Logprobs(batch_ref, which))
        merged = {i: lp for part in per_rank for i, lp in part.items()}
        return [merged[i] for i in range(len(merged))]

    def values(self, batch: TrainBatch | ray.ObjectRef) -> list[list[float]]:
        """Per sequence, in batch order: the critic's V(s_t) before each completion token (PPO only)."""
        per_rank: list[dict[int, list[float]]] = self._call(Values(self._put(batch)))
        merged = {i: v for part in per_rank for i, v in part.items()}
        return [merged[i] for i in range(len(merged))]

    def train_step(self, batch: TrainBatch | ray.ObjectRef, loss_name: str, loss_kwargs: dict | None = None,
                   minibatches: int = 1) -> dict[str, float]:
        """``minibatches`` optimizer steps on the batch; loss metrics are averaged over micro-batches and ranks
        weighted by loss units (tokens for agg=token), plus train/grad_norm, train/lr (means over the steps),
        train/entropy (token mean), train/tokens (loss-masked tokens) and train/optimizer_steps (cumulative)."""
        per_rank = self._call(TrainStep(self._put(batch), loss_name, dict(loss_kwargs or {}), minibatches))
        return merge_step_metrics(per_rank)

    def save_weights(self, path: str) -> float:
        """Write one bf16 safetensors file (HF names, no tied lm_head, no value head) atomically, or with
        ``trainer.lora`` a peft adapter folder at ``path`` holding only the adapter; returns seconds.
        ``last_sync_bytes``: the tensor bytes it wrote."""
        started = time.monotonic()
        self.last_sync_bytes = int(self._call(SaveWeights(str(path)))[0])
        return time.monotonic() - started

    def send_weights(self, bucket_mb: float) -> WeightBuckets:
        """The weights save_weights would write, as checksummed bf16 buckets in Ray's object store, gathered
        ``bucket_mb`` (fp32) at a time; any node's replica can read them. ``last_sync_bytes``: their bytes."""
        sync = self._call(SendWeights(int(bucket_mb * 2**20)))[0]
        self.last_sync_bytes = sync.nbytes
        return sync

    def save_checkpoint(self, dir: str) -> dict[str, dict]:
        """Write the trainer's part of a checkpoint (trainer_* files) into a storage location (``raylign.storage``:
        a folder, or a URI rank 0 uploads to); returns {file name: {bytes, sha256}} of what rank 0 wrote."""
        return self._call(SaveCheckpoint(str(dir)))[0]

    def load_checkpoint(self, dir: str, sha256: dict[str, str] | None = None) -> None:
        """Load the trainer's part of a checkpoint; rank 0 first checks the files named in ``sha256`` (name: hex
        digest) on its local copy, so a remote checkpoint is hashed where it is read, not streamed twice."""
        self._call(LoadCheckpoint(str(dir), sha256))

    def export_hf(self, dir: str) -> None:
        """A plain HF folder (config, model.safetensors, tokenizer) loadable by transformers and vLLM."""
        self._call(ExportHF(str(dir)))

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop the workers (they destroy their process group), join fit(), remove the queues. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive() and self._broken is None:
            try:
                self._send(Stop(), timeout_s)
            except (TrainerCommandError, TrainerGroupError):
                pass  # the workers are already gone; joining below is all that is left
        if self._thread.is_alive() and self._broken is not None:
            self.abort()
        self._thread.join(timeout_s)
        for q in [*self._commands, self._replies]:
            q.shutdown()

    def abort(self) -> None:
        """Kill every worker actor: a rank stuck in a collective never reads Stop. Ray Train then sees the
        group fail, and fit() returns."""
        for actor in self._worker_actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead
                pass

    def __enter__(self) -> TrainerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- plumbing ----------------------------------------------------------------------------------------

    @staticmethod
    def _put(batch: TrainBatch | ray.ObjectRef) -> ray.ObjectRef:
        # One copy in the object store however many ranks read it; pass a ref to reuse it across calls.
        return batch if isinstance(batch, ray.ObjectRef) else ray.put(batch)

    def _call(self, cmd: Any) -> list[Any]:
        if self._closed:
            raise TrainerGroupError("the trainer group is shut down")
        if self._broken is not None:
            raise TrainerGroupError(self._broken)
        return self._send(cmd, self.command_timeout_s)

    def _send(self, cmd: Any, timeout_s: float | None) -> list[Any]:
        with self._lock:
            cmd_id, started = next(self._ids), time.monotonic()
            for q in self._commands:
                q.put((cmd_id, cmd))
            values = self._collect(cmd_id, type(cmd).__name__, timeout_s)
        self.last_timing = {"round_trip_s": time.monotonic() - started, "worker_s": self._last_worker_s}
        return values

    def _collect(self, cmd_id: int, what: str, timeout_s: float | None = None) -> list[Any]:
        """Every rank's value for cmd_id, in rank order; raises instead of waiting on dead or stuck workers."""
        replies: dict[int, Reply] = {}
        started, failed_at = time.monotonic(), None
        while len(replies) < self.world:
            try:
                reply: Reply = self._replies.get(timeout=POLL_S)
            except (Empty, std_queue.Empty):
                self._check_alive(what, started, failed_at, timeout_s, replies)
                continue
            if reply.cmd_id != cmd_id:
                continue  # a late reply to a command given up on earlier
            replies[reply.rank] = reply
            if not reply.ok and failed_at is None:
                failed_at = time.monotonic()
        self._last_worker_s = max(r.seconds for r in replies.values())
        errors = [r for r in replies.values() if not r.ok]
        if errors:
            ranks = ", ".join(str(r.rank) for r in sorted(errors, key=lambda r: r.rank))
            raise TrainerCommandError(f"{what} failed on rank(s) {ranks}:\n{min(errors, key=lambda r: r.rank).error}")
        return [replies[r].value for r in range(self.world)]

    def _dead_ranks(self) -> list[int]:
        """Ranks whose worker actor is gone. Ray Train's controller notices a dead worker only at its next health
        check (10 s here) and then tears the group down; asking each actor directly takes about a second."""
        refs = [actor.__ray_ready__.remote() for actor in self._worker_actors]
        answered, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_S) if refs else ([], [])
        dead = []
        for rank, ref in enumerate(refs):
            if ref in answered:
                try:
                    ray.get(ref)
                except RayActorError:
                    dead.append(rank)
        return dead

    def _check_alive(self, what: str, started: float, failed_at: float | None, timeout_s: float | None,
                     replies: dict[int, Reply]) -> None:
        now = time.monotonic()
        dead = self._dead_ranks()
        if not self._thread.is_alive():
            self._broken = f"trainer workers exited during {what}: {self._fit_error!r}"
        elif dead:
            self._broken = f"trainer worker rank(s) {dead} died during {what}"
        elif failed_at is not None and now - failed_at > ERROR_GRACE_S:
            first = next(r for r in replies.values() if not r.ok)
            silent = sorted(set(range(self.world)) - set(replies))
            self._broken = (f"{what} failed on rank {first.rank} and ranks {silent} did not answer within "
                            f"{ERROR_GRACE_S:.0f}s (stuck in a collective?):\n{first.error}")
        elif timeout_s is not None and now - started > timeout_s:
            self._broken = f"{what} took longer than {timeout_s:.0f}s"
        if self._broken is not None:
            raise TrainerGroupError(self._broken)
