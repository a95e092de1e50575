"""Asynchronous training (``algorithm.max_staleness = k > 0``): generation runs ahead of training.

When a step takes its batch, the prefetcher queues the next k steps' prompts (the prompt stream's upcoming
batches, not yet taken) on one driver thread, which samples them from the generators while the step scores
and trains. The generator pool serves one call at a time, so a weight sync waits for the batch being sampled
and the next batch samples from the new weights: a batch taken at trainer version V was sampled at V - 1 or
older, at most k behind (the cluster drops older ones and counts them). A queued batch whose prompts are no
longer the stream's next (dynamic sampling took extra prompts) is discarded. The losses correct for the older
sampling policy with truncated importance sampling (``algorithm.tis_cap``; losses.tis_ratio).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from raylign.types import Completion, Problem

Key = tuple


def batch_key(problems: list[Problem], n: int, temperature: float) -> Key:
    return (tuple(p.id for p in problems), n, temperature)


class Prefetcher:
    def __init__(self, sample: Callable[[list[Problem], int, float], list[list[Completion]]],
                 upcoming: Callable[[int], list[list[Problem]]], depth: int):
        """``sample(problems, n, temperature)`` generates (on the prefetch thread); ``upcoming(k)`` gives the next k
        steps' prompt batches without taking them."""
        self.sample, self.upcoming, self.depth = sample, upcoming, depth
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylign-prefetch")
        self._queued: dict[Key, Future] = {}
        self.busy_s = 0.0  # seconds the prefetch thread spent sampling
        self.discarded = 0  # queued batches whose prompts the stream did not hand out next
        self.dropped = 0  # samples more than ``depth`` versions old when taken
        self._step: dict[str, float] = {}  # this step's: staleness sum and count, seconds waited

    def _timed(self, problems: list[Problem], n: int, temperature: float) -> list[list[Completion]]:
        started = time.perf_counter()
        try:
            return self.sample(problems, n, temperature)
        finally:
            self.busy_s += time.perf_counter() - started

    def serve(self, problems: list[Problem], n: int, temperature: float, version: int,
              sample_now: Callable[[], list[list[Completion]]]) -> list[list[Completion]]:
        """This batch's samples: queued ones (waiting for them) if they are at most ``depth`` versions behind
        ``version``, else fresh ones from ``sample_now``; then the next batches are queued."""
        future = self._queued.pop(batch_key(problems, n, temperature), None)
        groups = None
        if future is not None:
            started = time.perf_counter()
            groups = future.result()
            self._add("wait_s", time.perf_counter() - started)
            versions = [c.policy_version for g in groups for c in g] or [version]
            # too old, or newer than the trainer (sampled before a fault rolled the trainer back)
            if version - min(versions) > self.depth or max(versions) > version:
                self.dropped += sum(map(len, groups))
                groups = None
        groups = groups if groups is not None else sample_now()
        for c in (c for g in groups for c in g):
            self._add("staleness_sum", version - c.policy_version)
            self._add("samples", 1)
        self.queue_ahead(n, temperature)
        return groups

    def _add(self, key: str, value: float) -> None:
        self._step[key] = self._step.get(key, 0.0) + value

    def pop_metrics(self) -> dict[str, float]:
        """``async/*`` since the last call: mean staleness of the samples taken, samples dropped and batches
        discarded so far, seconds the step waited for queued samples, seconds the generators sampled ahead."""
        step, self._step = self._step, {}
        busy, self.busy_s = self.busy_s, 0.0
        return {"async/staleness_mean": step.get("staleness_sum", 0.0) / max(1.0, step.get("samples", 0.0)),
                "async/dropped": float(self.dropped), "async/discarded": float(self.discarded),
                "async/trainer_wait_s": step.get("wait_s", 0.0), "async/generate_ahead_s": busy}

    def queue_ahead(self, n: int, temperature: float) -> None:
        """Queue the next ``depth`` batches; drop queued batches that are no longer among them."""
        wanted = {batch_key(b, n, temperature): b for b in self.upcoming(self.depth)}
        for key in [k for k in self._queued if k not in wanted]:
            self._drop(key)
        for key, problems in wanted.items():
            if key not in self._queued:
                self._queued[key] = self._thread.submit(self._timed, problems, n, temperature)

    def _drop(self, key: Key) -> None:
        future = self._queued.pop(key)
        self.discarded += 1
        if not future.cancel():  # running: let it finish (the pool serves one call at a time), ignore its result
            future.add_done_callback(lambda f: f.exception())

    def close(self) -> None:
        for key in list(self._queued):
            self._drop(key)
        self._thread.shutdown(wait=True)
