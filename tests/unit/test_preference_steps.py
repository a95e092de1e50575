"""The SFT, DPO, online DPO and stepwise DPO steps against an in-process cluster: what reaches the trainer."""

import torch
import pytest

from raylign.algorithms.dpo import correct_incorrect_pairs, dpo_step, online_dpo_step, pair_batch
from raylign.algorithms.sft import sft_step, supervised_batch
from raylign.algorithms.step_dpo import step_boundaries, step_dpo_step
from raylign.config import ALGORITHM_CONFIGS
from raylign.types import Completion, Example, Pair, Problem, Score


class FakeCluster:
    """Characters are tokens: encode gives one id per character (prompt = its user message)."""

    max_new_tokens = 16

    def __init__(self, correct=None, verdicts=None, mc_correct=None):
        self.calls, self.correct, self.verdicts, self.mc_correct = [], correct, verdicts, mc_correct

    def encode(self, prompts, responses):
        return [([ord(c) for c in p[-1]["content"]], [ord(c) for c in r] + [0]) for p, r in zip(prompts, responses)]

    def token_pieces(self, ids):
        return [[chr(i) if i else "" for i in row] for row in ids]

    def logprobs(self, batch, which="policy"):
        self.calls.append(("logprobs", which))
        return [[-1.0] * len(c) for c in batch.completion_ids]

    def train_step(self, batch, loss_name, loss_kwargs, minibatches=1):
        self.calls.append(("train", loss_name, loss_kwargs, batch))
        return {"loss/x": 1.0}

    def sync_weights(self, lazy=False):
        self.calls.append(("sync", lazy))
        return {}

    def generate(self, problems, n, temperature):
        return [[Completion([1, 2], [10 + j, 20 + j], f"s{j}", [0.0, 0.0], "stop") for j in range(n)] for _ in problems]

    def score(self, problems, groups):
        if self.mc_correct is not None:  # MC: a continuation is right when its full text contains the marker
            return [[Score(float(self.mc_correct in c.text), self.mc_correct in c.text, None, True) for c in g]
                    for g in groups]
        return [[Score(float(ok), ok, None, True) for ok in self.correct[p]] for p in range(len(groups))]

    def continue_from(self, prefixes, n, temperature, max_new_tokens=None):
        self.calls.append(("continue_from", len(prefixes), n))
        return [[Completion(p, [1], "X" if len(p) % 2 else "", [0.0], "stop") for _ in range(n)] for p in prefixes]

    def judge(self, requests, max_new_tokens):
        self.calls.append(("judge", len(requests)))
        return self.verdicts[:len(requests)]


PAIRS = [Pair("a", [{"role": "user", "content": "q1"}], "1\n2", "1\n3", (1.0, 1.0), (1.0, 0.0), "f:0", "2"),
         Pair("b", [{"role": "user", "content": "q2"}], "7", "8", None, None, "f:1", "7")]


def test_pair_batch_rows_alternate_and_form_one_group_per_pair():
    batch = pair_batch([([1], [2, 3], [4]), ([5], [6], [7, 8])])
    assert batch.prompt_ids == [[1], [1], [5], [5]] and batch.completion_ids == [[2, 3], [4], [6], [7, 8]]
    assert batch.fields["chosen_B"] == [1.0, 0.0, 1.0, 0.0] and batch.group_B == [0, 0, 1, 1]


def test_dpo_step_uses_the_reference_and_defers_the_sync():
    cluster = FakeCluster()
    cfg = ALGORITHM_CONFIGS["dpo"](loss_type="dpop", beta=0.2)
    out = dpo_step(cluster, PAIRS, cfg, {})
    assert cluster.calls[0] == ("logprobs", "ref")
    _, name, kwargs, batch = cluster.calls[1]
    assert name == "dpo" and kwargs == dict(beta=0.2, loss_type="dpop", dpop_lambda=50.0, label_smoothing=0.0)
    assert batch.completion_ids[0] == [ord("1"), ord("\n"), ord("2"), 0]  # the response + end of turn
    assert cluster.calls[-1] == ("sync", True) and [r["pair_id"] for r in out.records] == ["a", "b"]


def test_sft_batch_packs_on_the_shared_prompt_prefix_and_trains_on_the_response_only():
    batch = supervised_batch([([1, 2, 3], [7, 8]), ([1, 5], [9])])
    assert batch.prompt_ids == [[1], [1]] and batch.completion_ids == [[2, 3, 7, 8], [5, 9]]
    shared = supervised_batch([([1, 2, 3], [7, 8]), ([1, 2, 5], [9]), ([1, 2, 3, 4], [6])])
    assert shared.prompt_ids == [[1, 2]] * 3 and shared.completion_ids == [[3, 7, 8], [5, 9], [3, 4, 6]]
    assert shared.loss_mask == [[0, 1, 1], [0, 1], [0, 0, 1]]
    same = supervised_batch([([1, 2, 3], [7]), ([1, 2, 3], [8])])  # one prompt token stays in the completion
    assert same.prompt_ids == [[1, 2]] * 2 and same.completion_ids == [[3, 7], [3, 8]]
    assert batch.loss_mask == [[0, 0, 1, 1], [0, 1]]
    cluster = FakeCluster()
    sft_step(cluster, [Example("e", [{"role": "user", "content": "hi"}], "ok")], ALGORITHM_CONFIGS["sft"](), {})
    assert cluster.calls[0][1] == "sft" and cluster.calls[0][3].loss_mask == [[0, 1, 1, 1]]


