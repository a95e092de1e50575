"""The RestEM step against an in-process Cluster whose completions and correctness are fixed."""

import copy
import json

import pytest

from raylign.algorithms.restem import kept_samples, restem_step
from raylign.config import ALGORITHM_CONFIGS
from raylign.types import Completion, Problem, Score

# Per prompt, per sample: (response token ids, correct). Prompt 0 samples 0 and 2 are the same response.
SAMPLES = [
    [([10, 2], True), ([11, 2], False), ([10, 2], True), ([12, 2], True)],
    [([20, 2], False), ([21, 2], False), ([22, 2], False), ([23, 2], False)],
    [([30, 31, 2], True), ([32, 2], True), ([33, 2], False), ([34, 2], True)],
]
PROMPTS = [[100 + i, 7, 8] for i in range(len(SAMPLES))]  # first token differs per prompt
PROBLEMS = [Problem(id=f"p{i}", messages=[{"role": "user", "content": "q"}], answer="1") for i in range(len(SAMPLES))]


def Cfg(**fields):
    return ALGORITHM_CONFIGS["restem"](**{"group_size": 4, **fields})


class FakeCluster:
    max_new_tokens = 64

    def __init__(self, samples=SAMPLES):
        self.samples = samples
        self.calls: list[tuple] = []
        self.version = 0

    def generate(self, problems, n, temperature):
        self.calls.append(("generate", n, temperature))
        return [[Completion(prompt_ids=PROMPTS[i], token_ids=list(ids), text=f"{i}-{j}", logprobs=[-1.0] * len(ids),
                            finish_reason="stop", policy_version=self.version)
                 for j, (ids, _) in enumerate(self.samples[i][:n])] for i in range(len(problems))]

    def score(self, problems, groups):
        self.calls.append(("score",))
        return [[Score(reward=float(ok), correct=ok, prediction="x", format_ok=True)
                 for _, ok in self.samples[i][:len(g)]] for i, g in enumerate(groups)]

    def train_step(self, batch, loss_name, loss_kwargs, minibatches=1):
        self.calls.append(("train_step", batch, loss_name, loss_kwargs, minibatches))
        return {"loss/sft": 0.5}

    def reset_policy(self):
        self.calls.append(("reset_policy",))

    def sync_weights(self, lazy=False):
        self.version += 1
        self.calls.append(("sync", lazy))
        return {"policy/version": float(self.version)}


def _names(cluster):
    return [c[0] for c in cluster.calls]


def _trains(cluster):
    return [c for c in cluster.calls if c[0] == "train_step"]


def _rows(batch):
    return [(tuple(p), tuple(c), tuple(m)) for p, c, m in zip(batch.prompt_ids, batch.completion_ids, batch.loss_mask)]


def _row(prompt, response):
    return (tuple(PROMPTS[prompt][:1]), tuple(PROMPTS[prompt][1:] + response), (0, 0) + (1,) * len(response))


def test_exactly_the_distinct_correct_samples_are_trained_as_supervised_rows():
    cluster, state = FakeCluster(), {}
    out = restem_step(cluster, PROBLEMS, Cfg(batch_size=2, temperature=0.8), state)
    (_, batch, loss_name, kwargs, minibatches), = _trains(cluster)
    expected = [_row(0, [10, 2]), _row(0, [12, 2]), _row(2, [30, 31, 2]), _row(2, [32, 2]), _row(2, [34, 2])]
    assert sorted(_rows(batch)) == sorted(expected)  # the duplicate of sample 0 and all wrong ones are gone
    assert loss_name == "sft" and kwargs == {} and minibatches == 3  # ceil(5 / 2)
    assert _names(cluster) == ["generate", "score", "train_step", "sync"]
    assert cluster.calls[0] == ("generate", 4, 0.8) and cluster.calls[-1] == ("sync", False)
    m = out.metrics
    assert m["restem/kept"] == 5 and m["restem/kept_fraction"] == pytest.approx(5 / 12)
    assert m["restem/prompts_with_kept"] == pytest.approx(2 / 3) and m["restem/iteration"] == 1
    assert m["accuracy/train"] == pytest.approx(6 / 12) and m["loss/sft"] == 0.5 and m["policy/version"] == 1
    kept = [(r["prompt_id"], r["sample"]) for r in out.records if r["kept"]]
    assert kept == [("p0", 0), ("p0", 3), ("p2", 0), ("p2", 1), ("p2", 3)]
    assert len(out.records) == 12 and out.records[2]["correct"] and not out.records[2]["kept"]
    assert out.records[8]["tokens"] == 3 and out.records[8]["ground_truth"] == "1"
    assert out.groups is not None and out.scores is not None


