"""VinePPO: MC states with dedup, values from continuations whose rewards are known, exact step advantages."""

import pytest
import torch

from raylign.algorithms.vineppo import mc_states, step_advantages, step_values, vineppo_step
from raylign.config import ALGORITHM_CONFIGS

from raylign.types import Completion, Problem, Score, TrainBatch


def AlgorithmConfig(name: str = "grpo", **fields):
    return ALGORITHM_CONFIGS[name](**fields)

PIECES = {20: "Add 2.", 21: "\n", 22: "Then 3.", 23: " So", 24: " 5", 25: "#1", 26: "#0", 27: "Guess"}
PROMPTS = [[1, 2], [1, 3]]
# prompt 0: "Add 2.\n|Then 3.| So 5#1" (3 steps) and "Add 2.\n|Guess#0" (2 steps, same first step);
# prompt 1: an empty response and "Guess#1" (1 step)
RESPONSES = [[[20, 21, 22, 23, 24, 25], [20, 21, 27, 26]], [[], [27, 25]]]
# K = 3 continuation rewards per unique state; the last one of prompt 1's s_0 is cut by the length limit
S0, S1, S2, S3 = (1, 2), (1, 2, 20, 21), (1, 2, 20, 21, 22), (1, 3)
CONTINUATIONS = {S0: [1, 0, 0], S1: [1, 1, 1], S2: [1, 0, 1], S3: [0, 0, 1]}


def _text(ids):
    return "".join(PIECES[i] for i in ids)


def _reward(text):  # the env: the number after the last '#', 0 without one
    return float(text.rsplit("#", 1)[1]) if "#" in text else 0.0


class FakeCluster:
    max_new_tokens = 64

    def __init__(self):
        self.calls: list[tuple] = []

    def generate(self, problems, n, temperature):
        self.calls.append(("generate", n, temperature))
        return [[Completion(prompt_ids=PROMPTS[i], token_ids=ids, text=_text(ids), logprobs=[-1.0] * len(ids),
                            finish_reason="stop") for ids in RESPONSES[i][:n]] for i in range(len(problems))]

    def score(self, problems, groups):
        self.calls.append(("score", [p.id for p in problems], [[c.text for c in g] for g in groups]))
        return [[Score(reward=_reward(c.text), correct=_reward(c.text) == 1.0, prediction=None, format_ok=True)
                 for c in g] for g in groups]

    def token_pieces(self, token_ids):
        self.calls.append(("token_pieces",))
        return [[PIECES[i] for i in ids] for ids in token_ids]

    def continue_from(self, prefixes, n, temperature, max_new_tokens=None):
        self.calls.append(("continue_from", [tuple(p) for p in prefixes], n, temperature, max_new_tokens))
        return [[Completion(prompt_ids=list(p), token_ids=[7] * (j + 1), text=f" #{r}", logprobs=[-1.0] * (j + 1),
                            finish_reason="length" if (tuple(p) == S3 and j == 2) else "stop")
                 for j, r in enumerate(CONTINUATIONS[tuple(p)][:n])] for p in prefixes]

    def logprobs(self, batch: TrainBatch, which="policy"):
        self.calls.append(("logprobs", which))
        return [[-0.7] * len(ids) for ids in batch.completion_ids]

    def train_step(self, batch, loss_name, loss_kwargs, minibatches=1):
        self.calls.append(("train_step", batch, loss_name, loss_kwargs, minibatches))
        return {"loss/policy": 0.5}

    def sync_weights(self):
        self.calls.append(("sync",))
        return {"policy/version": 1.0}


PROBLEMS = [Problem(id=f"p{i}", messages=[{"role": "user", "content": "q"}], answer="1") for i in range(2)]


def _run(**overrides):
    cfg = dict(name="vineppo", group_size=2, mc_rollouts=3, temperature=0.8, mc_max_new_tokens=64,
               step_split="auto", whiten_advantages=False, truncation_penalty=-1.0)
    cluster = FakeCluster()
    out = vineppo_step(cluster, PROBLEMS, AlgorithmConfig(**{**cfg, **overrides}), {})
    return cluster, out, [c for c in cluster.calls if c[0] == "train_step"]


def test_mc_states_dedup_across_the_batch():
    prompts = [[1, 2], [1, 2], [1, 2], [5]]
    completions = [[20, 21, 22], [20, 21, 9], [], [30]]
    prefixes, state = mc_states(prompts, completions, [[2, 3], [2, 3], [], [1]])
    # s_0 of prompt [1, 2] is shared by its samples, so is their identical first step; the empty response has none
    assert prefixes == [[1, 2], [1, 2, 20, 21], [5]]
    assert state == [[0, 1], [0, 1], [], [2]]


def test_step_values_and_advantages_by_hand():
    values = step_values(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64), [[0, 1], [2], []])
    assert values == [[0.5, 1.0], [0.0], []]
    # sequence 0: steps [0, 2) and [2, 5): V1 - V0 = 0.5, then R - V1 = 0 - 1; sequence 1: one step R - V = 1
    adv = step_advantages(values, torch.tensor([0.0, 1.0, 7.0]), [[2, 5], [3], []], T=6)
    assert adv.tolist() == [[0.5, 0.5, -1.0, -1.0, -1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.0] * 6]