def test_online_pairs_are_correct_with_incorrect_within_a_prompt():
    assert correct_incorrect_pairs([[True, False, True, False], [True, True], [False, True, False]], 1) == \
        [(0, 0, 1), (2, 1, 0)]
    assert correct_incorrect_pairs([[True, False, True, False]], 5) == [(0, 0, 1), (0, 2, 3)]
    cluster = FakeCluster(correct=[[True, False, False, True], [False, False, False, False]])
    problems = [Problem("p0", [{"role": "user", "content": "x"}], "1"), Problem("p1", [{"role": "user", "content": "y"}], "2")]
    cfg = ALGORITHM_CONFIGS["online_dpo"](group_size=4, pairs_per_prompt=2)
    out = online_dpo_step(cluster, problems, cfg, {})
    _, name, _, batch = next(c for c in cluster.calls if c[0] == "train")
    assert name == "dpo" and batch.completion_ids == [[10, 20], [11, 21], [13, 23], [12, 22]]
    assert out.metrics["pairs/count"] == 2 and out.metrics["pairs/prompts_without_pair"] == 1
    assert [r["pair"] for r in out.records[:4]] == ["chosen", "rejected", "rejected", "chosen"]
    assert cluster.calls[-1] == ("sync", False)
    nothing = FakeCluster(correct=[[True] * 4, [False] * 4])
    assert online_dpo_step(nothing, problems, cfg, {}).metrics["pairs/count"] == 0
    assert not [c for c in nothing.calls if c[0] in ("train", "sync")]


def _weights(cluster):
    return next(c for c in cluster.calls if c[0] == "train")[3].fields["token_weights_B_T"]


def test_step_dpo_weights_from_data_scores():
    cluster = FakeCluster()
    step_dpo_step(cluster, PAIRS, ALGORITHM_CONFIGS["step_dpo"](), {})
    # pair a: "1\n2" + eos -> steps "1\n" and "2"; chosen scores 1, 1; rejected "1\n3" scores 1, 0 -> 1 - s
    # pair b: no scores -> plain DPO: chosen 1, rejected 1 - 0
    assert _weights(cluster) == [[1, 1, 1, 1], [0, 0, 1, 1], [1, 1], [1, 1]]


def test_step_dpo_scores_from_a_judge_and_counts_unparseable_verdicts():
    cluster = FakeCluster(verdicts=["Score: 8", "Score: 2", "Score: 10", "nonsense", "Score: 5", "Score: 0"])
    out = step_dpo_step(cluster, PAIRS, ALGORITHM_CONFIGS["step_dpo"](step_scores="judge"), {})
    assert ("judge", 6) in cluster.calls  # 2 + 2 + 1 + 1 steps
    assert [r["scores_chosen"] for r in out.records] == [[0.8, 0.2], [0.5]]
    assert [r["scores_rejected"] for r in out.records] == [[1.0, 0.0], [0.0]]
    assert out.metrics["judge/unparseable"] == 1
    assert _weights(cluster)[1] == pytest.approx([0.0, 0.0, 1.0, 1.0])  # 1 - (1.0, 0.0) per step


def test_step_dpo_scores_from_monte_carlo_continuations():
    # the fake's continuation text is "X" after odd-length prefixes; a continuation is right when it has "X"
    cluster = FakeCluster(mc_correct="X")
    out = step_dpo_step(cluster, PAIRS[:1], ALGORITHM_CONFIGS["step_dpo"](step_scores="mc", mc_rollouts=3), {})
    # prompt "q1" (2 tokens): states after step 1 = prompt + "1\n" (4 tokens, even: 0), and s_0 (2 tokens: 0)
    assert ("continue_from", 2, 3) in cluster.calls  # s_0 shared by both halves, "1\n" shared too: 2 states
    assert out.records[0]["scores_chosen"] == [0.0, 0.0] and out.records[0]["scores_rejected"] == [0.0, 0.0]


def test_step_boundaries_follow_token_ownership():
    spans = [(0, 2), (2, 3)]  # "1\n", "2"
    assert step_boundaries([1, 2, 3, 3], spans) == ([0, 1], [2, 4])
    assert step_boundaries([3, 3], spans) == ([1], [2])  # one token spans both steps: the first owns none