def test_max_per_prompt_caps_after_deduplication_first_sampled_first():
    groups = FakeCluster().generate(PROBLEMS, 4, 1.0)
    scores = FakeCluster().score(PROBLEMS, groups)
    assert kept_samples(groups, scores, 1) == [(0, 0), (2, 0)]
    assert kept_samples(groups, scores, 2) == [(0, 0), (0, 3), (2, 0), (2, 1)]
    assert kept_samples(groups, scores, None) == [(0, 0), (0, 3), (2, 0), (2, 1), (2, 3)]


def test_epochs_repeat_the_kept_set_with_minibatches_from_batch_size():
    cluster = FakeCluster()
    restem_step(cluster, PROBLEMS, Cfg(sft_epochs=3, batch_size=8, max_per_prompt=1), {})
    calls = _trains(cluster)
    assert len(calls) == 3 and all(c[4] == 1 for c in calls)  # ceil(2 / 8)
    assert all(sorted(_rows(c[1])) == [_row(0, [10, 2]), _row(2, [30, 31, 2])] for c in calls)
    assert _names(cluster).count("sync") == 1


@pytest.mark.parametrize("restart", [True, False])
def test_reset_to_base_only_after_the_first_iteration_and_only_when_asked(restart):
    cluster, state, cfg = FakeCluster(), {}, Cfg(restart_from_base=restart)
    for _ in range(3):
        restem_step(cluster, PROBLEMS, cfg, state)
    steps = " ".join(_names(cluster)).split("generate")[1:]
    resets = ["reset_policy" in s for s in steps]
    assert resets == ([False, True, True] if restart else [False, False, False])
    if restart:  # the reset comes before that iteration's fine-tuning
        assert steps[1].split() == ["score", "reset_policy", "train_step", "sync"]
    assert state == {"iterations": 3}


def test_nothing_correct_trains_resets_and_syncs_nothing():
    cluster, state = FakeCluster(samples=[SAMPLES[1]]), {"iterations": 4}
    out = restem_step(cluster, PROBLEMS[:1], Cfg(restart_from_base=True), state)
    assert _names(cluster) == ["generate", "score"]
    assert out.metrics["restem/kept"] == 0 and out.metrics["restem/kept_fraction"] == 0
    assert out.metrics["restem/prompts_with_kept"] == 0 and "policy/version" not in out.metrics
    assert not any(r["kept"] for r in out.records) and len(out.records) == 4
    assert state == {"iterations": 5}


def _orders(state, steps=1, epochs=2):
    cluster = FakeCluster()
    for _ in range(steps):
        restem_step(cluster, PROBLEMS, Cfg(sft_epochs=epochs), state)
    return [_rows(c[1]) for c in _trains(cluster)]


def test_order_is_a_function_of_state_and_a_resumed_run_continues_identically():
    assert _orders({}) == _orders({})
    a, b = _orders({}, epochs=4), _orders({"iterations": 1}, epochs=4)
    assert len({tuple(o) for o in a}) > 1  # reshuffled per epoch
    assert a != b  # and per iteration
    straight, resumed = {}, {}
    whole = _orders(straight, steps=2)
    first = _orders(resumed, steps=1)
    resumed = json.loads(json.dumps(resumed))  # through a checkpoint
    assert first + _orders(copy.deepcopy(resumed), steps=1) == whole
    assert json.loads(json.dumps(straight)) == straight == {"iterations": 2}


def test_multi_turn_samples_keep_their_loss_mask():
    cluster = FakeCluster()
    original = cluster.generate

    def generate(problems, n, temperature):
        groups = original(problems, n, temperature)
        groups[2][0].loss_mask = [1, 0, 1]  # token 31 was tool output
        return groups

    cluster.generate = generate
    restem_step(cluster, PROBLEMS, Cfg(), {})
    rows = {r[1]: r[2] for r in _rows(_trains(cluster)[0][1])}
    assert rows[(7, 8, 30, 31, 2)] == (0, 0, 1, 0, 1) and rows[(7, 8, 12, 2)] == (0, 0, 1, 1)