def test_vineppo_step_exact_per_token_advantages():
    cluster, out, calls = _run()
    # V(S0) = 1/3, V(S1) = 1, V(S2) = 2/3, V(S3) = (0 + 0 - 1) / 3 with the truncated continuation at -1
    # response 0,0 (R=1): [0,2) 1 - 1/3, [2,3) 2/3 - 1, [3,6) 1 - 2/3; response 0,1 (R=0): [0,2) 2/3, [2,4) 0 - 1
    # response 1,1 (R=1): one step, 1 - (-1/3)
    (_, batch, loss_name, kwargs, minibatches), = calls
    adv = batch.fields["advantages_B"]
    assert adv[0] == pytest.approx([2 / 3, 2 / 3, -1 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert adv[1] == pytest.approx([2 / 3, 2 / 3, -1.0, -1.0])
    assert adv[2] == [] and adv[3] == pytest.approx([4 / 3, 4 / 3])
    assert loss_name == "policy_gradient_on_policy" and minibatches == 1
    assert kwargs == dict(clip_eps=0.2, clip_eps_high=None, agg="token", kl_beta=0.0, kl_kind="k3", max_tokens=64)
    assert out.advantages_P_G.tolist() == [pytest.approx([1 / 3, -1 / 6]), pytest.approx([0.0, 4 / 3])]


def test_one_continue_from_call_for_the_unique_states_and_scored_as_full_responses():
    cluster, out, _ = _run()
    (_, prefixes, n, temperature, max_new), = [c for c in cluster.calls if c[0] == "continue_from"]
    assert prefixes == [S0, S1, S2, S3] and (n, temperature, max_new) == (3, 0.8, 64)
    _, problem_ids, texts = [c for c in cluster.calls if c[0] == "score"][1]
    assert problem_ids == ["p0", "p0", "p0", "p1"]
    assert texts[1] == ["Add 2.\n #1"] * 3 and texts[2] == ["Add 2.\nThen 3. #1", "Add 2.\nThen 3. #0",
                                                             "Add 2.\nThen 3. #1"]
    m = out.metrics
    assert m["mc/states"] == 4 and m["mc/states_before_dedup"] == 6 and m["mc/calls"] == 1
    assert m["tokens/mc_rollouts"] == 4 * (1 + 2 + 3)
    assert m["value/mean"] == pytest.approx((1 / 3 + 1 + 2 / 3 - 1 / 3) / 4)
    assert m["value/s0_mean"] == pytest.approx((1 / 3 - 1 / 3) / 2)
    assert m["steps/mean"] == pytest.approx(6 / 3)
    assert m["reward/mean"] == pytest.approx(0.5) and m["policy/version"] == 1.0
    assert [c[0] for c in cluster.calls] == ["generate", "score", "token_pieces", "continue_from", "score",
                                             "train_step", "sync"]


def test_whitening_and_multi_epoch_with_entropy_and_kl():
    cluster, out, calls = _run(whiten_advantages=True, epochs=2, minibatches=2, entropy_coef=0.01, kl_beta=0.1)
    assert ("logprobs", "ref") in cluster.calls and ("logprobs", "policy") in cluster.calls
    assert len(calls) == 2 and all(c[2] == "policy_entropy" and c[4] == 2 for c in calls)
    fields, kwargs = calls[0][1].fields, calls[0][3]
    assert kwargs["entropy_coef"] == 0.01 and kwargs["kl_beta"] == 0.1
    assert fields["old_logprobs_B_T"][0] == [-0.7] * 6 and fields["ref_logprobs_B_T"][3] == [-0.7, -0.7]
    flat = torch.tensor([a for row in fields["advantages_B"] for a in row], dtype=torch.float64)
    assert flat.mean().item() == pytest.approx(0.0, abs=1e-7) and flat.std().item() == pytest.approx(1.0, abs=1e-6)


class TruncatingCluster(FakeCluster):
    """Prompt 1's "Guess#1" is cut by the length limit; with ``empty`` every response is empty."""

    def __init__(self, empty=False):
        super().__init__()
        self.empty = empty

    def generate(self, problems, n, temperature):
        groups = super().generate(problems, n, temperature)
        groups[1][1].finish_reason = "length"
        if self.empty:
            groups = [[Completion(c.prompt_ids, [], "", [], "stop") for c in g] for g in groups]
        return groups


def test_truncated_response_gets_the_penalty_as_its_final_value():
    cluster = TruncatingCluster()
    vineppo_step(cluster, PROBLEMS, AlgorithmConfig(name="vineppo", group_size=2, mc_rollouts=3,
                                                    whiten_advantages=False, truncation_penalty=-1.0), {})
    batch = [c for c in cluster.calls if c[0] == "train_step"][0][1]
    assert batch.fields["advantages_B"][3] == pytest.approx([-1 + 1 / 3] * 2)  # penalty - V(S3)


def test_only_empty_responses_make_no_continue_from_call():
    cluster = TruncatingCluster(empty=True)
    out = vineppo_step(cluster, PROBLEMS, AlgorithmConfig(name="vineppo", group_size=2), {})
    assert "continue_from" not in [c[0] for c in cluster.calls]
    assert out.metrics["mc/calls"] == 0 and out.metrics["tokens/mc_rollouts"] == 0
    assert out.advantages_P_G.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_kl_in_reward_is_refused():
    with pytest.raises(ValueError, match="kl_in_reward"):
        _run(kl_beta=0.1, kl_in_reward=True)
