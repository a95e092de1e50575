"""N generator replicas behind one call: prompts are load-balanced, results come back in prompt order.

All n samples of one prompt go to the same replica (so its prefix cache serves them). Work is handed out
in chunks to whichever replica is free first.

Faults: each chunk has a deadline (``generator.timeout_s``, else derived from its token count). A replica
that dies or misses it is killed and replaced under the same index; the pool remembers the last
``load_weights`` and ``reseed`` and replays them into the replacement, so its samples carry the current
policy version, and the lost chunk is handed out again: the call still returns n samples per prompt. The
replacement's start-up overlaps the rest of the call (the next control call waits for it). Past
``fault.max_generator_restarts`` replacements the pool raises ``GeneratorPoolError``.

``lora_rank`` (the trainer's LoRA rank; None without LoRA) starts the replicas able to serve the peft adapter
folders ``load_weights`` may then pass instead of a full-weights file; a replay reloads the folder the same way.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from raylign.actors.generator import GeneratorActor, Prompt
from raylign.actors.weight_sync import WeightBuckets, WeightSyncError
from raylign.config import FaultConfig, GeneratorConfig, ModelConfig
from raylign.orchestrator.faults import ACTOR_FAULTS, RestartBudget, RestartLimitError, fault_cause
from raylign.orchestrator.placement import bundle, in_group, release, reserve
from raylign.types import Completion, SamplingSpec

log = logging.getLogger(__name__)

# Derived chunk deadline (generator.timeout_s unset): a fixed allowance (scheduling, prefill, a first call's
# warm-up) plus the chunk's worst-case token count at a floor rate. Measured on 2 CPU cores: vLLM 150-500
# tok/s, transformers ~160; the floor sits 8x under the slowest, leaving room for replicas sharing cores and
# for bigger models, because a false timeout costs a replica restart and a redone chunk.
CHUNK_ALLOWANCE_S = 120.0
FLOOR_TOKENS_PER_S = 20.0
# A replacement must be up and restored within this long (vLLM builds its engine: 5-30 s for a small model
# on CPU, minutes for a large one on GPU); past it, it counts as one more fault.
START_DEADLINE_S = 900.0
SYNC_FAULTS = (*ACTOR_FAULTS, WeightSyncError)  # a replica whose sync failed its checks is replaced like a dead one
SEED_STRIDE = 7919  # replica i is seeded with seed + SEED_STRIDE * i, so replicas sample differently


class GeneratorPoolError(RestartLimitError):
    """Generator replicas failed more often than ``fault.max_generator_restarts`` allows."""


@dataclass
class _Job:
    """One outstanding remote call: a chunk of prompts, or (part None) a replacement starting up."""

    replica: int
    limit_s: float
    start: int = 0
    part: list | None = None
    restore: list = field(default_factory=list)  # a replacement's start-up calls, all checked once done
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.limit_s


def _one_at_a_time(method):
    """Calls from several driver threads (async training's prefetch beside the step) run one after another."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class GeneratorPool:
    def __init__(self, model_path: str, model_cfg: ModelConfig, gen_cfg: GeneratorConfig,
                 fault_cfg: FaultConfig | None = None, lora_rank: int | None = None, placement: str = "default"):
        """``placement``: ray.placement (default, pack or spread) for this pool's replicas."""
        self.args = (model_path, model_cfg, gen_cfg)
        self._lock = threading.RLock()
        self.lora_rank = lora_rank
        self.cfg = gen_cfg
        self.fault = fault_cfg or FaultConfig()
        self.restarts = RestartBudget("generator", self.fault.max_generator_restarts,
                                      "fault.max_generator_restarts", GeneratorPoolError)
        # the last sync, replayed into a replacement: (method, args), the buckets where there are any (any node)
        self.weights: tuple[str, tuple] | None = None
        self.seed: int | None = None  # last reseed(seed)
        self.starting: dict[ray.ObjectRef, _Job] = {}  # replacements still starting after a generate call
        one = bundle(gen_cfg.num_cpus, gen_cfg.num_gpus, gen_cfg.resources)
        self.group = reserve([one] * gen_cfg.num_replicas, placement, "generator replica")
        self.actors = [self._start(i) for i in range(gen_cfg.num_replicas)]
        self.nodes: list[str | None] = [None] * len(self.actors)  # each replica's Ray node id, once asked
        ray.get([a.ready.remote() for a in self.actors])

    def _start(self, replica: int):
        return GeneratorActor.options(num_cpus=self.cfg.num_cpus, num_gpus=self.cfg.num_gpus,
                                     resources=self.cfg.resources or None, **in_group(self.group, replica)).remote(
            *self.args, replica=replica, lora_rank=self.lora_rank)

    def spec(self, **changes) -> SamplingSpec:
        base = {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p,
                "max_new_tokens": self.cfg.max_new_tokens, "n": self.cfg.n}
        return SamplingSpec(**{**base, **changes})

    def chunk_deadline_s(self, num_prompts: int, spec: SamplingSpec) -> float:
        if self.cfg.timeout_s is not None:
            return self.cfg.timeout_s
        return CHUNK_ALLOWANCE_S + num_prompts * spec.n * spec.max_new_tokens / FLOOR_TOKENS_PER_S

    @_one_at_a_time
    def generate(self, prompts: list[Prompt], spec: SamplingSpec,
                 on_done: Callable[[int], None] | None = None) -> list[list[Completion]]:
        size = max(1, min(self.cfg.batch_size, -(-len(prompts) // len(self.actors))))
        pending = deque((s, prompts[s:s + size]) for s in range(0, len(prompts), size))
        results: list[list[Completion] | None] = [None] * len(prompts)
        jobs, self.starting = self.starting, {}
        busy = {job.replica for job in jobs.values()}
        free = deque(i for i in range(len(self.actors)) if i not in busy)
        while pending or any(job.part is not None for job in jobs.values()):
            while pending and free:
                i, (start, part) = free.popleft(), pending.popleft()
                job = _Job(i, self.chunk_deadline_s(len(part), spec), start, part)
                jobs[self.actors[i].generate.remote(part, spec)] = job
            for job, value, cause in self._settle(jobs):
                if cause is not None:
                    jobs.update([self._replace(job.replica, cause)])
                    if job.part is not None:  # its chunk goes to the next free replica, maybe the replacement
                        pending.appendleft((job.start, job.part))
                    continue
                free.append(job.replica)
                if job.part is not None:
                    results[job.start:job.start + len(job.part)] = value
                    if on_done:
                        on_done(len(job.part))
        self.starting = jobs  # replacements not up yet keep starting while the caller scores and trains
        return results  # type: ignore[return-value]

    def _settle(self, jobs: dict[ray.ObjectRef, _Job]) -> list[tuple[_Job, object, str | None]]:
        """Wait until a job finishes or passes its deadline; pop those jobs and return them as
        (job, value, cause), cause None on success."""
        timeout = max(0.0, min(job.deadline for job in jobs.values()) - time.monotonic())
        ready, _ = ray.wait(list(jobs), num_returns=1, timeout=timeout)
        if not ready:
            now = time.monotonic()
            expired = [jobs.pop(r) for r, job in list(jobs.items()) if job.deadline <= now]
            return [(job, None, f"gave no result within {job.limit_s:.0f} s") for job in expired]
        job = jobs.pop(ready[0])
        try:
            value = ray.get(ready[0])
            ray.get(job.restore)  # a replacement's earlier restore calls: done, but maybe failed
        except ACTOR_FAULTS as e:
            return [(job, None, fault_cause(e))]
        return [(job, value, None)]

    def _replace(self, i: int, cause: str) -> tuple[ray.ObjectRef, _Job]:
        """Kill replica i and start a fresh one under the same index, restored to the pool's weights, policy
        version and seed; returns its start-up job (done when all restore calls are)."""
        self.restarts.spend(f"generator replica {i}", cause)
        ray.kill(self.actors[i])
        self.actors[i] = actor = self._start(i)
        # An actor runs one caller's calls in submission order, so the last restore call finishing means
        # all have; until then the replica takes no chunk.
        restore = [actor.ready.remote()]
        self.nodes[i] = None  # it may start on another node
        if self.weights is not None:
            method, args = self.weights
            restore.append(getattr(actor, method).remote(*args))
        if self.seed is not None:
            restore.append(actor.reseed.remote(self.seed + SEED_STRIDE * i))
        return restore[-1], _Job(i, START_DEADLINE_S, restore=restore[:-1])

    def _await_started(self) -> None:
        """Block until every replacement started by earlier calls is up (a failed start is one more fault)."""
        jobs, self.starting = self.starting, {}
        while jobs:
            for job, _, cause in self._settle(jobs):
                if cause is not None:
                    jobs.update([self._replace(job.replica, cause)])

    def _each(self, method: str, args: Callable[[int], tuple] = lambda i: ()) -> list:
        return self._each_call(lambda i: (method, args(i)))

    def _each_call(self, call: Callable[[int], tuple[str, tuple]]) -> list:
        """Call ``call(i) = (method, args)`` on every replica i with deadline fault.call_timeout_s; a replica that
        dies, misses it or fails a weight sync's checks is replaced (restored to the pool's state) and asked once
        more."""
        self._await_started()
        timeout = self.fault.call_timeout_s
        refs = [getattr(a, call(i)[0]).remote(*call(i)[1]) for i, a in enumerate(self.actors)]
        out = []
        for i, ref in enumerate(refs):
            method = call(i)[0]
            try:
                out.append(ray.get(ref, timeout=timeout))
            except SYNC_FAULTS as e:
                self.starting = dict([self._replace(i, f"{method}: {fault_cause(e, timeout)}")])
                self._await_started()
                try:
                    out.append(ray.get(getattr(self.actors[i], method).remote(*call(i)[1]), timeout=timeout))
                except SYNC_FAULTS as again:
                    raise GeneratorPoolError(f"generator replica {i} {method}: {fault_cause(again, timeout)} "
                                             "again right after a restart") from again
        return out

    @_one_at_a_time
    def node_ids(self) -> list[str]:
        """The Ray node each replica runs on (asked once per replica start)."""
        if None in self.nodes:
            self.nodes = self._each("node_id")
        return list(self.nodes)  # type: ignore[arg-type]

    def load_weights(self, path: str, version: int) -> list[float]:
        """Every replica serves ``path`` (full-weights file or adapter folder) as ``version``; seconds each took."""
        return self.load(version, {i: "file" for i in range(len(self.actors))}, path=path)

    @_one_at_a_time
    def load(self, version: int, transports: dict[int, str], path: str | None = None,
             buckets: WeightBuckets | None = None, timeout_s: float = 300.0) -> list[float]:
        """Every replica i serves one sync as ``version``: by ``transports[i]``, "file" (``path``, a file or adapter
        folder its node can read) or "ray" (``buckets``, from any node). Seconds each took. A replacement during
        or after the load is restored from the buckets when there are any, else from the file."""
        path = os.path.abspath(path) if path is not None else None  # once: replicas and replacements read the same
        calls = {"file": ("load_weights", (path, version)), "ray": ("load_buckets", (buckets, version, timeout_s))}
        self.weights = calls["ray" if buckets is not None else "file"]  # set first: see _replace
        return self._each_call(lambda i: calls[transports[i]])

    @_one_at_a_time
    def each_generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[list[list[Completion]]]:
        """The same prompts on every replica (the sync canary): per replica, its groups in prompt order."""
        return self._each("generate", lambda i: (prompts, spec))

    @_one_at_a_time
    def replace(self, i: int, cause: str) -> None:
        """Replace replica i now (a counted fault), restored to the pool's weights, version and seed."""
        self._await_started()
        self.starting = dict([self._replace(i, cause)])
        self._await_started()

    @_one_at_a_time
    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._each("reseed", lambda i: (seed + SEED_STRIDE * i,))

    @_one_at_a_time
    def policy_versions(self) -> list[int]:
        return self._each("policy_version")

    def fault_counters(self) -> dict[str, int]:
        return self.restarts.counters()

    @_one_at_a_time
    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.starting = {}
        release(self.group)
        self.group = None
