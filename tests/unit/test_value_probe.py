"""The critic-vs-Monte-Carlo probe: the critic's value read at each unique step state, MC values from K
continuations, and their correlation, on the responses and continuation rewards of test_vineppo.py."""

import statistics

import pytest

from raylign.algorithms.value_probe import critic_at_states, critic_vs_mc, pearson
from tests.unit.test_vineppo import PROBLEMS, FakeCluster


class CriticCluster(FakeCluster):
    def values(self, batch):  # V(s_t) = t / 10 + i / 100 for token t of sequence i
        self.calls.append(("values",))
        return [[t / 10 + i / 100 for t in range(len(ids))] for i, ids in enumerate(batch.completion_ids)]


def test_critic_vs_mc_pairs_each_unique_state_once():
    cluster = CriticCluster()
    out = critic_vs_mc(cluster, PROBLEMS, samples=2, mc_rollouts=3, temperature=0.7)
    # states in first-seen order: prompt 0's s_0, after "Add 2.\n" (token 2), after "Then 3." (token 3) -- all
    # first reached by sequence 0 -- then prompt 1's s_0, first reached by sequence 3 (sequence 2 is empty)
    critic, mc = [0.0, 0.2, 0.3, 0.03], [1 / 3, 1.0, 2 / 3, 1 / 3]  # MC: the truncated continuation keeps its 1
    assert out["states"] == 4
    assert [p[0] for p in out["pairs"]] == pytest.approx(critic, abs=1e-4)
    assert [p[1] for p in out["pairs"]] == pytest.approx(mc, abs=1e-4)
    assert out["correlation"] == pytest.approx(statistics.correlation(critic, mc), abs=1e-9)
    assert out["mae"] == pytest.approx(sum(abs(a - b) for a, b in zip(critic, mc)) / 4)
    assert out["critic_mean"] == pytest.approx(sum(critic) / 4) and out["mc_mean"] == pytest.approx(7 / 12)
    kinds = [c[0] for c in cluster.calls]
    assert kinds.count("continue_from") == 1 and "train_step" not in kinds and "sync" not in kinds
    assert next(c for c in cluster.calls if c[0] == "continue_from")[2:4] == (3, 0.7)


def test_critic_at_states_takes_the_first_sequence_and_refuses_unreached_states():
    values_B = [[0.5, 0.6, 0.7], [0.9, 0.8]]
    # both sequences start from state 0; sequence 0's second step starts at token 1 (state 1)
    assert critic_at_states(values_B, [[1, 3], [2]], [[0, 1], [0]], 2) == [0.5, 0.6]
    with pytest.raises(ValueError, match=r"states \[2\]"):
        critic_at_states(values_B, [[1, 3], [2]], [[0, 1], [0]], 3)


def test_pearson_matches_the_standard_library_and_is_none_when_undefined():
    x, y = [0.1, 0.4, 0.35, 0.8], [0.0, 0.5, 0.2, 0.9]
    assert pearson(x, y) == pytest.approx(statistics.correlation(x, y), abs=1e-12)
    assert pearson(x, [-v for v in x]) == pytest.approx(-1.0)
    assert pearson([0.3], [0.2]) is None and pearson([1.0, 1.0], [0.0, 1.0]) is None
    with pytest.raises(ValueError, match="3 and 2"):
        pearson([1.0, 2.0, 3.0], [1.0, 2.0])
