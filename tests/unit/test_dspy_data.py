"""AutoDSPy questions: the offline math + synthetic 2-hop mix (sizes, determinism, disjoint splits, answers the
context supports), GSM8K and HotpotQA files (the shared copies, both context shapes, bad rows), the Problem."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from raylign.envs.data import DataError
from raylign.envs.dspy.actions import action_prompt
from raylign.envs.dspy.data import HOPS, Question, file_questions, offline_questions, question_problem
from raylign.envs.arith import generate

SHARED = Path(__file__).parents[2].parent / "shared/data"
GSM8K = str(SHARED / "gsm8k/{split}.jsonl")
HOTPOT = str(SHARED / "hotpotqa/dev_distractor_sample.jsonl")
needs_shared = pytest.mark.skipif(not (SHARED / "hotpotqa/dev_distractor_sample.jsonl").exists()
                                  or not (SHARED / "gsm8k/test.jsonl").exists(), reason="shared data copy absent")


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _paragraphs(context: str) -> list[tuple[str, str]]:
    return [tuple(p.split(": ", 1)) for p in context.split("\n\n")]


def test_offline_mix_sizes_kinds_ids_and_shuffle():
    qs = offline_questions("train", num_math=30, num_multihop=20, seed=7, difficulty=3)
    assert Counter(q.kind for q in qs) == {"math": 30, "multihop": 20}
    assert len({q.id for q in qs}) == 50
    assert all(q.context is None for q in qs if q.kind == "math")
    assert all(q.source.startswith("synthetic:") and q.context for q in qs if q.kind == "multihop")
    kinds = "".join(q.kind[0] for q in qs)
    assert kinds not in ("m" * 30 + "u" * 20, "u" * 20 + "m" * 30)  # interleaved, not concatenated
    # the math questions are arith's own, without its answer instruction, with its answers
    arith = {q: str(a) for q, _, _, a, _ in generate(3, "train", 30, 7)}
    math = {q.question: q.answer for q in qs if q.kind == "math"}
    assert math == arith
    assert offline_questions("test", 0, 0, 7, 3) == []
    assert [q.kind for q in offline_questions("test", 5, 0, 7, 1)] == ["math"] * 5


def test_offline_is_deterministic_and_seeded():
    a = offline_questions("test", 10, 10, seed=3, difficulty=2)
    assert a == offline_questions("test", 10, 10, seed=3, difficulty=2)
    b = offline_questions("test", 10, 10, seed=4, difficulty=2)
    assert {q.question for q in a} != {q.question for q in b}


def test_offline_splits_share_no_entity_or_problem_for_any_seeds_and_sizes():
    train = offline_questions("train", 100, 60, seed=1, difficulty=2)
    for test in (offline_questions("test", 100, 60, seed=1, difficulty=2),
                 offline_questions("test", 40, 25, seed=2, difficulty=2)):
        assert not {q.question for q in train} & {q.question for q in test}
        titles = [{t for q in qs if q.kind == "multihop" for t, _ in _paragraphs(q.context)} for qs in (train, test)]
        assert len(titles[0]) > 60 and len(titles[1]) > 25
        assert not titles[0] & titles[1]
    with pytest.raises(ValueError, match="splits"):
        offline_questions("dev", 1, 1, 0, 1)


def test_two_hop_answers_come_from_the_context_through_the_bridge():
    qs = [q for q in offline_questions("train", 0, 120, seed=5, difficulty=1)]
    assert {q.source.split(":")[1] for q in qs} == set(HOPS)  # every template is used
    for q in qs:
        (t1, first), *rest = _paragraphs(q.context)
        assert len(rest) == 2 and f"the {t1}" in q.question
        assert q.answer in q.context
        # the hop-2 document holds the answer and is reached from the first: by its name (rival) or founder
        if "rival" in q.question:
            hop2 = [(t, x) for t, x in rest if f"a rival of the {t}." in first]
        else:
            hop2 = [(t, x) for t, x in rest if (m := re.search(r"in the town of \w+ by \w+ (\w+ \w+)\.", x))
                    and f" {m.group(1)} hangs in its hall" in first]
        assert len(hop2) == 1
        title, text = hop2[0]
        assert q.answer in text and q.answer not in first  # the hop is needed: X's own attribute is not it
        if q.question.startswith("In which town"):
            assert f"in the town of {q.answer} by" in text
        # the distractor never names the subject (which would make "the rival of X" ambiguous)
        (dt, dx), = [p for p in rest if p[0] != title]
        assert t1 not in dx and q.answer not in dx


def test_bridge_entity_is_named_in_the_first_document():
    q = next(q for q in offline_questions("test", 0, 40, seed=9, difficulty=1)
             if q.source.startswith("synthetic:rival_town:"))
    (t1, first), *rest = _paragraphs(q.context)
    bridge = re.search(r"a rival of the (\w+ \w+)\.", first).group(1)
    assert bridge in dict(rest) and f"The {bridge} was founded in" in dict(rest)[bridge]
    assert re.search(rf"The {bridge} was founded in \d+ in the town of {q.answer} by", dict(rest)[bridge])


def test_question_problem_shows_only_the_question_to_the_policy():
    q = Question("q1", "Who founded the rival of the X Guild?", "Ana Bel", "X Guild: text\n\nY Guild: more",
                 "multihop", "synthetic:rival_founder:syn-1>syn-2+syn-3")
    p = question_problem(q, ["Predict"], ["question -> answer", "context, question -> answer"])
    assert p.messages == action_prompt(q.question, ["Predict"], ["question -> answer", "context, question -> answer"])
    assert "X Guild: text" not in str(p.messages)
    assert (p.id, p.answer) == ("q1", "Ana Bel")
    assert p.meta == {"question": q.question, "context": q.context, "kind": "multihop", "source": q.source}
    with pytest.raises(ValueError, match="kind"):
        Question("q", "?", "a", None, "trivia", "x")


@needs_shared
def test_shared_files_mix_split_and_limit():
    train = file_questions(GSM8K, HOTPOT, "train", limit_each=None, seed=0)
    test = file_questions(GSM8K, HOTPOT, "test", limit_each=None, seed=0)
    assert Counter(q.kind for q in train) == {"math": 7473, "multihop": 39}
    assert Counter(q.kind for q in test) == {"math": 1319, "multihop": 14}
    hot = {s: {q.source for q in qs if q.kind == "multihop"} for s, qs in (("train", train), ("test", test))}
    assert not hot["train"] & hot["test"] and len(hot["train"] | hot["test"]) == 53
    assert len({q.id for q in train + test}) == len(train) + len(test)
    assert sorted(int(s.rpartition(":")[2]) for s in hot["test"]) == [4, 5, 7, 10, 12, 20, 21, 23, 34, 36, 39, 47,
                                                                     49, 50]
    big = next(q for q in test if q.source == f"{HOTPOT}:4")
    assert big.id == "hotpotqa-test-4" and big.answer == "Greenwich Village, New York City"
    assert big.question == 'The director of the romantic comedy "Big Stone Gap" is based in what New York city?'
    assert big.context.startswith("Just Another Romantic Wrestling Comedy: Just Another Romantic Wrestling Comedy "
                                  "is a 2006 film starring April Hunter and Joanie Laurer. This Romantic comedy")
    assert len(big.context.split("\n\n")) == 10
    g = next(q for q in test if q.id == "gsm8k-test-0")
    assert g.answer == "18" and g.source == GSM8K.replace("{split}", "test") + ":0" and g.context is None
    small = file_questions(GSM8K, HOTPOT, "test", limit_each=5, seed=1)
    assert Counter(q.kind for q in small) == {"math": 5, "multihop": 5}
    assert {q.id for q in small} == {f"gsm8k-test-{i}" for i in range(5)} | {
        q.id for q in sorted((q for q in test if q.kind == "multihop"), key=lambda q: int(q.id.split("-")[-1]))[:5]}
    assert small == file_questions(GSM8K, HOTPOT, "test", limit_each=5, seed=1) != \
        file_questions(GSM8K, HOTPOT, "test", limit_each=5, seed=2)
    only = file_questions(None, HOTPOT, "train", None, 0)
    assert len(only) == 39 and {q.kind for q in only} == {"multihop"}


def test_hub_shaped_context_and_plain_file_split(tmp_path):
    rows = [{"id": f"h{i}", "question": f"Which {i}?", "answer": f"a{i}",
             "context": {"title": ["T one", "T two"], "sentences": [["First.", " Second."], [" Only."]]}}
            for i in range(40)]
    path = _jsonl(tmp_path / "hub.jsonl", rows)
    train, test = (file_questions(None, path, s, None, 0) for s in ("train", "test"))
    assert len(train) + len(test) == 40 and 6 <= len(test) <= 18
    assert not {q.id for q in train} & {q.id for q in test}
    assert train[0].context == "T one: First. Second.\n\nT two: Only."
    # the same rows as pairs give the same text
    pairs = [dict(r, context=[["T one", ["First.", " Second."]], ["T two", [" Only."]]]) for r in rows]
    assert [q.context for q in file_questions(None, _jsonl(tmp_path / "p.jsonl", pairs), "train", None, 0)] == \
        [q.context for q in train]


@pytest.mark.parametrize("bad, match", [
    ({"answer": "a", "context": [["T", ["s"]]]}, r"row 2: missing field 'question'"),
    ({"question": "q?", "context": [["T", ["s"]]]}, r"row 2: missing field 'answer'"),
    ({"question": "q?", "answer": " "}, r"row 2: empty field 'answer'"),
    ({"question": "q?", "answer": "a"}, r"row 2: missing field 'context'"),
    ({"question": "q?", "answer": "a", "context": "T: s"}, r"row 2: field 'context': expected \[\[title"),
    ({"question": "q?", "answer": "a", "context": [["T", "s"]]}, r"row 2: field 'context': paragraph 0 needs"),
    ({"question": "q?", "answer": "a", "context": [["T", ["s"]], ["U"]]},
     r"row 2: field 'context': expected .*; paragraph 1 is not"),
    ({"question": "q?", "answer": "a", "context": []}, r"row 2: field 'context': no paragraphs"),
    ({"question": "q?", "answer": "a", "context": {"title": ["T"], "sentences": []}},
     r"row 2: field 'context': a mapping context needs"),
])
def test_bad_hotpotqa_rows_name_file_row_and_field(tmp_path, bad, match):
    good = {"question": "q?", "answer": "a", "context": [["T", ["s"]]]}
    # {split} in the path: the file is the split, so every row is read
    _jsonl(tmp_path / "hp_test.jsonl", [good, good, bad])
    with pytest.raises(DataError, match=r"hp_test\.jsonl: " + match):
        file_questions(None, str(tmp_path / "hp_{split}.jsonl"), "test", None, 0)


@pytest.mark.parametrize("answer, match", [
    ("no marker here", r"row 1: field 'answer' has no '#### <answer>' line"),
    ("so #### many", r"row 1: field 'answer' '#### many' is not a number"),
])
def test_bad_gsm8k_rows_name_file_row_and_field(tmp_path, answer, match):
    rows = [{"question": "q?", "answer": "x\n#### 1,200"}, {"question": "q", "answer": answer}]
    _jsonl(tmp_path / "g_train.jsonl", rows)
    with pytest.raises(DataError, match=r"g_train\.jsonl: " + match):
        file_questions(str(tmp_path / "g_{split}.jsonl"), None, "train", None, 0)
    ok = file_questions(str(tmp_path / "g_{split}.jsonl"), None, "train", 1, 0)
    assert [(q.id, q.answer, q.kind) for q in ok] == [("gsm8k-train-0", "1200", "math")]
    with pytest.raises(DataError, match="no AutoDSPy question files"):
        file_questions(None, None, "train", None, 0)
