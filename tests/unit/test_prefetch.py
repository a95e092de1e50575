"""The async prefetcher on plain threads: batches queued ahead from the stream's upcoming prompts, taken when the
step asks for exactly them, dropped when too many versions old, discarded when the stream moved on."""

import threading

import pytest

from raylign.orchestrator.checkpoint import PromptStream
from raylign.orchestrator.prefetch import Prefetcher
from raylign.types import Completion, Problem

PROBLEMS = [Problem(id=f"p{i}", messages=[{"role": "user", "content": str(i)}], answer="1") for i in range(12)]


class Generators:
    """Samples carry the version the 'generators' serve when they are drawn; records which thread drew them."""

    def __init__(self):
        self.version, self.calls = 0, []

    def sample(self, problems, n, temperature):
        self.calls.append((tuple(p.id for p in problems), threading.current_thread().name))
        return [[Completion([1], [2], "x", [-1.0], "stop", policy_version=self.version) for _ in range(n)]
                for _ in problems]


def after_first_batch(depth: int, n: int = 2):
    """Generators, stream and prefetcher after step 1 took its batch (sampled now, at v0) and queued the next."""
    gens, stream = Generators(), PromptStream(PROBLEMS, 2, seed=0)
    pre = Prefetcher(gens.sample, stream.peek_batches, depth=depth)
    first = stream.next()
    groups = pre.serve(first, n, 1.0, 0, lambda: gens.sample(first, n, 1.0))
    return gens, stream, pre, groups


def test_batches_are_sampled_ahead_on_the_prefetch_thread_and_carry_their_age():
    gens, stream, pre, groups = after_first_batch(depth=1, n=3)  # nothing queued yet: sampled now
    assert [len(g) for g in groups] == [3, 3] and gens.calls[0][1] == threading.current_thread().name
    second = stream.next()
    pre._queued[next(iter(pre._queued))].result()  # the queued batch is the stream's next one, drawn at v0
    assert gens.calls[1] == (tuple(p.id for p in second), gens.calls[1][1]) and gens.calls[1][1].startswith("raylign-prefetch")
    gens.version = 1  # the step trained and synced
    groups = pre.serve(second, 3, 1.0, 1, lambda: pytest.fail("the queued batch should serve"))
    assert {c.policy_version for g in groups for c in g} == {0}
    metrics = pre.pop_metrics()
    assert metrics["async/staleness_mean"] == pytest.approx(0.5)  # 6 fresh samples and 6 one version old
    assert metrics["async/dropped"] == 0 and metrics["async/discarded"] == 0 and metrics["async/trainer_wait_s"] >= 0
    assert metrics["async/generate_ahead_s"] > 0 and pre.pop_metrics()["async/generate_ahead_s"] == 0
    pre.close()


def test_too_old_samples_are_dropped_and_sampled_again():
    gens, stream, pre, _ = after_first_batch(depth=1)
    second = stream.next()
    pre._queued[next(iter(pre._queued))].result()  # drawn at v0
    gens.version = 2  # two syncs since: the trainer is 2 versions ahead, more than depth 1
    groups = pre.serve(second, 2, 1.0, 2, lambda: gens.sample(second, 2, 1.0))
    assert {c.policy_version for g in groups for c in g} == {2} and pre.dropped == 4
    assert pre.pop_metrics()["async/staleness_mean"] == 0.0
    pre.close()


def test_queued_batches_the_stream_no_longer_hands_out_are_discarded():
    gens, stream, pre, _ = after_first_batch(depth=2)
    assert len(pre._queued) == 2  # depth 2: the next two steps
    stream.take(1)  # dynamic sampling took an extra prompt: the upcoming batches shifted
    third = stream.next()
    pre.serve(third, 2, 1.0, 1, lambda: gens.sample(third, 2, 1.0))
    assert pre.discarded == 2 and len(pre._queued) == 2
    pre.close()


def test_peek_batches_leaves_the_stream_where_it_was():
    stream = PromptStream(PROBLEMS, 5, seed=3)
    stream.next()
    ahead = stream.peek_batches(3)  # crosses an epoch boundary (12 prompts)
    assert [stream.next() for _ in range(3)] == ahead
